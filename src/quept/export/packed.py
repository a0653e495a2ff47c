"""The packed model: one configuration (a width or a per-layer plan) as real low-bit integers.

A packed folder holds ``packed.safetensors`` (every :class:`PackedLinear`'s codes, scales and
zero-points, plus the model's other tensors in their own dtype, tied tensors once),
``quept-packed.json`` (format, version, per-layer widths and shapes, sizes) and the base
model's ``config.json`` and tokenizer files. This module writes it; :mod:`quept.export.load`
reads it with the inference modules only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from quept.checks import ConfigError, check_bits
from quept.nn.packed_linear import PackedEmbedding, PackedLinear
from quept.nn.switch import elastic_layers, plan_widths
from quept.ops.quant import to_groups

log = logging.getLogger(__name__)

PACKED_FORMAT = "quept-packed"
PACKED_VERSION = 1
PACKED_JSON = "quept-packed.json"
PACKED_WEIGHTS = "packed.safetensors"
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
HEAD_GROUP_SIZE = 64
# The one KV-cache quantizer (fake_quant_kv in the attention, keys after the rotary embedding);
# folders of earlier versions quantized keys before it, which this version refuses by name.
KV_QUANT_KIND = "per-token-per-head-asymmetric-after-rotary"
KV_QUANT_KIND_BEFORE_ROTARY = "per-token-per-head-asymmetric"


class PackedFormatError(ValueError):
    """A folder is not a readable packed model, or its files disagree with each other."""


class PackedArgumentError(PackedFormatError, ConfigError):
    """A width, plan or option given to a packed or switchable model is invalid: a
    :class:`quept.ConfigError` like every misuse of the API (and a PackedFormatError, which
    it was before)."""


def bits_label(widths: Iterable[int | None]) -> int | str:
    """The ``"bits"`` an export's JSON records for layers at ``widths`` (None: a layer left
    float): their one width, or "mixed"."""
    held = set(widths)
    return next(iter(held)) if len(held) == 1 and None not in held else "mixed"


def check_bits_label(recorded: Any, widths: list[int | None], path: Path,
                     error: type[Exception], held: str) -> None:
    """``recorded``, the ``"bits"`` of the JSON at ``path``, is the :func:`bits_label` of the
    ``widths`` its layers are at (``held`` says where it records them); a label edited apart
    from them would name a width the codes are not at."""
    label = bits_label(widths)
    if widths and recorded != label:
        raise error(f"{path} is damaged: its \"bits\" says {recorded!r}, but {held}, which it "
                    f"labels {label!r}; export it again")


def minmax_codes(w: torch.Tensor, bits: int, group_size: int,
                 scale_dtype: torch.dtype = torch.float16
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest min/max codes (out, in) uint8 with a scale (out, G) in ``scale_dtype``
    and a uint8 zero-point (out, G); codes are rounded against the scale as stored."""
    qmax = 2**bits - 1
    with torch.no_grad():
        wg = to_groups(w.float(), group_size or w.shape[1])
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / qmax).clamp(min=1e-8).to(scale_dtype).float().clamp(min=2**-24)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        codes = torch.clamp(torch.round(wg / scale) + zero, 0, qmax).to(torch.uint8)
    return (codes.reshape(w.shape), scale.squeeze(-1).to(scale_dtype),
            zero.squeeze(-1).to(torch.uint8))


def layer_widths(model: nn.Module | Mapping[str, nn.Module], plan: int | Mapping[str, int]
                 ) -> dict[str, int]:
    """``{layer name: bits}`` for every elastic layer of ``model`` (or of a ``{name: elastic
    layer}`` mapping) from one width or a full plan, each width checked against the layer's."""
    layers = elastic_layers(model) if isinstance(model, nn.Module) else model
    widths = plan_widths(layers, plan, PackedArgumentError)
    for n, b in widths.items():
        if b is None:
            raise PackedArgumentError(f"layer {n}: a packed model has no float layers; pick a "
                                      "width")
        try:
            widths[n] = check_bits(b, layers[n].spec.bits)
        except ConfigError as e:
            raise PackedArgumentError(f"layer {n}: {e}" if isinstance(plan, Mapping)
                                      else str(e)) from None
    return widths


def pack_model(
    model: nn.Module, plan: int | Mapping[str, int], scale_dtype: str = "float16"
) -> dict[str, PackedLinear]:
    """Fold each elastic layer's adapter into its weight at its width and pack the codes."""
    if scale_dtype not in SCALE_DTYPES:
        raise PackedArgumentError(f"scale dtype {scale_dtype!r} is not one of "
                                  f"{list(SCALE_DTYPES)}")
    layers = elastic_layers(model)
    out = {}
    for name, b in layer_widths(model, plan).items():
        m = layers[name]
        codes, scale, zero = m.quantized_codes(b)
        out[name] = PackedLinear.from_codes(
            codes, scale, zero, b, m.spec.group_size_for(b), m.bias, SCALE_DTYPES[scale_dtype])
        if m.spec.activations != "none":
            out[name].act_bits = b
        if m.spec.activations == "per-tensor":
            step, zero = m.static_act_params(b)
            out[name].act_static = (step.item(), zero)
        out[name].in_rotation = m.in_rotation
        out[name].kv_quant = m.kv_quant
    return out


