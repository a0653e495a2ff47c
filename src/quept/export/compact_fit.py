"""Fitting the compact elastic checkpoint: its tensors, computed from an elastic model.

Per elastic linear the checkpoint stores (bits per weight of the default model in brackets):

- the *master*: the float weight as 8-bit codes on a grid from each group's minimum to its
  maximum (groups of 64), both ends in fp16 [8.5];
- the adapters ``U`` (out x r) and ``V`` (r x in) as symmetric int8 per row, float32 row
  scales [~0.79];
- the clip factors ``sigmoid(clip logit)`` of every width and side (hi/lo) as codes into a
  1-D k-means codebook of that tensor (fp16), 8 bits at width 2, 7 at 3, 6 at 4-5, 5 at 6,
  2 at 7-8 (:data:`DEFAULT_CLIP_BITS`); a width whose factors are all equal (unclipped) stores
  one value and no codes [2 x (8 + 7 + 6 + 6 + 5) / 64 = 1.0 with widths 7-8 unclipped];
- the bias, if any, as is.

The codes are chosen for what the restored model computes, not for the float values: of the
two master codes around each weight, the one under which the restored layer gives the elastic
layer's integer codes at the widths that matter most (:func:`_matched_master`); of the
codebook entries up to :data:`CLIP_REACH` levels around each clip factor, the pair that gives
the group's fake-quantized weights closest to the elastic layer's (:func:`_matched_clip_codes`),
so the clips also absorb what the master's rounding moved (2-bit clips keep their nearest
codes: there matching cost perplexity).

:class:`CompactConfig` sets the widths; :mod:`quept.export.compact` writes the tensors
(:func:`compact_tensors`) to a folder and restores a model from them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quept.export.packed import PackedFormatError
from quept.nn.elastic_linear import ElasticLinear
from quept.nn.switch import elastic_layers
from quept.ops.pack import pack
from quept.ops.quant import fake_quant, quantize

MAX_CLIP_LOGIT = 20.0  # sigmoid(20) == 1.0 in float32: an unclipped width stays unclipped
# Bits per stored clip factor, per width: a clip one level off moves a whole group's grid, which
# costs most at the low widths (one code step is a large part of the weight there). The 2-bit
# clips keep their nearest codes (CLIP_REACH), so they get the finest book: with 7 bits the
# default model's 2-bit perplexity moved by -1.2% over 32 windows, with 8 by +0.1%. Clips
# learned at 7-8 bits barely move from their start, and four matched levels keep a folder with
# them (the default `quept quantize`) under 10.5 bits per weight; unclipped widths store none.
DEFAULT_CLIP_BITS = {2: 8, 3: 7, 4: 6, 5: 6, 6: 5, 7: 2, 8: 2}
# Codebook levels on either side of a clip factor's nearest code that the matching tries, per
# width. At 2 bits the matched clips came out worse than the nearest ones on the default model
# (perplexity +2.0% over 32 windows, the nearest 7-bit codes -0.3% over 16; rounding its 2-bit
# clip logits to fp16 alone moves it by 0.24%); from 3 bits up matching wins (+0.1% against
# +1.2% at 3 bits, 16 windows).
CLIP_REACH = {2: 0, 3: 3, 4: 3, 5: 3, 6: 3, 7: 3, 8: 3}
CLIP_ROUNDS = 2  # rounds of coordinate descent over (hi, lo) in the clip matching

ClipBits = int | Mapping[int, int]


@dataclass(frozen=True)
class CompactConfig:
    """How the compact checkpoint stores each part (adapters are always int8).

    master_bits: width of the master weight codes (2..8).
    master_group_size: their group size; a layer whose width it does not divide uses 32, or
        one group per row.
    clip_bits: width of each stored clip factor (2..8): one number for every width, or a
        mapping width -> bits (a width it leaves out gets its :data:`DEFAULT_CLIP_BITS`). A
        tensor of clip factors that are all equal (an unclipped width) is stored with no codes.
    """

    master_bits: int = 8
    master_group_size: int = 64
    clip_bits: ClipBits = field(default_factory=lambda: dict(DEFAULT_CLIP_BITS))

    def __post_init__(self) -> None:
        if not 2 <= self.master_bits <= 8:
            raise PackedFormatError(f"master_bits must lie in 2..8, got {self.master_bits}")
        bits = ({int(k): v for k, v in self.clip_bits.items()}
                if isinstance(self.clip_bits, Mapping) else self.clip_bits)
        for v in (bits.values() if isinstance(bits, dict) else [bits]):
            if not isinstance(v, int) or not 2 <= v <= 8:
                raise PackedFormatError(f"clip_bits must lie in 2..8, got {self.clip_bits}")
        for w in (bits if isinstance(bits, dict) else ()):
            if not 2 <= w <= 8:
                raise PackedFormatError(f"clip_bits names width {w}, not a width quept "
                                        f"quantizes to (2..8): {self.clip_bits}")
        object.__setattr__(self, "clip_bits", bits)
        if self.master_group_size < 0:
            raise PackedFormatError(f"master_group_size must be >= 0: {self.master_group_size}")

    def clip_bits_for(self, width: int) -> int:
        """Bits per stored clip factor of ``width``."""
        if isinstance(self.clip_bits, int):
            return self.clip_bits
        return self.clip_bits.get(width, DEFAULT_CLIP_BITS.get(width, 8))

    def group_size(self, in_features: int) -> int:
        """The master's group size for a layer of ``in_features`` inputs."""
        for gs in (self.master_group_size, 32):
            if gs and in_features % gs == 0:
                return gs
        return 0


