"""The compact elastic checkpoint: every width and plan from one small file set.

Per elastic linear it stores (bits per weight of the default model in brackets):

- the *master*: the float weight as 8-bit min/max codes per group of 64 with an fp16 scale and
  an 8-bit zero-point [8.375];
- the adapters ``U`` (out x r) and ``V`` (r x in) as symmetric int8 per row, float32 row
  scales [~0.75];
- the clip factors ``sigmoid(clip logit)`` of every width and side (hi/lo) as ``clip_bits``-bit
  codes spanning each tensor's own min..max [7 widths x 2 x 6 bits / 64 = 1.31];
- the bias, if any, as is.

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

from quept.config import QuEPTConfig
from quept.export.load import fill
from quept.export.packed import PackedFormatError, float_tensors, minmax_codes
from quept.nn.elastic_linear import ElasticLinear
from quept.nn.switch import elastic_layers
from quept.ops.pack import pack, unpack
from quept.ops.quant import dequantize

log = logging.getLogger(__name__)

COMPACT_FORMAT = "quept-compact"
COMPACT_VERSION = 1
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
    clip_bits: int = 6

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


def _clip_codes(m: ElasticLinear, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip factors of every width and side as one packed row, and their ranges (2 W, 2)."""
    qmax = 2**bits - 1
    codes, ranges = [], []
    for side in (m.clip_hi, m.clip_lo):
        for b in m.spec.bits:
            a = torch.sigmoid(side[str(b)].detach()).reshape(-1)
            lo, hi = a.min(), a.max()
            step = (hi - lo) / qmax
            c = torch.zeros_like(a) if step == 0 else torch.round((a - lo) / step)
            codes.append(c.to(torch.uint8))
            ranges.append(torch.stack([lo, hi]))
    return pack(torch.cat(codes), bits), torch.stack(ranges).float()


def compact_tensors(model: nn.Module, cfg: CompactConfig) -> dict[str, torch.Tensor]:
    """The compact tensors of every elastic layer, keyed ``{layer}.{part}``."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, m in elastic_layers(model).items():
            codes, scale, zero = minmax_codes(m.weight.float(), cfg.master_bits,
                                              cfg.group_size(m.in_features))
            u, us = _int8_rows(m.lora_u.float())
            v, vs = _int8_rows(m.lora_v.float())
            clips, ranges = _clip_codes(m, cfg.clip_bits)
            out.update({
                f"{name}.master": pack(codes, cfg.master_bits),
                f"{name}.master_scale": scale.contiguous(),
                f"{name}.master_zero": pack(zero.reshape(-1), cfg.master_bits),
                f"{name}.lora_u": u, f"{name}.lora_u_scale": us,
                f"{name}.lora_v": v, f"{name}.lora_v_scale": vs,
                f"{name}.clips": clips, f"{name}.clip_range": ranges,
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
    parts = {"master": ("master", "master_scale", "master_zero"),
             "adapters": ("lora_u", "lora_u_scale", "lora_v", "lora_v_scale"),
             "clips": ("clips", "clip_range"), "bias": ("bias",)}
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
    scale = raw[f"{name}.master_scale"].float()
    zero = unpack(raw[f"{name}.master_zero"], c.master_bits, scale.numel()).reshape(scale.shape)
    codes = unpack(raw[f"{name}.master"], c.master_bits, in_f)
    st = {f"{name}.weight": dequantize(codes, scale, zero.float(), c.group_size(in_f) or in_f)}
    for part in ("lora_u", "lora_v"):
        q, s = raw[f"{name}.{part}"], raw[f"{name}.{part}_scale"]
        st[f"{name}.{part}"] = q.float() * s.unsqueeze(-1)
    sizes = [m.clip_hi[str(b)].numel() for b in m.spec.bits] * 2
    clips = unpack(raw[f"{name}.clips"], c.clip_bits, sum(sizes)).float()
    ranges = raw[f"{name}.clip_range"]
    qmax = 2**c.clip_bits - 1
    for i, part in enumerate(torch.split(clips, sizes)):
        side = "clip_hi" if i < len(m.spec.bits) else "clip_lo"
        b = m.spec.bits[i % len(m.spec.bits)]
        lo, hi = ranges[i]
        a = (lo + part * ((hi - lo) / qmax)).clamp(lo, hi)
        logit = torch.logit(a.double()).clamp(max=MAX_CLIP_LOGIT).float()
        st[f"{name}.{side}.{b}"] = logit.reshape(m.clip_hi[str(b)].shape)
    if m.bias is not None:
        st[f"{name}.bias"] = raw[f"{name}.bias"]
    if st[f"{name}.weight"].shape != (out_f, in_f):
        raise ValueError(f"master is {tuple(st[f'{name}.weight'].shape)}, expected {out_f}x{in_f}")
    return st
