"""The compact elastic checkpoint: every width and plan from one small file set.

Per elastic linear it stores (bits per weight of the default model in brackets):

- the *master*: the float weight as 8-bit codes on a grid from each group's minimum to its
  maximum (groups of 64), both ends in fp16 [8.5];
- the adapters ``U`` (out x r) and ``V`` (r x in) as symmetric int8 per row, float32 row
  scales [~0.79];
- the clip factors ``sigmoid(clip logit)`` of every width and side (hi/lo) as ``clip_bits``-bit
  codes into a 1-D k-means codebook of that tensor (fp16) [7 widths x 2 x 5 bits / 64 = 1.09];
- the bias, if any, as is.

The codes are chosen for what the restored model computes, not for the float values: of the
two master codes around each weight, the one under which the restored layer gives the elastic
layer's integer codes at more widths (:func:`_matched_master`); of the two codebook entries
around each clip factor, the pair that gives the group's fake-quantized weights closest to the
elastic layer's (:func:`_matched_clip_codes`). On the default model that cuts the
weights whose code differs after restoring from 1.1% to 0.16% at 2 bits and from 10.5% to 3.8%
at 6 bits, against the first format (a scale and zero-point master and 6-bit clips, each value
rounded to nearest).

The rest of the model (embeddings, norms, head) is stored in its own dtype, with config and
tokenizer, so the folder needs nothing else. :func:`quept.api.load_compact` rebuilds an
elastic model whose float weight is the dequantized master; from it any width or plan is
packed by :func:`quept.export.packed.pack_model` exactly as from a calibrated model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from quept.config import QuEPTConfig
from quept.export.load import fill
from quept.export.packed import PackedFormatError, float_tensors
from quept.nn.elastic_linear import ElasticLinear
from quept.nn.switch import elastic_layers
from quept.ops.pack import pack, unpack
from quept.ops.quant import fake_quant, quantize

log = logging.getLogger(__name__)

COMPACT_FORMAT = "quept-compact"
COMPACT_VERSION = 2
COMPACT_JSON = "quept-compact.json"
COMPACT_WEIGHTS = "compact.safetensors"
MAX_CLIP_LOGIT = 20.0  # sigmoid(20) == 1.0 in float32: an unclipped width stays unclipped


@dataclass(frozen=True)
class CompactConfig:
    """How the compact checkpoint stores each part (adapters are always int8).

    master_bits: width of the master weight codes (2..8).
    master_group_size: their group size; a layer whose width it does not divide uses 32, or
        one group per row.
    clip_bits: width of each stored clip factor (1..8).
    """

    master_bits: int = 8
    master_group_size: int = 64
    clip_bits: int = 5

    def __post_init__(self) -> None:
        if not 2 <= self.master_bits <= 8:
            raise PackedFormatError(f"master_bits must lie in 2..8, got {self.master_bits}")
        if not 1 <= self.clip_bits <= 8:
            raise PackedFormatError(f"clip_bits must lie in 1..8, got {self.clip_bits}")
        if self.master_group_size < 0:
            raise PackedFormatError(f"master_group_size must be >= 0: {self.master_group_size}")

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


def _clip_factor(codes: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Clip factor from its stored code, through the logit the restored model holds."""
    a = book.float()[codes.long()]
    return torch.sigmoid(torch.logit(a.double()).clamp(max=MAX_CLIP_LOGIT).float())


