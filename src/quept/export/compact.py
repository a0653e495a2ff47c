"""The compact elastic checkpoint: every width and plan from one small file set.

A folder holds ``compact.safetensors`` (per elastic linear the tensors of
:func:`quept.export.compact_fit.compact_tensors`: 8-bit master codes with fp16 group ends,
int8 adapters, clip codes into per-tensor codebooks; ~10 bits per weight for all widths) and
``quept-compact.json`` (the settings, layer shapes and sizes). The rest of the model
(embeddings, norms, head) is stored in its own dtype, with config and tokenizer, so the folder
needs nothing else. :func:`quept.api.load_compact` rebuilds an elastic model whose float weight
is the dequantized master; from it any width or plan is packed by
:func:`quept.export.packed.pack_model` exactly as from a calibrated model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quept.checks import check_json_fields, is_json_kind, read_json_object
from quept.config import QuEPTConfig
from quept.export.compact_fit import (
    MAX_CLIP_LOGIT,
    CompactConfig,
    _master_grid,
    _static_act_state,
    compact_tensors,
)
from quept.export.load import check_sizes_and_aliases, fill
from quept.export.packed import PackedFormatError, float_tensors, save_config
from quept.nn.elastic_linear import ElasticLinear
from quept.nn.switch import elastic_layers
from quept.ops.pack import packed_length, unpack

log = logging.getLogger(__name__)

COMPACT_FORMAT = "quept-compact"
COMPACT_VERSION = 3
COMPACT_JSON = "quept-compact.json"
COMPACT_WEIGHTS = "compact.safetensors"


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
    save_config(model, folder)
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
             "clips": ("clips", "clip_books", "clip_bits"), "bias": ("bias",)}
    return {p: 8 * sum(t.numel() * t.element_size() for k, t in tensors.items()
                       if k.rpartition(".")[2] in keys) / max(weights, 1)
            for p, keys in parts.items()}


def read_compact_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / COMPACT_JSON
    if not path.is_file():
        raise PackedFormatError(f"{folder} is not a compact checkpoint (no {COMPACT_JSON})")
    meta = read_json_object(path, PackedFormatError)
    if meta.get("format") != COMPACT_FORMAT or meta.get("version") != COMPACT_VERSION:
        raise PackedFormatError(
            f"{path} is {meta.get('format')!r} version {meta.get('version')!r}; this quept reads "
            f"{COMPACT_FORMAT!r} version {COMPACT_VERSION}")
    check_json_fields(meta, {"model_type": str, "config": dict, "compact": dict,
                             "layers": dict, "sizes": dict}, path, PackedFormatError,
                      optional={"aliases": dict, "source": dict})
    known = {f.name for f in fields(CompactConfig)}
    if not set(meta["compact"]) <= known:
        raise PackedFormatError(f"{path} is damaged: its compact settings hold "
                                f"{sorted(set(meta['compact']) - known)}; known: {sorted(known)}")
    check_sizes_and_aliases(meta, path)
    for name, shape in meta["layers"].items():
        if not (isinstance(shape, list) and len(shape) == 2
                and all(is_json_kind(n, int) for n in shape)):
            raise PackedFormatError(f"{path} is damaged: layer {name!r} should have a shape "
                                    f"[out, in], not {shape!r}")
    return meta


def split_layer_tensors(raw: Mapping[str, torch.Tensor], layers: list[str]
                        ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The compact file's tensors as ``{layer: {"{layer}.{part}": tensor}}`` for each named
    elastic layer (what :func:`layer_state` rebuilds it from), and the rest of the model's."""
    per: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layers}
    rest = {}
    for key, t in raw.items():
        head, _, part = key.rpartition(".")
        layer = head.rpartition(".")[0] if part.isdigit() else head  # act_log_step.{bits}
        if layer in per:
            per[layer][key] = t
        else:
            rest[key] = t
    empty = [n for n, d in per.items() if not d]
    if empty:
        raise PackedFormatError(f"no compact tensors for {len(empty)} layers (e.g. {empty[:2]})")
    return per, rest