def pack_head(model: nn.Module, bits: int, scale_dtype: str = "float16"
              ) -> dict[str, PackedLinear]:
    """The output head as ``bits``-bit min/max codes (group 64, or per row when 64 does not
    divide the width); a tied input embedding becomes a :class:`PackedEmbedding` over the
    same buffers. Returns ``{module name: packed module}``."""
    check_bits(bits)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, nn.Linear):
        raise PackedFormatError(f"a {model.config.model_type} model has no output head over the "
                                "vocabulary to pack: head bits apply to a causal LM's head")
    names = {id(m): n for n, m in model.named_modules()}
    gs = HEAD_GROUP_SIZE if head.in_features % HEAD_GROUP_SIZE == 0 else 0
    dt = SCALE_DTYPES[scale_dtype]
    codes, scale, zero = minmax_codes(head.weight, bits, gs, dt)
    packed = PackedLinear.from_codes(codes, scale, zero, bits, gs, head.bias, dt)
    out = {names[id(head)]: packed}
    if emb is not None and emb.weight is head.weight:
        table = PackedEmbedding(packed.in_features, packed.out_features, bits, gs, False, dt)
        table.qweight, table.scale, table.qzero = packed.qweight, packed.scale, packed.qzero
        out[names[id(emb)]] = table
    return out


def _unique(named: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each storage once, and ``{name: name it shares storage with}`` (tied tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in named.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.device)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def float_tensors(model: nn.Module, skip: tuple[str, ...] = ()
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's tensors outside the elastic layers and the modules named in ``skip``, each
    storage once, and the aliases of tied ones."""
    return _unique(_float_named(model, skip))


def _float_named(model: nn.Module, skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    prefixes = tuple(f"{n}." for n in (*elastic_layers(model), *skip))
    return {n: t for n, t in model.state_dict(keep_vars=True).items()
            if not n.startswith(prefixes)}


def _describe(m: PackedLinear) -> dict[str, Any]:
    act = {} if m.act_bits is None else {"act_bits": m.act_bits, "act_quant": "per-token"}
    if m.act_bits is not None and m.act_static is not None:
        act.update(act_quant="per-tensor", act_step=m.act_static[0], act_zero=m.act_static[1])
    if m.in_rotation:
        act["in_rotation"] = "hadamard"
    if m.kv_quant is not None:
        act["kv_quant"] = {"bits": m.kv_quant[0], "head_dim": m.kv_quant[1],
                           "hadamard": m.kv_quant[2], "kind": KV_QUANT_KIND}
    return {"bits": m.bits, "group_size": m.group_size, "in": m.in_features,
            "out": m.out_features, "bias": m.bias is not None, **act}


def save_config(model: nn.Module, folder: Path) -> None:
    """The model's config.json, naming its class: loaders build the model from the config
    alone, and some auto classes (DeiT's image classifiers) need the name to choose."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)


def write_packed(
    model: nn.Module, plan: int | Mapping[str, int], folder: str | os.PathLike, tokenizer: Any,
    *, scale_dtype: str = "float16", head_bits: int | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the packed model of ``model`` at ``plan`` to ``folder``; returns its JSON.

    ``head_bits`` (e.g. 8) also stores the output head (and a tied input embedding) as
    min/max codes: 4x smaller and faster to decode, at the cost of exact equality with the
    fake-quantized model's logits. None keeps them in their float dtype.
    """
    folder = Path(folder)
    packed = pack_model(model, plan, scale_dtype)
    heads = {} if head_bits is None else pack_head(model, head_bits, scale_dtype)
    named = _float_named(model, tuple(heads))
    for name, m in {**packed, **heads}.items():
        named.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    tensors, aliases = _unique(named)
    widths = {n: m.bits for n, m in packed.items()}
    meta = {
        "format": PACKED_FORMAT,
        "version": PACKED_VERSION,
        "model_type": model.config.model_type,
        "bits": bits_label(widths.values()),
        "scale_dtype": scale_dtype,
        "layers": {n: _describe(m) for n, m in packed.items()},
        "head": {n: {**_describe(m), "embedding": isinstance(m, PackedEmbedding)}
                 for n, m in heads.items()},
        "aliases": aliases,
        "sizes": sizes(packed, heads, tensors),
        **({"source": dict(provenance)} if provenance else {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_config(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    tmp = folder / (PACKED_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": PACKED_FORMAT})
    os.replace(tmp, folder / PACKED_WEIGHTS)
    (folder / PACKED_JSON).write_text(json.dumps(meta, indent=1))
    log.info("packed model written to %s (%.3f bits per quantized weight)", folder,
             meta["sizes"]["bits_per_weight"])
    return meta


def sizes(packed: Mapping[str, PackedLinear], heads: Mapping[str, PackedLinear],
          tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Stored bytes: quantized linears (codes + scales + zero-points), the packed head (once,
    when tied to the embedding), and everything else (biases included)."""
    qbytes = sum(m.code_bytes() for m in packed.values())
    weights = sum(m.in_features * m.out_features for m in packed.values())
    head = sum(m.stored_bytes() for m in heads.values() if not isinstance(m, PackedEmbedding))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"quantized_weights": weights, "quantized_bytes": qbytes,
            "bits_per_weight": 8 * qbytes / max(weights, 1), "head_bytes": head,
            "other_bytes": total - qbytes - head}