def _clip_candidates(a: torch.Tensor, book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest code, the other neighbouring code) of every factor in ``a``."""
    mid = (book[1:] + book[:-1]) / 2
    near = torch.bucketize(a, mid)
    below = torch.bucketize(a, book).clamp(1, book.numel() - 1) - 1  # book[below] <= a ideally
    other = torch.where(near == below, below + 1, below)
    return near, other.clamp(0, book.numel() - 1)


def _matched_clip_codes(m: ElasticLinear, bits: int, master: torch.Tensor, u: torch.Tensor,
                        v: torch.Tensor) -> dict[tuple[str, int], tuple[torch.Tensor, ...]]:
    """Per (side, width): (codes, codebook). Each tensor of clip factors gets its own
    ``2^bits``-entry codebook; of the two codebook entries around each group's hi and lo
    factor, the pair is kept under which the restored layer (``master`` weight, adapters
    ``u``/``v``) gives fake-quantized weights closest to the elastic layer's at that width.
    A clip off by one level moves the whole group's grid: its scale, and at 2 bits a code in
    about one weight in a hundred."""
    w = m.weight.detach().float()
    out = {}
    for b in m.spec.bits:
        gs = m.spec.group_size_for(b)
        g = gs or m.in_features
        target = fake_quant(w + m.delta(b).float(), b, gs,
                            *(t.float() for t in m.clip_factors(b)))
        r = m.rank_prefix[m.spec.group_of(b)]
        x = master + u[:, :r] @ v[:r]
        cand, books = {}, {}
        for name, side in (("clip_hi", m.clip_hi), ("clip_lo", m.clip_lo)):
            a = torch.sigmoid(side[str(b)].detach().float())
            books[name] = _codebook(a, 2**bits)
            cand[name] = _clip_candidates(a, books[name])
        pairs = [(ch, cl) for ch in cand["clip_hi"] for cl in cand["clip_lo"]]
        errs = torch.stack([
            (fake_quant(x, b, gs, _clip_factor(ch, books["clip_hi"]),
                        _clip_factor(cl, books["clip_lo"])) - target)
            .square().reshape(w.shape[0], -1, g).sum(-1)
            for ch, cl in pairs])
        pick = errs.argmin(0, keepdim=True)  # first minimum: the nearest codes win ties
        for i, side in enumerate(("clip_hi", "clip_lo")):
            codes = torch.stack([p[i] for p in pairs]).gather(0, pick).squeeze(0)
            out[side, b] = (codes, books[side])
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
    elastic layer's integer codes at as many widths as possible.

    The grid runs from the group's minimum to its maximum, both stored, so the elements that
    set every width's own min/max grid are (to fp16) exact and the widths' grids come back
    where they were. Rounding the other weights to nearest would still put a second rounding
    in front of every width's own: a weight near a b-bit decision boundary would land on the
    other side about ``(2^b - 1) / 255`` of the time (half the weights at 7 bits). Each master
    code is instead the floor or ceiling whose value, plus the restored adapter slice, lands
    on the elastic model's code at more widths, counted on each width's own grid (ties go to
    the nearer one). ``u`` and ``v`` are the restored adapters."""
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
            misses[k] += (got != target).float()
    nearer_hi = (pos - floor) >= 0.5
    pick_hi = (misses[1] < misses[0]) | ((misses[1] == misses[0]) & nearer_hi)
    codes = torch.where(pick_hi, cands[1], cands[0]).to(torch.uint8)
    return codes, lo16, hi16


def compact_tensors(model: nn.Module, cfg: CompactConfig, progress: bool = True
                    ) -> dict[str, torch.Tensor]:
    """The compact tensors of every elastic layer, keyed ``{layer}.{part}`` (matching the
    codes of every width took 89.5 s for the 210 SmolLM2 layers on a 2-core CPU, hence the bar)."""
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
            cc = _matched_clip_codes(m, cfg.clip_bits, off + codes.float() * step, uf, vf)
            order = [(side, b) for side in ("clip_hi", "clip_lo") for b in m.spec.bits]
            clips = pack(torch.cat([cc[k][0].reshape(-1) for k in order]).to(torch.uint8),
                         cfg.clip_bits)
            books = torch.stack([cc[k][1] for k in order]).half()
            out.update({
                f"{name}.master": pack(codes, cfg.master_bits),
                f"{name}.master_lo": lo.contiguous(), f"{name}.master_hi": hi.contiguous(),
                f"{name}.lora_u": u, f"{name}.lora_u_scale": us,
                f"{name}.lora_v": v, f"{name}.lora_v_scale": vs,
                f"{name}.clips": clips, f"{name}.clip_books": books,
            })
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias.detach().contiguous()
    return out


