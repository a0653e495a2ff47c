"""Typed, validated configuration: the one place where bit groups, ranks, group sizes and
merge weights live.

``ElasticSpec`` says *what* the elastic model is (which widths, how they are grouped, adapter
ranks, quantization granularity, token-merge weights). ``CalibConfig`` says *how* it is
calibrated (data size, epochs, learning rates, seed). Both are frozen dataclasses validated in
``__post_init__`` and round-trip through plain dicts carrying a format version.
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

# ConfigError lives in quept.checks (which must not import this module) and is re-exported
# here: quept.config.ConfigError stays public
from quept.checks import ConfigError, check_bits, check_count

# Widths whose clips stay at the searched value unless a spec says otherwise (ElasticSpec).
DEFAULT_FIXED_CLIP_BITS = (7, 8)
CONFIG_VERSION = 1
# Weight+activation mode (DESIGN 2.5): the activation quantizers and their default bit groups.
ACTIVATION_MODES = ("none", "per-token", "per-tensor")
ROTATIONS = ("none", "hadamard")
KV_KEYS = "after-rotary"  # where the KV quantizer reads the keys (spec.to_dict records it)
MIN_ACT_BITS = 4
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed
MAX_CLIP_REFINE = 10
WEIGHT_ACT_GROUPS = ((7, 8), (5, 6), (4,))


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as an int, refused unless it is one from 0 to :data:`MAX_SEED`."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, (bool, np.bool_)) or not (
            0 <= seed <= MAX_SEED):
        raise ConfigError(f"{what} must be an integer from 0 to 2**63 - 1 (torch's generators "
                          f"take 63 bits), got {_brief_value(seed)}")
    return int(seed)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A config class's field annotations, resolved once."""
    return typing.get_type_hints(cls)


def _check_types(obj: Any) -> None:
    """Refuse a field of ``obj`` (a config dataclass, before its values are coerced) whose
    value is not of the annotated kind: 8.7 for a rank, "0.1" for a rate, True for a seed."""
    hints = _hints(type(obj))
    for f in fields(obj):
        v = _tupled(getattr(obj, f.name))
        if not _fits(v, hints[f.name]):
            hint = hints[f.name]
            kind = hint.__name__ if isinstance(hint, type) else str(hint)
            raise ConfigError(f"{type(obj).__name__} field {f.name!r} must be {kind}, got "
                              f"{_brief_value(getattr(obj, f.name))}")
        if isinstance(v, numbers.Number) and not isinstance(v, (int, float)):  # numpy, torch
            object.__setattr__(obj, f.name, int(v) if isinstance(v, numbers.Integral)
                               else float(v))


def _tupled(value: Any) -> Any:
    """``value`` with its lists (and lists in them) made tuples, as the fields hold them."""
    if isinstance(value, (list, tuple)):
        return tuple(_tupled(v) for v in value)
    return value


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (read from JSON, lists made tuples) is of the annotated type ``hint``
    (int, float, str, bool, None, unions and tuples of these)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (int, float):  # numpy and torch scalars too; never a bool
        kind = numbers.Integral if hint is int else numbers.Real
        return isinstance(value, kind) and not isinstance(value, (bool, np.bool_))
    return True


def _brief_value(value: Any) -> str:
    """``value`` in a message: its type, and its text when that is short."""
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 80 else type(value).__name__