def _int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 and float32 row scales."""
    scale = (t.abs().amax(-1) / 127).clamp(min=1e-30)
    return torch.round(t / scale.unsqueeze(-1)).to(torch.int8), scale


def _codebook(a: torch.Tensor, levels: int, iters: int = 25) -> torch.Tensor:
    """Sorted 1-D k-means codebook (``levels`` float32 values) of the factors ``a``.

    The learned clip factors pile up at the search grid's top (0.999) with a long tail down to
    ~0.15 at 2 bits; uniform codes over min..max waste most levels on empty stretches."""
    x = a.reshape(-1).float()
    c = torch.quantile(x, torch.linspace(0, 1, levels)).unique()
    for _ in range(iters):
        idx = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        cnt = torch.zeros_like(c).index_add_(0, idx, torch.ones_like(x))
        c = torch.where(cnt > 0, sums / cnt.clamp(min=1), c)
    c = torch.cat([c, c[-1:].expand(levels - c.numel())]) if c.numel() < levels else c
    return c.half().float().sort().values


def _book_bits(bits: int, n: int) -> int:
    """Code width for ``n`` factors: ``bits``, but at most ``n / 4`` levels, so that in a small
    layer the fp16 codebook costs no more than 4 bits per factor (no SmolLM2 layer is capped)."""
    return max(2, min(bits, int(math.log2(n)) - 2))


def _clip_factor(codes: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Clip factor from its stored code, through the logit the restored model holds."""
    a = book.float()[codes.long()]
    return torch.sigmoid(torch.logit(a.double()).clamp(max=MAX_CLIP_LOGIT).float())


def _clip_candidates(a: torch.Tensor, book: torch.Tensor, reach: int) -> tuple[torch.Tensor, ...]:
    """Codes of every factor in ``a``: the nearest first, then those up to ``reach`` codebook
    levels on either side of it (an edge code repeats where the book ends)."""
    near = torch.bucketize(a, (book[1:] + book[:-1]) / 2)
    top = book.numel() - 1
    return (near, *((near + k).clamp(0, top) for k in range(-reach, reach + 1) if k))