def save_compact(
    model: nn.Module, folder: str | os.PathLike, tokenizer: Any, config: QuEPTConfig,
    compact: CompactConfig | None = None, provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the compact checkpoint of an elastic ``model`` to ``folder``; returns its JSON."""
    compact = compact or CompactConfig()
    folder = Path(folder)
    tensors = compact_tensors(model, compact)
    layers = elastic_layers(model)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    qbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    floats, aliases = float_tensors(model)
    meta = {
        "format": COMPACT_FORMAT, "version": COMPACT_VERSION,
        "model_type": model.config.model_type, "config": config.to_dict(),
        "compact": asdict(compact), "layers": {n: [m.out_features, m.in_features]
                                               for n, m in layers.items()},
        "aliases": aliases,
        "sizes": {"quantized_weights": weights, "elastic_bytes": qbytes,
                  "bits_per_weight": 8 * qbytes / max(weights, 1),
                  "parts_bits_per_weight": _parts_bpw(tensors, weights),
                  "other_bytes": sum(t.numel() * t.element_size() for t in floats.values())},
        **({"source": dict(provenance)} if provenance else {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    tmp = folder / (COMPACT_WEIGHTS + ".tmp")
    save_file({**floats, **tensors}, str(tmp), metadata={"format": COMPACT_FORMAT})
    os.replace(tmp, folder / COMPACT_WEIGHTS)
    (folder / COMPACT_JSON).write_text(json.dumps(meta, indent=1))
    log.info("compact checkpoint written to %s (%.3f bits per quantized weight)", folder,
             meta["sizes"]["bits_per_weight"])
    return meta


def _parts_bpw(tensors: Mapping[str, torch.Tensor], weights: int) -> dict[str, float]:
    parts = {"master": ("master", "master_lo", "master_hi"),
             "adapters": ("lora_u", "lora_u_scale", "lora_v", "lora_v_scale"),
             "clips": ("clips", "clip_books"), "bias": ("bias",)}
    return {p: 8 * sum(t.numel() * t.element_size() for k, t in tensors.items()
                       if k.rpartition(".")[2] in keys) / max(weights, 1)
            for p, keys in parts.items()}


def read_compact_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / COMPACT_JSON
    if not path.is_file():
        raise PackedFormatError(f"{folder} is not a compact checkpoint (no {COMPACT_JSON})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PackedFormatError(f"{path} is not valid JSON: {e}") from None
    if meta.get("format") != COMPACT_FORMAT or meta.get("version") != COMPACT_VERSION:
        raise PackedFormatError(
            f"{path} is {meta.get('format')!r} version {meta.get('version')!r}; this quept reads "
            f"{COMPACT_FORMAT!r} version {COMPACT_VERSION}")
    return meta


def restore_compact(net: nn.Module, folder: str | os.PathLike) -> dict[str, Any]:
    """Fill a model built on the meta device and prepared with the checkpoint's spec (see
    :func:`quept.api.load_compact`) from the compact checkpoint in ``folder``; returns its JSON.
    The elastic weights become the dequantized master."""
    folder = Path(folder)
    meta = read_compact_meta(folder)
    ccfg = CompactConfig(**meta["compact"])
    try:
        raw = load_file(str(folder / COMPACT_WEIGHTS))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise PackedFormatError(f"{folder / COMPACT_WEIGHTS} cannot be read: {e}") from None
    layers = elastic_layers(net)
    if sorted(layers) != sorted(meta["layers"]):
        raise PackedFormatError(f"{folder}: its layers do not match the model's elastic layers")
    state = {k: v for k, v in raw.items() if k.rpartition(".")[0] not in layers}
    for name, m in layers.items():
        try:
            state.update(_layer_state(name, m, raw, ccfg))
        except (KeyError, RuntimeError, ValueError) as e:
            raise PackedFormatError(f"{folder}: layer {name} cannot be rebuilt: {e}") from None
    fill(net, state, meta.get("aliases", {}), str(folder))
    return meta


def _layer_state(name: str, m: ElasticLinear, raw: Mapping[str, torch.Tensor],
                 c: CompactConfig) -> dict[str, torch.Tensor]:
    out_f, in_f = m.out_features, m.in_features
    off, step = _master_grid(raw[f"{name}.master_lo"], raw[f"{name}.master_hi"], c.master_bits,
                             c.group_size(in_f) or in_f)
    codes = unpack(raw[f"{name}.master"], c.master_bits, in_f)
    st = {f"{name}.weight": off + codes.float() * step}
    for part in ("lora_u", "lora_v"):
        q, s = raw[f"{name}.{part}"], raw[f"{name}.{part}_scale"]
        st[f"{name}.{part}"] = q.float() * s.unsqueeze(-1)
    sizes = [m.clip_hi[str(b)].numel() for b in m.spec.bits] * 2
    clips = unpack(raw[f"{name}.clips"], c.clip_bits, sum(sizes))
    books = raw[f"{name}.clip_books"].float()
    if books.shape != (len(sizes), 2**c.clip_bits):
        raise ValueError(f"clip codebooks are {tuple(books.shape)}, expected "
                         f"{len(sizes)}x{2**c.clip_bits}")
    for i, part in enumerate(torch.split(clips, sizes)):
        side = "clip_hi" if i < len(m.spec.bits) else "clip_lo"
        b = m.spec.bits[i % len(m.spec.bits)]
        a = books[i][part.long()]
        logit = torch.logit(a.double()).clamp(max=MAX_CLIP_LOGIT).float()
        st[f"{name}.{side}.{b}"] = logit.reshape(m.clip_hi[str(b)].shape)
    if m.bias is not None:
        st[f"{name}.bias"] = raw[f"{name}.bias"]
    if st[f"{name}.weight"].shape != (out_f, in_f):
        raise ValueError(f"master is {tuple(st[f'{name}.weight'].shape)}, expected {out_f}x{in_f}")
    return st
