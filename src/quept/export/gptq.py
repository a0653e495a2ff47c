"""GPTQ rounding on the elastic model's learned grid, for one width or plan at export time.

An elastic layer at width ``b`` rounds ``W + U V`` to the nearest level of a grid set by its
learned clips. Once a width (or a per-layer plan) is chosen for deployment, the rounding itself
can do better than nearest: GPTQ (Frantar et al., 2022) quantizes a layer's columns one at a
time and spreads each column's rounding error over the columns not yet quantized, weighted by
the inverse of the layer's input second moment ``H = X^T X`` on calibration data, which lowers
the layer's output error ``||(W - Q) X||``.

Here the grid is the elastic model's own: each group's scale and zero-point come from the
learned clip factors of that width, exactly as :func:`quept.ops.quant.quantize` sets them, so
the codes pack, export and load like any others. By default the rounding targets the frozen
base weight ``W`` without the adapter: the adapters were trained to make up for round-to-nearest
on that grid, an error GPTQ now handles itself (``GPTQConfig.adapters`` keeps them; measured,
that is worse: ``benchmarks/gptq_rounding.py``). Columns are taken in order of decreasing
``diag(H)`` (static activation order: the grid stays that of the original column groups).

Blocks are rounded in order, each on the inputs the already rounded blocks before it produce;
inside a block the layers see float inputs (one pass per block collects every ``H``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from quept.calib.capture import block_kwargs_on, capture_block_inputs
from quept.config import ConfigError, ElasticSpec
from quept.models import family_for
from quept.nn.elastic_linear import ElasticLinear
from quept.nn.switch import set_bits
from quept.ops.hadamard import hadamard_transform
from quept.ops.quant import qparams, to_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    """Settings of :func:`round_gptq`.

    damp: added to the diagonal of ``H`` as a fraction of its mean (0.01, GPTQ's default);
        raised tenfold, up to twice, where ``H`` is still not positive definite.
    block_size: columns quantized between two updates of the remaining columns (speed only).
    act_order: quantize columns in order of decreasing ``diag(H)``.
    adapters: round ``W + U V`` (the elastic weight) instead of the base ``W``.
    batch_size: calibration sequences per forward pass.
    device: where each block runs while it is rounded (it goes back where it was after).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    adapters: bool = False
    batch_size: int = 4
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ConfigError(f"GPTQ damp must be in (0, 1) (a fraction of H's mean diagonal), "
                              f"got {self.damp}")
        if self.block_size < 1 or self.batch_size < 1:
            raise ConfigError(f"GPTQ block_size and batch_size must be >= 1, got "
                              f"{self.block_size} and {self.batch_size}")


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, damping up where needed."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = torch.diag(h).mean()
    for k in range(3):
        d = damp * 10**k
        low, info = torch.linalg.cholesky_ex(h + d * mean * eye)
        if info == 0:
            if k:
                log.warning("%s: H needed damping %g to be positive definite", name, d)
            inv = torch.cholesky_inverse(low)
            up, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                return up
    raise FloatingPointError(f"{name}: the input second moment H is not positive definite even "
                             f"with damping {damp * 100:g} (are the calibration inputs finite "
                             "and varied?)")


@torch.no_grad()
def gptq_codes(
    w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, hi_f: torch.Tensor,
    lo_f: torch.Tensor, cfg: GPTQConfig = GPTQConfig(), name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes of ``w`` (out, in) on the grid of clip factors ``hi_f``/``lo_f`` (out, G).

    ``h`` (in, in) is the input second moment. Returns uint8 codes (out, in), scale and zero
    (out, G): the scale and zero that :func:`quept.ops.quant.quantize` gives ``w`` with the same
    clips, so ``dequantize(codes, scale, zero)`` differs from round-to-nearest only in which
    level each weight takes."""
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    n = w.shape[1]
    scale, zero = qparams(to_groups(w, group_size), bits, hi_f.float(), lo_f.float())
    scale, zero = scale.squeeze(-1), zero.squeeze(-1)
    qmax = 2**bits - 1
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    order = (torch.argsort(torch.diag(h), descending=True) if cfg.act_order
             else torch.arange(n, device=w.device))
    w, h = w[:, order], h[order][:, order]
    group = order // (group_size or n)  # 0: one group per row
    u = _inverse_cholesky(h, cfg.damp, name)
    codes = torch.empty_like(w)
    for c0 in range(0, n, cfg.block_size):
        c1 = min(c0 + cfg.block_size, n)
        wb = w[:, c0:c1].clone()
        err = torch.empty_like(wb)
        for j in range(c1 - c0):
            g = group[c0 + j]
            s, z = scale[:, g], zero[:, g]
            q = torch.clamp(torch.round(wb[:, j] / s) + z, 0, qmax)
            codes[:, c0 + j] = q
            e = (wb[:, j] - (q - z) * s) / u[c0 + j, c0 + j]
            wb[:, j:] -= e.unsqueeze(1) * u[c0 + j, c0 + j:c1].unsqueeze(0)
            err[:, j] = e
        w[:, c1:] -= err @ u[c0:c1, c1:]
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out.to(torch.uint8), scale, zero


def _collect_h(block: nn.Module, layers: Mapping[str, ElasticLinear], family, x: torch.Tensor,
               kwargs: dict, cfg: GPTQConfig) -> dict[str, tuple[torch.Tensor, int]]:
    """Every layer's ``sum x x^T`` and token count over one float pass of ``block`` on ``x``."""
    acc: dict[str, list] = {n: [None, 0] for n in layers}

    def hook(name: str, layer: ElasticLinear):
        def fn(_m: nn.Module, args: tuple) -> None:
            a = args[0]
            if layer.in_rotation:
                a = hadamard_transform(a)
            a = a.reshape(-1, a.shape[-1]).float()
            s = a.T @ a
            acc[name][0] = s if acc[name][0] is None else acc[name][0] + s
            acc[name][1] += a.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers.items()]
    try:
        set_bits(block, None)
        for i in range(0, x.shape[0], cfg.batch_size):
            family.call_block(block, x[i:i + cfg.batch_size].to(cfg.device), kwargs)
    finally:
        for hd in handles:
            hd.remove()
    return {n: (s, c) for n, (s, c) in acc.items()}


def check_rounding_request(model: nn.Module, widths: Mapping[str, int], what: str) -> ElasticSpec:
    """The spec of ``model`` once an export-time rounding (``what``) can be made for
    ``widths``: a weight-only elastic model with a width for every elastic layer."""
    spec = next((m.spec for m in model.modules() if isinstance(m, ElasticLinear)), None)
    if spec is None:
        raise ConfigError(f"{what} needs an elastic model (quept.prepare / quept.load)")
    if spec.activations != "none":
        raise ConfigError(f"{what} is for weight-only models; this one quantizes activations "
                          f"too ({spec.activations!r}): export it with the rounding it was "
                          "calibrated with")
    named = {n for n, m in model.named_modules() if isinstance(m, ElasticLinear)}
    missing = sorted(named - set(widths))
    if missing:
        raise ConfigError(f"{what} needs a width for every elastic layer; missing "
                          f"{len(missing)}, e.g. {missing[0]}")
    return spec


@torch.no_grad()
def round_gptq(
    model: nn.Module, widths: Mapping[str, int], inputs: torch.Tensor,
    cfg: GPTQConfig = GPTQConfig(), progress: bool = True,
) -> dict[str, float | int]:
    """Round every elastic layer at its width in ``widths`` ({layer name: bits}) by GPTQ on
    calibration ``inputs`` (token ids (N, T), or pixel values), and install the codes on the
    layers (``ElasticLinear.rounded``): the model's forward at those widths and every export
    then use them. Other widths keep round-to-nearest; :func:`clear_rounding` removes them.
    Returns {"layers": n, "seconds": s}."""
    spec = check_rounding_request(model, widths, "GPTQ rounding")
    family = family_for(model)
    t0 = time.perf_counter()
    set_bits(model, None)
    home = next(model.parameters()).device  # where the model lives; blocks come back there
    x, kwargs = capture_block_inputs(model, family, inputs, cfg.batch_size, str(home))
    kwargs_of = block_kwargs_on(kwargs, cfg.device)
    blocks = family.get_blocks(model)
    prefix = {id(b): n for n, b in model.named_modules()}
    done = 0
    bar = tqdm(total=len(blocks), disable=not progress, unit="block", desc="GPTQ rounding")
    try:
        for i, block in enumerate(blocks):
            block.to(cfg.device)
            kw = kwargs_of(i)
            base = prefix[id(block)]
            layers = {n: m for n, m in block.named_modules() if isinstance(m, ElasticLinear)}
            hs = _collect_h(block, layers, family, x, kw, cfg)
            for n, m in layers.items():
                full = f"{base}.{n}"
                b = widths[full]
                s, count = hs[n]
                if s is None or count == 0:
                    raise ConfigError(f"{full} saw no input in its block's forward pass; GPTQ "
                                      "rounding cannot weigh its columns")
                w = m.weight + m.delta(b) if cfg.adapters else m.weight
                m.rounded[b] = gptq_codes(w, 2 * s / count, b, spec.group_size_for(b),
                                          *m.clip_factors(b), cfg=cfg, name=full)
                m.set_bits(b)
                done += 1
            out = torch.empty_like(x)
            for j in range(0, x.shape[0], cfg.batch_size):
                out[j:j + cfg.batch_size] = family.call_block(
                    block, x[j:j + cfg.batch_size].to(cfg.device), kw).float().cpu()
            x = out
            exit_module = family.block_exit(model, i)
            if exit_module is not None:
                exit_module.to(cfg.device)
                x = torch.cat([family.call_exit(exit_module, x[j:j + cfg.batch_size]
                                                .to(cfg.device), kw).float().cpu()
                               for j in range(0, x.shape[0], cfg.batch_size)])
                exit_module.to(home)
            block.to(home)
            bar.update()
    finally:
        bar.close()
    set_bits(model, dict(widths))
    return {"layers": done, "seconds": time.perf_counter() - t0}


def clear_rounding(model: nn.Module) -> nn.Module:
    """Drop every layer's export-time codes (GPTQ or learned): each width rounds to nearest
    again."""
    model.__dict__.pop("quept_rounding", None)
    for m in model.modules():
        if isinstance(m, ElasticLinear):
            m.rounded.clear()
            m.clear_cache()
    return model
