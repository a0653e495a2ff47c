"""Fast per-layer, per-width sensitivity (DESIGN 2.6): the KL of the next-token distribution
over the vocabulary when one linear is quantized, for every linear and width at once. The same
estimator serves image classifiers (KL of the class distribution) and encoders (one minus the
cosine of the sentence embedding): :mod:`quept.search.objective`.

The slow protocol runs one forward per (layer, width): 1,470 forwards for SmolLM2-135M. Here
one forward and ``n_probes`` backward passes per batch of calibration sequences serve every
entry at once. For logits ``z`` of the reference model and a weight change ``dW`` of one
linear, to second order

    KL(p_ref || p) = g . dW + 1/2 dW' F dW,   F = E_s[G_s G_s'],  G_s = d(s . z) / dW,

where ``g`` is the gradient of the KL to the float model (zero when the reference is the float
model itself) and ``s`` a random logit-space vector per position with covariance
``diag(q) - q q'`` (``q`` = the reference softmax): the exact Hessian of a softmax
cross-entropy in the logits, so ``F`` is the model's Gauss-Newton matrix with every interaction
inside the layer and across positions kept (no diagonal or Kronecker approximation). Each probe
gives, from one backward, the per-sequence weight gradient ``G_s`` of every linear; its inner
products with the quantization error ``dW_b`` of every width ``b`` are accumulated squared.
Every width of a layer shares the same probes, so the ranking of widths within a layer is far
less noisy than the relative error per entry, about ``sqrt(2 / (n_samples * n_probes))``.
Measured on SmolLM2-135M against the slow protocol (21 layers x 7 widths): Spearman 0.999.

For another task the logits become the task's output and the probe covariance the Hessian of
its cost there (:class:`quept.search.objective.Objective`): a classifier's class logits with the
same softmax covariance, an encoder's normalised sentence embedding with the identity.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quept.checks import ConfigError, check_bits
from quept.nn import ElasticLinear, elastic_layers, set_bits
from quept.search.exact import exact_sensitivity
from quept.search.objective import NextTokenKL, Objective, checked_objective
from quept.search.table import LayerShape, SensitivityTable, fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivityConfig:
    """How the sensitivity table is measured.

    n_samples, seq_len: calibration sequences and tokens each (every position is scored); for
        an image classifier or an encoder the caller draws its images or sentences, and
        ``seq_len`` is the longest sentence. The caller draws the inputs by them;
        :func:`quept.sensitivity` records the inputs' own count and length.
    batch_size: sequences per forward pass (memory: activations and B x T x vocab logits);
        None: :data:`BATCH_SIZES` of the method (8 with probes, 32 for the exact table, whose
        forwards take no gradient: a ViT on CPU ran 30% faster than at 8, no faster at 128).
    n_probes: random logit-space probes per sequence (each a backward pass). The noise of an
        entry falls with ``n_samples * n_probes``; more samples at fewer probes cost the same
        and cover more text.
    reference_bits: the width of every *other* layer while one is varied. None (default): the
        float model, the protocol of DESIGN 2.6. A width: the cost becomes the change of the KL
        to the float model from that configuration, to second order (linear term included); on
        SmolLM2-135M it gave worse plans (8-window perplexity 39.4 vs 33.1 at W3's budget).
    cache_deltas: keep every layer's quantization error per width in fp16 (2 bytes x widths x
        weights) instead of recomputing it on each probe, up to :data:`DELTA_CACHE_BYTES`
        (the layers past it are recomputed).
    seed: seeds the calibration windows and the probes.
    method: "fast" (default): the Gauss-Newton estimate above, one forward and ``n_probes``
        backwards per batch for the whole table. "exact": the slow protocol of
        :mod:`quept.search.exact`, the measured cost with one layer changed, by a forward
        (from the layer's block on, for a decoder) per layer and width, ``batch_size``
        samples at a time (a decoder's all at once); ``n_probes`` and ``cache_deltas`` play no
        part. For small models, where it takes minutes: on the built-in ViT its plans had 2-10%
        less KL on the test images at five of seven budgets (docs/mixed-precision.md).
    """

    n_samples: int = 32
    seq_len: int = 128
    batch_size: int | None = None
    n_probes: int = 4
    reference_bits: int | None = None
    cache_deltas: bool = True
    seed: int = 0
    method: str = "fast"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"sensitivity method {self.method!r} is unknown; choose one of "
                              f"{', '.join(METHODS)}")
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", BATCH_SIZES[self.method])
        for k in ("n_samples", "seq_len", "batch_size", "n_probes"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.reference_bits is not None:
            check_bits(self.reference_bits)

    def to_dict(self, objective: Objective | None = None) -> dict:
        """The settings a table records (and its fingerprint hashes); a task other than the
        causal LM adds its objective's name (a causal LM's tables predate it, and keep their
        fingerprints)."""
        extra = ({"objective": objective.name}
                 if objective is not None and not isinstance(objective, NextTokenKL) else {})
        fields = asdict(self)
        method = fields.pop("method")
        if method == "exact":
            del fields["n_probes"], fields["cache_deltas"]
        return {"method": METHODS[method], **fields, **extra}

    @property
    def cache_name(self) -> str:
        """The file, in an elastic folder, a table measured this way is cached in: each method
        has its own, so a fast table does not replace a slow one."""
        return CACHE_NAMES[self.method]


METHODS = {"fast": "gauss-newton-probes", "exact": "exact-forwards"}
"""``SensitivityConfig.method`` -> the name a table records in its settings."""
CACHE_NAMES = {"fast": "sensitivity.json", "exact": "sensitivity-exact.json"}
BATCH_SIZES = {"fast": 8, "exact": 32}
"""``SensitivityConfig.batch_size`` when not given, by method."""


@contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter and restore each layer's width and every flag afterwards."""
    grads = {p: p.requires_grad for p in model.parameters()}
    widths = {m: (m.bits, m.rtn) for m in elastic_layers(model).values()}
    try:
        model.requires_grad_(False)
        yield
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, (b, rtn) in widths.items():
            m.set_bits(b, rtn=rtn)
            m.clear_cache()


DELTA_CACHE_BYTES = 4 * 2**30
"""At most this many bytes of fp16 quantization errors are kept by ``cache_deltas`` (the
built-in model's need 1.5 GB; a 7B model's, 2 bytes x 7 widths x 6.5G weights, would need
91 GB); the layers past it have theirs recomputed on every probe, as with the cache off."""


class _Deltas:
    """Quantization error ``Q_b(W + R) - W_ref`` of one layer for every width: (B, out, in).
    With ``keep``, the errors are kept in fp16 for the later probes while they fit in
    :data:`DELTA_CACHE_BYTES`."""

    def __init__(self, bits: tuple[int, ...], reference: int | None, keep: bool) -> None:
        self.bits, self.reference, self.keep = bits, reference, keep
        self.limit = DELTA_CACHE_BYTES
        self.store: dict[str, torch.Tensor] = {}
        self.kept = 0  # bytes in store

    @torch.no_grad()
    def __call__(self, name: str, m: ElasticLinear) -> torch.Tensor:
        if name in self.store:
            return self.store[name].float()
        ref = m.weight if self.reference is None else m.quantized_weight(self.reference)
        d = torch.stack([m.quantized_weight(b) - ref for b in self.bits]).float()
        if self.keep and self.kept + 2 * d.numel() <= self.limit:
            self.store[name] = d.half()
            self.kept += 2 * d.numel()
        return d


class _Accumulator:
    """Backward hooks on every elastic layer that turn the gradient at the layer's output into
    per-sequence inner products ``<G_seq, dW_b>`` and accumulate them (squared for probes)."""

    def __init__(self, layers: dict[str, ElasticLinear], deltas: _Deltas, n_bits: int) -> None:
        self.layers, self.deltas = layers, deltas
        self.quad = {n: torch.zeros(n_bits, dtype=torch.float64) for n in layers}
        self.lin = {n: torch.zeros(n_bits, dtype=torch.float64) for n in layers}
        self.linear = False
        self.n = 1  # samples in the batch: a layer's rows split into them in order (Swin's
        # windows of one image are contiguous), so products are taken per sample

    def on_grad(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        n = self.n
        per_seq = torch.einsum("nto,nti->noi", g.reshape(n, -1, g.shape[-1]).float(),
                               x.reshape(n, -1, x.shape[-1]).float())  # (N, out, in)
        d = self.deltas(name, self.layers[name])
        proj = (per_seq.reshape(n, -1) @ d.reshape(d.shape[0], -1).T).double().cpu()
        if self.linear:
            self.lin[name] += proj.sum(0)
        else:
            self.quad[name] += proj.square().sum(0)

    def hook(self, name: str):
        def forward_hook(m: ElasticLinear, args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:  # not in the no-grad float pass
                x = args[0].detach()
                out.register_hook(lambda g: self.on_grad(name, x, g))
        return forward_hook


def _probe_batch(model: nn.Module, batch: Any, objective: Objective, acc: _Accumulator,
                 ref: torch.Tensor | None, n_probes: int, gen: torch.Generator) -> None:
    """One forward of ``batch`` at the reference widths, then the backward passes; ``ref``:
    the float model's output target when the reference is not the float model."""
    acc.n = objective.size(batch)
    out = objective.output(model, batch, grad=True)
    if ref is not None:
        acc.linear = True  # the gradient of the summed cost to the float model, in the output
        out.backward(objective.gradient(out.detach(), ref), retain_graph=True)
        acc.linear = False
    for k in range(n_probes):
        out.backward(objective.probe(out.detach(), gen), retain_graph=k < n_probes - 1)


def estimate_sensitivity(
    model: nn.Module, input_ids: Any, config: SensitivityConfig | None = None, *,
    progress: bool = True,
) -> SensitivityTable:
    """The sensitivity table of an elastic model on ``input_ids`` (N, T) of calibration text,
    processed ``config.batch_size`` sequences at a time; for an image classifier pixel values
    (N, C, H, W), for an encoder :class:`quept.eval.Sentences`.

    Costs are mean KL per predicted token, in nats (per image for a classifier; one minus the
    cosine per sentence for an encoder); see the module docstring for the estimator, and
    ``config.method`` for the slow protocol instead.
    """
    config = config or SensitivityConfig()
    objective = checked_objective(model, input_ids)
    spec = getattr(model, "quept_spec", None)
    layers = elastic_layers(model)
    if spec is None or not layers:
        raise ConfigError("the model has no elastic layers; run quept.prepare first")
    ref = config.reference_bits
    if ref is not None:
        check_bits(ref, spec.bits)
    bits = tuple(sorted(spec.bits))
    t0 = time.perf_counter()
    if config.method == "exact":
        kl = exact_sensitivity(model, input_ids, reference_bits=ref,
                               batch_size=config.batch_size, progress=progress)
    else:
        kl = _probed(model, input_ids, config, objective, bits, progress)
    seconds = time.perf_counter() - t0
    bad = [(n, b, v) for n, row in kl.items() for b, v in zip(bits, row) if not math.isfinite(v)]
    if bad:
        (n, b, v), more = bad[0], f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise FloatingPointError(
            f"the sensitivity of {n} at {b} bits is {v}{more}: the model's output is not "
            "finite with that layer at that width; its weights, adapter or clips hold "
            "non-finite values, or the width overflows")
    log.info("sensitivity of %d layers x %d widths in %.1fs (%s)", len(layers), len(bits),
             seconds, config.method)
    settings = config.to_dict(objective)
    return SensitivityTable(
        bits=bits, group_size={b: spec.group_size_for(b) for b in bits},
        shapes={n: LayerShape(m.out_features, m.in_features) for n, m in layers.items()},
        kl=kl, fingerprint=fingerprint(model, input_ids, settings), settings=settings,
        seconds=seconds,
    )


def _probed(model: nn.Module, input_ids: Any, config: SensitivityConfig, objective: Objective,
            bits: tuple[int, ...], progress: bool) -> dict[str, tuple[float, ...]]:
    """The fast table's costs: ``{layer: cost per width}`` from the probes' accumulated
    products (module docstring)."""
    layers = elastic_layers(model)
    ref = config.reference_bits
    device = next(model.parameters()).device
    acc = _Accumulator(layers, _Deltas(bits, ref, config.cache_deltas), len(bits))
    gen = torch.Generator().manual_seed(config.seed)
    n_batches = -(-objective.size(input_ids) // config.batch_size)
    with _measuring(model):
        handles = [m.register_forward_hook(acc.hook(n)) for n, m in layers.items()]
        try:
            batches = objective.batches(input_ids, config.batch_size, device)
            for batch in tqdm(batches, total=n_batches, disable=not progress,
                              desc="sensitivity", leave=False):
                target = None
                if ref is not None:
                    set_bits(model, None)
                    with torch.no_grad():
                        target = objective.target(objective.output(model, batch))
                set_bits(model, ref)
                _probe_batch(model, batch, objective, acc, target, config.n_probes, gen)
        finally:
            for h in handles:
                h.remove()
    n_tok = objective.n_units(input_ids)
    return {n: tuple(((acc.lin[n] + 0.5 * acc.quad[n] / config.n_probes) / n_tok).tolist())
            for n in layers}