def _matched_clip_codes(m: ElasticLinear, cfg: CompactConfig, master: torch.Tensor,
                        u: torch.Tensor, v: torch.Tensor
                        ) -> dict[tuple[str, int], tuple[torch.Tensor | None, torch.Tensor]]:
    """Per (side, width): (codes, codebook). Each tensor of clip factors gets its own
    ``2^clip_bits``-entry codebook, or a single entry and no codes when all its factors are
    equal (an unclipped width). Of the codebook entries up to :data:`CLIP_REACH` levels (per
    width) around each group's hi and lo factor, the pair is kept under which the restored
    layer (``master`` weight, adapters ``u``/``v``) gives fake-quantized weights closest to
    the elastic layer's at that width. A clip off by one level moves the whole group's grid;
    trying a few levels either way lets the clip take back what the master's rounding moved
    (with one level each way, a finer codebook came out worse)."""
    w = m.weight.detach().float()
    out: dict[tuple[str, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
    for b in m.spec.bits:
        factors = {name: torch.sigmoid(side[str(b)].detach().float())
                   for name, side in (("clip_hi", m.clip_hi), ("clip_lo", m.clip_lo))}
        books, cand = {}, {}
        for name, a in factors.items():
            if bool((a == a.reshape(-1)[0]).all()):
                out[name, b] = (None, a.reshape(-1)[:1].half().float())
            else:
                books[name] = _codebook(a, 2**_book_bits(cfg.clip_bits_for(b), a.numel()))
                cand[name] = _clip_candidates(a, books[name], CLIP_REACH.get(b, 3))
        if all(len(c) == 1 for c in cand.values()):
            out.update({(n, b): (c[0], books[n]) for n, c in cand.items()})
            continue
        gs = m.spec.group_size_for(b)
        g = gs or m.in_features
        target = fake_quant(w + m.delta(b).float(), b, gs,
                            *(t.float() for t in m.clip_factors(b)))
        r = m.rank_prefix[m.spec.group_of(b)]
        x = master + u[:, :r] @ v[:r]
        fixed = {name: out[name, b][1].expand_as(a) for name, a in factors.items()
                 if name not in cand}

        # Coordinate descent from the nearest codes: each side in turn takes, per group, the
        # candidate with least error given the other side's current pick: with reach 3 and two
        # rounds, 28 trials per group instead of 49 for every pair.
        pick = {n: cand[n][0] for n in cand}
        for _ in range(CLIP_ROUNDS):
            for n in cand:
                trial = []
                for c in cand[n]:
                    hi, lo = (_clip_factor(c if k == n else pick[k], books[k]) if k in pick
                              else fixed[k] for k in ("clip_hi", "clip_lo"))
                    trial.append((fake_quant(x, b, gs, hi, lo) - target).square()
                                .reshape(w.shape[0], -1, g).sum(-1))
                errs = torch.stack(trial)
                best = errs.argmin(0, keepdim=True)  # first minimum: the nearest code on ties
                pick[n] = torch.stack(cand[n]).gather(0, best).squeeze(0)
                del errs
        out.update({(n, b): (pick[n], books[n]) for n in cand})
    return out


def _master_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, group: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (offset, step) of the master grid from its stored fp16 group ends."""
    lo = lo.float()
    step = (hi.float() - lo) / (2**bits - 1)
    return lo.repeat_interleave(group, dim=1), step.repeat_interleave(group, dim=1)


def _matched_master(m: ElasticLinear, cfg: CompactConfig, u: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Master codes and the fp16 ends (out, G) of each group's grid, chosen to reproduce the
    elastic layer's integer codes where a miss would cost most.

    The grid runs from the group's minimum to its maximum, both stored, so the elements that
    set every width's own min/max grid are (to fp16) exact and the widths' grids come back
    where they were. Rounding the other weights to nearest would still put a second rounding
    in front of every width's own: a weight near a b-bit decision boundary would land on the
    other side about ``(2^b - 1) / 255`` of the time (half the weights at 7 bits). Each master
    code is instead the floor or ceiling whose value, plus the restored adapter slice, lands
    on the elastic model's codes, counted on each width's own grid and weighted by the step a
    miss moves the weight, ``2^-b`` of the group's range at ``b`` bits (ties go to the nearer
    code). Counting every width alike left one code in eleven wrong at 7 bits on the default
    model (+0.66% perplexity there over 16 windows of 512 tokens; weighted, -0.06%). ``u``
    and ``v`` are the restored adapters."""
    gs = cfg.group_size(m.in_features) or m.in_features
    qmax = 2**cfg.master_bits - 1
    w = m.weight.detach().float()
    wg = w.reshape(w.shape[0], -1, gs)
    lo16, hi16 = wg.amin(-1).half(), wg.amax(-1).half()
    off, step = _master_grid(lo16, hi16, cfg.master_bits, gs)
    step = step.clamp(min=1e-30)
    pos = ((w - off) / step).clamp(0, qmax)
    floor = torch.floor(pos).clamp(max=qmax - 1)
    cands = (floor, floor + 1)
    misses = [torch.zeros_like(w) for _ in cands]
    deltas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per group: elastic, restored
    for b in m.spec.bits:
        g = m.spec.group_of(b)
        if g not in deltas:
            r = m.rank_prefix[g]
            deltas[g] = (m.delta(b).float(), u[:, :r] @ v[:r])
        exact, delta = deltas[g]
        bgs = m.spec.group_size_for(b)
        target, sb, zb = quantize(w + exact, b, bgs, *(t.float() for t in m.clip_factors(b)))
        bg = bgs or m.in_features
        sb, zb = sb.repeat_interleave(bg, dim=1), zb.repeat_interleave(bg, dim=1)
        for k, c in enumerate(cands):  # on the width's own grid
            got = torch.clamp(torch.round((off + c * step + delta) / sb) + zb, 0, 2**b - 1)
            misses[k] += 2.0**-b * (got != target).float()  # the step a miss costs
    nearer_hi = (pos - floor) >= 0.5
    pick_hi = (misses[1] < misses[0]) | ((misses[1] == misses[0]) & nearer_hi)
    codes = torch.where(pick_hi, cands[1], cands[0]).to(torch.uint8)
    return codes, lo16, hi16


def compact_tensors(model: nn.Module, cfg: CompactConfig, progress: bool = True
                    ) -> dict[str, torch.Tensor]:
    """The compact tensors of every elastic layer, keyed ``{layer}.{part}`` (matching the
    codes of every width took 94-117 s for the 210 SmolLM2 layers on a 2-core CPU, hence the
    bar)."""
    out: dict[str, torch.Tensor] = {}
    layers = elastic_layers(model)
    with torch.no_grad():
        for name, m in tqdm(layers.items(), total=len(layers), desc="compact", unit="layer",
                            disable=not progress, leave=False):
            u, us = _int8_rows(m.lora_u.float())
            v, vs = _int8_rows(m.lora_v.float())
            uf, vf = u.float() * us.unsqueeze(-1), v.float() * vs.unsqueeze(-1)
            codes, lo, hi = _matched_master(m, cfg, uf, vf)
            off, step = _master_grid(lo, hi, cfg.master_bits, cfg.group_size(m.in_features)
                                     or m.in_features)
            cc = _matched_clip_codes(m, cfg, off + codes.float() * step, uf, vf)
            order = [(side, b) for side in ("clip_hi", "clip_lo") for b in m.spec.bits]
            widths = [0 if cc[k][0] is None else int(cc[k][1].numel()).bit_length() - 1
                      for k in order]
            clips = torch.cat([pack(cc[k][0].reshape(-1).to(torch.uint8), nb)
                               for k, nb in zip(order, widths) if nb]
                              or [torch.zeros(0, dtype=torch.uint8)])
            books = torch.cat([cc[k][1] for k in order]).half()
            out.update({
                f"{name}.master": pack(codes, cfg.master_bits),
                f"{name}.master_lo": lo.contiguous(), f"{name}.master_hi": hi.contiguous(),
                f"{name}.lora_u": u, f"{name}.lora_u_scale": us,
                f"{name}.lora_v": v, f"{name}.lora_v_scale": vs,
                f"{name}.clips": clips, f"{name}.clip_books": books,
                f"{name}.clip_bits": torch.tensor(widths, dtype=torch.uint8),
            })
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias.detach().contiguous()
            for k, t in _static_act_state(m).items():  # a few floats per layer
                out[f"{name}.{k}"] = t
    return out


def _static_act_state(m: ElasticLinear) -> dict[str, torch.Tensor]:
    """The static activation quantizers and input reparameterisation of a layer (empty unless
    ElasticSpec.activations is "per-tensor"); the norms and weights hold the folded values."""
    if not m.act_parameters():
        return {}
    out = {f"act_log_step.{b}": p.detach().contiguous() for b, p in m.act_log_step.items()}
    return {**out, **{k: getattr(m, k).detach().contiguous()
                      for k in ("act_searched", "in_scale", "in_shift")}}