@dataclass(frozen=True)
class ElasticSpec:
    """What the elastic model is.

    bit_groups: widths partitioned into groups ordered from high to low bits; each group shares
        one adapter prefix (MB-CLoRA) and one bit is drawn per group per step.
    ranks: adapter rank added by each group (nested prefixes: group g uses the first
        ``sum(ranks[:g+1])`` ranks). Clamped per layer to ``min(in, out)``.
    group_size: quantization group size per bit as ``((bit, size), ...)``; 0 means per output
        channel. Widths not listed use ``default_group_size``.
    merge_weights: MB-ToMe mixing weight per group (sum to 1).
    merge_top_p: share of tokens (most similar between highest and lowest group) that keep the
        highest-bit feature.
    clip_init: initial clip logit (sigmoid(4.0) ~ 0.982) of widths not searched.
    clip_search_bits: widths whose clip logits start, at the start of each block's calibration,
        from a per-group search (the factor in 1.0, 0.95, ... 0.5 minimising the quantization
        error weighted by the mean squared float input per channel); low widths need far smaller
        clips than 0.98 and a short CPU calibration cannot travel that far.
        None (default) = every width.
    stream: "merged" (paper: one quantized stream, MB-ToMe merges the groups' outputs) or
        "per-group" (each bit group keeps its own quantized stream; same compute, G x memory).
    unclipped_bits: widths quantized over the full min..max range of ``W + R``: their clips are
        neither searched nor learned.
    fixed_clip_bits: widths whose clips keep the value the search gives them and are not
        learned; None (default) = :data:`DEFAULT_FIXED_CLIP_BITS`, those of them in the spec.
        At 7-8 bits one quantization step is under 1% of a group's range, less than one Adam
        step moves a clip, so a short calibration only adds noise there (docs/pitfalls.md).
    clip_refine: rounds of coordinate descent after the clip search, over the same grid: the
        max factor with the min factor held, then the reverse (the search alone ties them; one
        round lowered the error enough that a second changed perplexity by < 0.1%); 0 = tied.
    protect_outliers: super-weight protection; 0 (default) = off. In each block's float pass
        a weight W[r, j] counts as a super weight when its largest contribution
        ``|W[r, j]| * max_t |x[t, j]|`` exceeds ``protect_outliers`` times the median over rows
        of each row's largest contribution (100 picks the few weights that create or cancel a
        model's massive activation). Its group's clip on its side (max or min) is held at 1 at
        every width, so the weight stays the group's exact top (or bottom) level; left free, a
        2-bit clip can cut it and the massive activation it makes is lost (docs/pitfalls.md).

    activations: "none" (default, weight-only) or "per-token": the input of every quantized
        linear is also quantized, per token (one scale per row of the input), symmetric, at the
        layer's own width, computed on the fly (W4A4..W8A8; DESIGN 2.5). Widths below 4 are
        refused with it. "per-tensor": static quantizers for vision transformers (DESIGN
        2.5): the input of every quantized linear goes through one asymmetric quantizer per
        width with a learnable step (trained with the block, at CalibConfig.lr_act) and a fixed
        zero-point, both initialised by a percentile search on the block's float inputs; the
        inputs of the linears after a LayerNorm are first made uniform across channels by a
        RepQ-ViT-style reparameterisation (per-channel scale and shift folded into the norm and
        the linears after it, :mod:`quept.models.reparam`). Quantized: the inputs of the q, k,
        v, o and MLP linears; not quantized: the attention matmuls (queries, keys, the
        softmax output), norms and residual adds.
    rotation: "none" (default) or "hadamard": before the linears are wrapped, a LLaMA-family
        decoder is rotated (norms folded, residual stream by a seeded random Hadamard matrix,
        value heads, down_proj's input online; :mod:`quept.models.rotate`), which spreads
        the activation outliers that ruin W4A4; the float model's function is unchanged.
    kv_bits: None (default) or a width 2..8 for the KV cache of a decoder: the keys and values
        (what k_proj and v_proj give, bias included) are quantized per token and per head,
        asymmetric (min/max of each head's ``head_dim`` features), at this one width whatever
        the weights' width (DESIGN 2.5). With a power-of-two ``head_dim`` each head is
        quantized in a Hadamard-rotated basis (``H Q(H x)``), which spreads outlier channels.
        Keys are quantized after the rotary embedding (in the attention, :mod:`quept.nn.kv`),
        so a cache of codes holds exactly what the attention reads. Calibration sees it: the
        quantized stream runs with it at every width.

    A bit group whose adapter prefix is empty (rank 0) and whose widths all have fixed or no
    clips has nothing to learn: calibration skips its training passes (its loss is still probed
    and its stream still propagated).
    """

    bit_groups: tuple[tuple[int, ...], ...] = ((7, 8), (5, 6), (3, 4), (2,))
    ranks: tuple[int, ...] = (0, 16, 8, 8)
    default_group_size: int = 64
    group_size: tuple[tuple[int, int], ...] = ()
    merge_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    merge_top_p: float = 0.5
    clip_init: float = 4.0
    clip_search_bits: tuple[int, ...] | None = None
    stream: str = "per-group"
    unclipped_bits: tuple[int, ...] = ()
    fixed_clip_bits: tuple[int, ...] | None = None
    clip_refine: int = 1
    protect_outliers: float = 0.0
    activations: str = "none"
    rotation: str = "none"
    kv_bits: int | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        groups = tuple(tuple(int(b) for b in g) for g in self.bit_groups)
        object.__setattr__(self, "bit_groups", groups)
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(
            self, "group_size", tuple((int(b), int(s)) for b, s in self.group_size)
        )
        object.__setattr__(self, "merge_weights", tuple(float(w) for w in self.merge_weights))
        object.__setattr__(self, "unclipped_bits", tuple(int(b) for b in self.unclipped_bits))
        if self.fixed_clip_bits is not None:
            object.__setattr__(
                self, "fixed_clip_bits", tuple(int(b) for b in self.fixed_clip_bits)
            )
        if self.clip_search_bits is not None:
            object.__setattr__(
                self, "clip_search_bits", tuple(int(b) for b in self.clip_search_bits)
            )
        if not groups or any(not g for g in groups):
            raise ConfigError("bit_groups must be a non-empty list of non-empty groups")
        flat = [b for g in groups for b in g]
        for b in flat:
            check_bits(b)
        if len(set(flat)) != len(flat):
            raise ConfigError(f"a bit-width appears in two groups: {groups}")
        for hi, lo in zip(groups, groups[1:]):
            if min(hi) <= max(lo):
                raise ConfigError(
                    f"bit_groups must be ordered from high to low without overlap, got {groups}"
                )
        if not math.isfinite(self.clip_init):
            raise ConfigError(f"clip_init must be a finite logit (4.0 = sigmoid 0.982), got "
                              f"{self.clip_init}")
        if not 0 <= self.clip_refine <= MAX_CLIP_REFINE:
            raise ConfigError(f"clip_refine must be from 0 to {MAX_CLIP_REFINE} rounds (one "
                              f"already settles the clips; docs/method.md), got "
                              f"{self.clip_refine}")
        object.__setattr__(self, "protect_outliers", float(self.protect_outliers))
        if not (self.protect_outliers == 0 or self.protect_outliers > 1):
            raise ConfigError("protect_outliers must be 0 (off) or a ratio > 1 (e.g. 100), got "
                              f"{self.protect_outliers}")
        if self.activations not in ACTIVATION_MODES:
            raise ConfigError(f"activations must be one of {list(ACTIVATION_MODES)}, got "
                              f"{self.activations!r}")
        if self.activations != "none" and min(flat) < MIN_ACT_BITS:
            raise ConfigError(
                f"activation quantization covers W{MIN_ACT_BITS}A{MIN_ACT_BITS}..W8A8; widths "
                f"{sorted(b for b in flat if b < MIN_ACT_BITS)} are below {MIN_ACT_BITS}; "
                f"quept.weight_act_spec(spec, {self.activations!r}) gives the spec in that mode "
                f"(bit groups {[list(g) for g in WEIGHT_ACT_GROUPS]}, their ranks and merge "
                "weights, 7 and 8 bits unclipped), as the command line's --activations does")
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"rotation must be one of {list(ROTATIONS)}, got {self.rotation!r}")
        if self.kv_bits is not None:
            if not 2 <= self.kv_bits <= 8:
                raise ConfigError(f"kv_bits must be an integer from 2 to 8 (or None: the KV "
                                  f"cache stays float), got {self.kv_bits!r}")
        if len(self.ranks) != len(groups):
            raise ConfigError(
                f"ranks has {len(self.ranks)} entries but there are {len(groups)} bit groups"
            )
        if any(r < 0 for r in self.ranks):
            raise ConfigError(f"ranks must be >= 0, got {self.ranks}")
        if len(self.merge_weights) != len(groups):
            raise ConfigError(
                f"merge_weights has {len(self.merge_weights)} entries for {len(groups)} groups"
            )
        if any(w < 0 for w in self.merge_weights) or not math.isclose(
            sum(self.merge_weights), 1.0, abs_tol=1e-6
        ):
            raise ConfigError(f"merge_weights must be >= 0 and sum to 1, got {self.merge_weights}")
        if not 0.0 <= self.merge_top_p <= 1.0:
            raise ConfigError(f"merge_top_p must lie in [0, 1], got {self.merge_top_p}")
        for b, s in self.group_size:
            if b not in flat:
                raise ConfigError(f"group_size names bit {b}, which is in no bit group")
            _check_group_size(s)
        _check_group_size(self.default_group_size)
        for b in self.clip_search_bits or ():
            if b not in flat:
                raise ConfigError(f"clip_search_bits names bit {b}, which is in no bit group")
        if self.stream not in ("merged", "per-group"):
            raise ConfigError(f"stream must be 'merged' or 'per-group', got {self.stream!r}")
        for name in ("unclipped_bits", "fixed_clip_bits"):
            for b in getattr(self, name) or ():
                if b not in flat:
                    raise ConfigError(f"{name} names bit {b}, which is in no bit group")
        both = sorted(set(self.unclipped_bits) & set(self.fixed_clip_bits or ()))
        if both:
            raise ConfigError(f"width(s) {both} are in both unclipped_bits (no clip at all) and "
                              "fixed_clip_bits (the searched clip, kept): name each in one")

    @property
    def bits(self) -> tuple[int, ...]:
        """All widths, high to low."""
        return tuple(sorted((b for g in self.bit_groups for b in g), reverse=True))

    def group_of(self, bits: int) -> int:
        """Index of the group holding ``bits``."""
        check_bits(bits, self.bits)
        return next(i for i, g in enumerate(self.bit_groups) if bits in g)

    def rank_prefix(self, group: int) -> int:
        """Adapter rank used by ``group`` (nested prefix)."""
        return sum(self.ranks[: group + 1])

    @property
    def search_bits(self) -> tuple[int, ...]:
        """Widths whose clips start from the activation-aware search."""
        bits = self.bits if self.clip_search_bits is None else self.clip_search_bits
        return tuple(b for b in bits if b not in self.unclipped_bits)

    @property
    def learned_clip_bits(self) -> tuple[int, ...]:
        """Widths whose clip logits calibration trains (high to low)."""
        fixed = DEFAULT_FIXED_CLIP_BITS if self.fixed_clip_bits is None else self.fixed_clip_bits
        frozen = set(self.unclipped_bits) | set(fixed)
        return tuple(b for b in self.bits if b not in frozen)

    def group_trains(self, group: int) -> bool:
        """Whether calibration has anything to learn for ``group``: an adapter prefix or a
        learned clip."""
        return self.rank_prefix(group) > 0 or any(
            b in self.learned_clip_bits for b in self.bit_groups[group]
        )

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    def group_size_for(self, bits: int) -> int:
        """Group size at ``bits`` (0 = per output channel)."""
        return dict(self.group_size).get(bits, self.default_group_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bit_groups"] = [list(g) for g in self.bit_groups]
        d["group_size"] = {str(b): s for b, s in self.group_size}
        if not self.protect_outliers:  # written only when set: older folders match
            del d["protect_outliers"]
        for name in ("activations", "rotation"):  # written only when set
            if d[name] == "none":
                del d[name]
        if d["kv_bits"] is None:
            del d["kv_bits"]
        else:  # earlier folders quantized keys before the rotary embedding: told apart by this
            d["kv_keys"] = KV_KEYS
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ElasticSpec:
        d = dict(d)
        if d.get("kv_bits") is not None and d.pop("kv_keys", None) != KV_KEYS:
            raise ConfigError("this folder's KV cache was calibrated with keys quantized before "
                              "the rotary embedding (an earlier quept); this quept quantizes "
                              "them after it: calibrate again with --kv-bits")
        # Folders written before fixed_clip_bits existed learned the clips of every width.
        d.setdefault("fixed_clip_bits", ())
        d.setdefault("clip_refine", 0)  # ... and searched one clip factor for max and min
        gs = d.pop("group_size", {})
        pairs = list(gs.items()) if isinstance(gs, dict) else gs
        try:
            gs = tuple((int(b), s) for b, s in pairs)
        except (TypeError, ValueError):
            raise ConfigError(f"ElasticSpec field 'group_size' must map widths to group sizes, "
                              f"got {_brief_value(gs)}") from None
        if not all(_fits(s, int) for _, s in gs):
            raise ConfigError(f"ElasticSpec field 'group_size' must map widths to whole "
                              f"numbers, got {_brief_value(dict(gs))}")
        return cls(group_size=gs, **_known(cls, d))


def _check_group_size(size: int) -> None:
    if size < 0:
        raise ConfigError(f"group size must be 0 (per channel) or positive, got {size}")


@dataclass(frozen=True)
class CalibConfig:
    """How calibration runs (DESIGN 2.3/2.4).

    n_samples x seq_len tokens of calibration text, mini-batches of batch_size, epochs passes per
    block, AdamW (no weight decay) with lr_adapter for U/V and lr_clip for the clip logits, cosine
    decay per step. loss: "l1" (paper) or "l2". draw: how each step picks the width of a
    group, "random" (independently every step) or "balanced" (without replacement: each width of
    the group once, in random order, before any repeats, so a short calibration trains them
    equally). seed drives the sample draw, the adapter init and
    the bit sampler. device: where a block trains ("cpu", "cuda", ...); caches stay on CPU
    in float32. lr_adapter_groups: one adapter rate per bit group, applied to the slice of U/V
    that group adds (MB-CLoRA: a group uses its own slice and those of the groups above it), in
    place of lr_adapter; None = lr_adapter for every slice. massive_ratio: 0 (default) = off;
    otherwise the training loss also adds the mean relative error ``|y_q - y| / |y|`` over the
    elements of the float block output ``y`` whose magnitude exceeds ``massive_ratio`` times the
    batch's median magnitude (a massive activation: one element in ~10^5, which the L1 mean
    barely sees, yet a low width that loses it changes every later block; docs/pitfalls.md),
    counting only the part of each element's relative error over massive_slack (default 0.5),
    so widths that keep the values train exactly as without the term. The logged block losses
    stay the plain ones. lr_act: the rate of the log-steps of static activation quantizers
    (ElasticSpec.activations "per-tensor"). bf16: run the training steps' block forward and
    backward under bfloat16 autocast (parameters, fake-quantized weights, optimizer and the
    block streams stay float32); faster only where the CPU or GPU has bfloat16 matmuls.
    """

    n_samples: int = 24
    seq_len: int = 256
    batch_size: int = 2
    epochs: int = 1
    lr_adapter: float = 2e-3
    lr_clip: float = 0.3
    loss: str = "l1"
    seed: int = 0
    device: str = "cpu"
    draw: str = "random"
    lr_adapter_groups: tuple[float, ...] | None = None
    massive_ratio: float = 0.0
    massive_slack: float = 0.5
    lr_act: float = 1e-2
    bf16: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        check_seed(self.seed)
        object.__setattr__(self, "massive_ratio", float(self.massive_ratio))
        object.__setattr__(self, "massive_slack", float(self.massive_slack))
        if not (self.massive_ratio == 0 or 1 < self.massive_ratio < math.inf):
            raise ConfigError("massive_ratio must be 0 (off) or a finite ratio > 1 (e.g. 1000), got "
                              f"{self.massive_ratio}")
        if not 0 <= self.massive_slack < 1:
            raise ConfigError("massive_slack must be in [0, 1) (a relative error), got "
                              f"{self.massive_slack}")
        if self.lr_adapter_groups is not None:
            rates = tuple(float(r) for r in self.lr_adapter_groups)
            if not rates or not all(0 <= r < math.inf for r in rates):
                raise ConfigError("lr_adapter_groups must be one finite rate >= 0 per bit "
                                  f"group, got {self.lr_adapter_groups!r}")
            object.__setattr__(self, "lr_adapter_groups", rates)
        for name in ("n_samples", "seq_len", "batch_size", "epochs"):
            check_count(getattr(self, name), name)
        if self.batch_size > self.n_samples:
            raise ConfigError(
                f"batch_size {self.batch_size} exceeds n_samples {self.n_samples}"
            )
        for name in ("lr_adapter", "lr_clip", "lr_act"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be a finite rate >= 0, got "
                                  f"{getattr(self, name)}")
        if self.draw not in ("random", "balanced"):
            raise ConfigError(f"draw must be 'random' or 'balanced', got {self.draw!r}")
        if self.loss not in ("l1", "l2"):
            raise ConfigError(f"loss must be 'l1' or 'l2', got {self.loss!r}")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["lr_adapter_groups"] is None:  # written only when set: older folders match
            del d["lr_adapter_groups"]
        if not d["massive_ratio"]:  # the term's fields are written only when it is on
            del d["massive_ratio"], d["massive_slack"]
        if d["lr_act"] == CalibConfig.lr_act:  # written only when changed
            del d["lr_act"]
        if not d["bf16"]:
            del d["bf16"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibConfig:
        return cls(**_known(cls, d))


# What each preset calibrates: on the CPU budget the top group (7-8 bits) keeps its searched
# clips and no adapter (docs/method.md: a dozen steps only add noise there); the paper trains every group.
PRESET_SPECS: dict[str, ElasticSpec] = {
    "cpu-demo": ElasticSpec(),
    # The 3-4 bit group split in two, so W4 and W3 each train an adapter slice of their own,
    # wider slices below 4 bits (prefixes 0/16/24/48/144) and super weights held exact:
    # docs/peers.md.
    "cpu-long": ElasticSpec(bit_groups=((7, 8), (5, 6), (4,), (3,), (2,)),
                            ranks=(0, 16, 8, 24, 96), merge_weights=(0.2,) * 5,
                            protect_outliers=100.0),
    "paper": ElasticSpec(ranks=(8, 8, 8, 8), fixed_clip_bits=()),
}



def weight_act_spec(spec: ElasticSpec | None = None, mode: str = "per-token") -> ElasticSpec:
    """``spec`` (default: the cpu-demo spec) in weight+activation mode: activations quantized
    the ``mode`` way (per-token, or per-tensor static quantizers), and, when ``spec`` has
    widths below 4, the weight+activation bit groups
    {7,8} {5,6} {4} with ranks 0/16/8 and merge weights 0.3/0.3/0.4 (DESIGN 2.4), 7 and 8
    bits unclipped (their searched clips cost 0.7% of perplexity at W7A7 on the default
    model, where no clip is RTN exactly; docs/weight-activation.md)."""
    spec = spec or ElasticSpec()
    if min(spec.bits) >= MIN_ACT_BITS:
        return replace(spec, activations=mode)
    keep = tuple(b for b in (spec.fixed_clip_bits or ()) if b >= MIN_ACT_BITS)
    return replace(spec, bit_groups=WEIGHT_ACT_GROUPS, ranks=(0, 16, 8),
                   merge_weights=(0.3, 0.3, 0.4), activations=mode,
                   group_size=tuple((b, g) for b, g in spec.group_size if b >= MIN_ACT_BITS),
                   unclipped_bits=tuple(sorted({b for b in spec.unclipped_bits
                                                if b >= MIN_ACT_BITS} | {7, 8})),
                   fixed_clip_bits=None if spec.fixed_clip_bits is None else keep,
                   clip_search_bits=None if spec.clip_search_bits is None else tuple(
                       b for b in spec.clip_search_bits if b >= MIN_ACT_BITS))


PRESETS: dict[str, CalibConfig] = {
    # Fits the 2-core CPU demo budget (docs/method.md, CPU defaults, says why these values).
    "cpu-demo": CalibConfig(),
    # The most accurate CPU setting measured (docs/peers.md: ties or wins at every
    # width): the peers' 32 x 256 windows, 16 passes per block, adapter rate 1e-3 for the
    # slices W4-W6 use and 3e-3 for those only W3 and W2 use, a lower clip rate, and the
    # massive-activation term (so the 2-bit stream keeps the first token's massive value);
    # 36-90 minutes on 2 cores for SmolLM2-135M, depending on the CPU.
    "cpu-long": CalibConfig(n_samples=32, epochs=16, lr_adapter=1e-3,
                            lr_adapter_groups=(1e-3, 1e-3, 1e-3, 3e-3, 3e-3), lr_clip=0.1,
                            massive_ratio=1000.0),
    # The paper's LLM setting: 128 x 2048-token samples, batch 2, 15 epochs, on a GPU.
    "paper": CalibConfig(
        n_samples=128, seq_len=2048, batch_size=2, epochs=15, lr_adapter=7e-4, lr_clip=2e-2,
        device="cuda",
    ),
}


@dataclass(frozen=True)
class QuEPTConfig:
    """Everything that defines an elastic artifact: the spec, the calibration and provenance."""

    spec: ElasticSpec = field(default_factory=ElasticSpec)
    calib: CalibConfig = field(default_factory=CalibConfig)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "spec": self.spec.to_dict(), "calib": self.calib.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuEPTConfig:
        version = d.get("version") if isinstance(d, dict) else None
        if isinstance(d, dict) and version != CONFIG_VERSION:
            raise ConfigError(
                f"config version {version!r} is not supported (this quept reads {CONFIG_VERSION})"
            )
        if not isinstance(d, dict) or not all(isinstance(d.get(k), dict)
                                              for k in ("spec", "calib")):
            raise ConfigError("a quept config is a JSON object with 'version', 'spec' and "
                              f"'calib' (objects), got {_brief_value(d)}")
        return cls(
            spec=ElasticSpec.from_dict(d["spec"]), calib=CalibConfig.from_dict(d["calib"])
        )

    def replace(self, **kw: Any) -> QuEPTConfig:
        return replace(self, **kw)




def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(names)}")
    out = {k: v for k, v in d.items() if k in names}
    for k, v in out.items():
        if isinstance(v, list):
            out[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return out  # each value's kind is checked by the class (_check_types)