def read_compact_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the compact checkpoint in ``folder``."""
    path = Path(folder) / COMPACT_WEIGHTS
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise PackedFormatError(f"{path} cannot be read: {e}") from None


def restore_compact(net: nn.Module, folder: str | os.PathLike) -> dict[str, Any]:
    """Fill a model built on the meta device and prepared with the checkpoint's spec (see
    :func:`quept.api.load_compact`) from the compact checkpoint in ``folder``; returns its JSON.
    The elastic weights become the dequantized master."""
    folder = Path(folder)
    meta = read_compact_meta(folder)
    ccfg = CompactConfig(**meta["compact"])
    raw = read_compact_tensors(folder)
    layers = elastic_layers(net)
    if sorted(layers) != sorted(meta["layers"]):
        raise PackedFormatError(f"{folder}: its layers do not match the model's elastic layers")
    try:
        per_layer, state = split_layer_tensors(raw, list(layers))
    except PackedFormatError as e:
        raise PackedFormatError(f"{folder}: {e}") from None
    for name, m in layers.items():
        try:
            state.update(layer_state(name, m, per_layer[name], ccfg))
        except (KeyError, RuntimeError, ValueError) as e:
            raise PackedFormatError(f"{folder}: layer {name} cannot be rebuilt: {e}") from None
    fill(net, state, meta.get("aliases", {}), str(folder))
    return meta


def layer_state(name: str, m: ElasticLinear, raw: Mapping[str, torch.Tensor],
                c: CompactConfig, only_bits: int | None = None) -> dict[str, torch.Tensor]:
    """The elastic layer's state from its compact tensors; with ``only_bits``, the clips of
    that width alone (enough to pack it)."""
    out_f, in_f = m.out_features, m.in_features
    off, step = _master_grid(raw[f"{name}.master_lo"], raw[f"{name}.master_hi"], c.master_bits,
                             c.group_size(in_f) or in_f)
    codes = unpack(raw[f"{name}.master"], c.master_bits, in_f)
    st = {}
    for part in ("lora_u", "lora_v"):
        q, s = raw[f"{name}.{part}"], raw[f"{name}.{part}_scale"]
        st[f"{name}.{part}"] = q.float() * s.unsqueeze(-1)
    st[f"{name}.weight"] = off + codes.float() * step
    order = [(side, b) for side in ("clip_hi", "clip_lo") for b in m.spec.bits]
    widths = [int(k) for k in raw[f"{name}.clip_bits"]]
    if len(widths) != len(order):
        raise ValueError(f"{len(widths)} clip tensors stored, expected {len(order)}")
    blob, books = raw[f"{name}.clips"], raw[f"{name}.clip_books"].float()
    if books.numel() != sum(2**nb if nb else 1 for nb in widths):
        raise ValueError(f"{books.numel()} clip codebook entries for widths {widths}")
    at = start = 0
    for (side, b), nb in zip(order, widths):
        shape = getattr(m, side)[str(b)].shape
        n, at0, start0 = shape.numel(), at, start
        at, start = (at + packed_length(n, nb), start + 2**nb) if nb else (at, start + 1)
        if only_bits is not None and b != only_bits:
            continue
        if nb:
            a = books[start0:start][unpack(blob[at0:at], nb, n).long()]
        else:
            a = books[start0:start].expand(n)
        logit = torch.logit(a.double()).clamp(max=MAX_CLIP_LOGIT).float()
        st[f"{name}.{side}.{b}"] = logit.reshape(shape)
    if at != blob.numel():
        raise ValueError(f"clip codes are {blob.numel()} bytes, expected {at}")
    if f"{name}.bias" in raw:
        if m.bias is None:  # made by a folded input reparameterisation
            m.bias = torch.nn.Parameter(torch.empty(out_f, device=m.weight.device),
                                        requires_grad=False)
        st[f"{name}.bias"] = raw[f"{name}.bias"]
    for k in _static_act_state(m):
        st[f"{name}.{k}"] = raw[f"{name}.{k}"]
    m.reparam_folded = bool(_static_act_state(m))  # the stored weights are already folded
    if st[f"{name}.weight"].shape != (out_f, in_f):
        raise ValueError(f"master is {tuple(st[f'{name}.weight'].shape)}, expected {out_f}x{in_f}")
    return st
