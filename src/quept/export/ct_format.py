"""Export one configuration of an elastic model in the compressed-tensors format.

compressed-tensors is the checkpoint format of vLLM and the one transformers loads through its
``compressed-tensors`` quantizer: a Hugging Face folder (``config.json`` with a
``quantization_config``, ``model.safetensors``, tokenizer files) in which each quantized linear
``name`` is stored as

- ``name.weight_packed``: int32, the codes as signed integers ``q - 2^(b-1)``, packed densely
  along the input (element ``i`` of a row at bit ``i*b``, crossing word boundaries when ``b``
  does not divide 32);
- ``name.weight_scale``: (out, G), float16 by default (float32 on request);
- ``name.weight_zero_point``: the zero-points as signed integers ``z - 2^(b-1)``, packed the
  same way along the output dimension;
- ``name.weight_shape``: (out, in) as int64.

Its dequantization ``(q_s - z_s) * scale`` is ours, ``(q - z) * s``, with the same offset on
both sides, so the weights are the elastic model's exactly (scales stored in float32; float16
and bfloat16 round them). Widths are config groups: one per width, naming its layers (or
``Linear`` when one width covers every quantized layer); every other linear is in ``ignore``.

For 2, 4 and 8 bits the packing is the same in every compressed-tensors release; 3, 5, 6 and 7
bits use the dense packing of compressed-tensors 0.18 and later. This writer needs neither
package: it writes the tensors and the JSON itself.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from quept.checks import check_bits
from quept.export.packed import _float_named, _unique, bits_label
from quept.nn.switch import elastic_layers, plan_widths

if TYPE_CHECKING:
    from quept.export.load import WeightsCheck

log = logging.getLogger(__name__)

CT_FORMAT = "pack-quantized"
CT_VERSION = "0.20.1"  # the compressed-tensors release whose layout this writer follows
CT_WEIGHTS = "model.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CompressedTensorsExportError(ValueError):
    """The model or plan cannot be written in the compressed-tensors format."""


# --------------------------------------------------------------------------- packing
def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit integers (rows, n) -> int32 (rows, ceil(n*bits/32)): element ``i``
    of a row at bits ``i*bits ..`` of the row's bit string (low bits first), stored unsigned
    (``value + 2^(bits-1)``), words split where an element crosses a word boundary."""
    check_bits(bits)
    rows, n = values.shape
    u = (values.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    n_words = -(-n * bits // 32)
    start = torch.arange(n, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    out = torch.zeros(rows, n_words + 1, dtype=torch.int64)
    out.scatter_add_(1, word.expand(rows, n), u << shift)
    # An element whose bits run past its word: the high part goes to the next word. The low
    # part above bit 31 is cut when the word is narrowed to 32 bits below.
    spill = (shift + bits > 32).nonzero().squeeze(-1)
    if spill.numel():
        high = u[:, spill] >> (32 - shift[spill])
        out.scatter_add_(1, (word[spill] + 1).expand(rows, -1), high)
    out = out[:, :n_words] & 0xFFFFFFFF
    return (out - ((out >> 31) << 32)).to(torch.int32)  # two's complement int32


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 (rows, words) -> signed int8 (rows, n)."""
    check_bits(bits)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:, :1])], 1)
    start = torch.arange(n, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    joined = words[:, word] | (words[:, word + 1] << 32)  # 64 bits: the element fits in them
    u = (joined >> shift) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).to(torch.int8)


# --------------------------------------------------------------------------- checks and plan
def _check_model(model: nn.Module) -> None:
    spec = getattr(model, "quept_spec", None)
    if spec is None or not elastic_layers(model):
        raise CompressedTensorsExportError(
            "the model has no elastic layers; load a calibrated folder with quept.api.load")
    if spec.activations != "none":
        raise CompressedTensorsExportError(
            f"compressed-tensors export is weight-only here: this model was calibrated with "
            f"{spec.activations} activation quantization, which the format's activation schemes "
            "do not express the way quept computes it; export the packed quept format, which "
            "keeps the activation quantizers")
    if spec.kv_bits is not None:
        raise CompressedTensorsExportError(
            f"compressed-tensors export cannot carry this model's {spec.kv_bits}-bit KV cache: "
            "quept quantizes keys and values per token and head in a Hadamard-rotated basis, "
            "and the format's kv_cache_scheme is a static scale; export the packed quept format")
    if spec.rotation != "none":
        raise CompressedTensorsExportError(
            "compressed-tensors export cannot carry this model's online Hadamard rotation; "
            "export the packed quept format instead")


def resolve_plan(model: nn.Module, bits: int | Mapping[str, int | None]) -> dict[str, int | None]:
    """``{layer: width or None}`` for every elastic layer, checked against its trained widths."""
    layers = elastic_layers(model)
    plan = plan_widths(layers, bits, CompressedTensorsExportError)
    for name, b in plan.items():
        if b is not None:
            try:
                check_bits(b, layers[name].spec.bits)
            except ValueError as e:
                raise CompressedTensorsExportError(f"layer {name}: {e}") from None
    if all(b is None for b in plan.values()):
        raise CompressedTensorsExportError(
            "every layer is float in this plan: nothing to quantize; pick a width")
    return plan


# --------------------------------------------------------------------------- tensors and config
def layer_tensors(layer: nn.Module, bits: int, scale_dtype: torch.dtype
                  ) -> dict[str, torch.Tensor]:
    """One elastic layer at ``bits`` as compressed-tensors parameters (adapter folded in)."""
    codes, scale, zero = layer.quantized_codes(bits)
    off = 1 << (bits - 1)
    q = codes.to(torch.int16) - off
    z = zero.round().to(torch.int16) - off
    out = {
        "weight_packed": pack_int32(q, bits),
        "weight_scale": scale.to(scale_dtype).contiguous(),
        "weight_zero_point": pack_int32(z.t().contiguous(), bits).t().contiguous(),
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().contiguous()
    return out


def _weights_args(bits: int, group_size: int) -> dict[str, Any]:
    return {
        "num_bits": bits, "type": "int", "symmetric": False,
        "strategy": "group" if group_size else "channel",
        "group_size": group_size or None, "dynamic": False, "actorder": None,
        "block_structure": None, "observer": "minmax", "observer_kwargs": {},
    }


def quantization_config(model: nn.Module, plan: Mapping[str, int | None]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for ``plan``."""
    layers = elastic_layers(model)
    by_width: dict[int, list[str]] = {}
    for name, b in plan.items():
        if b is not None:
            by_width.setdefault(b, []).append(name)
    quantized = {n for names in by_width.values() for n in names}
    others = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n not in quantized and n]
    others += [n for n, b in plan.items() if b is None]
    one_width = len(by_width) == 1 and not any(b is None for b in plan.values())
    groups = {}
    for i, (b, names) in enumerate(sorted(by_width.items())):
        gs = layers[names[0]].spec.group_size_for(b)
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if one_width else names,
            "weights": _weights_args(b, gs),
            "input_activations": None, "output_activations": None, "format": CT_FORMAT,
        }
    return {
        "quant_method": "compressed-tensors", "format": CT_FORMAT,
        "quantization_status": "compressed", "config_groups": groups,
        "ignore": sorted(set(others)), "kv_cache_scheme": None,
        "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
        "version": CT_VERSION,
    }


def write_compressed_tensors(
    model: nn.Module, tokenizer: Any, folder: str | os.PathLike,
    bits: int | Mapping[str, int | None], *, scale_dtype: str = "float16",
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` (a loaded elastic model) at ``bits`` (a width, or ``{layer: width or
    None}``) as a compressed-tensors folder. Scales are stored as ``scale_dtype`` (float32:
    the elastic model's weights to the bit); every other tensor keeps its dtype. Returns a
    summary: widths, bits per weight, sizes, and ``provenance`` (where the model came from:
    its base model, which an encoder's fidelity is measured against) as its "source"."""
    if scale_dtype not in DTYPES:
        raise CompressedTensorsExportError(
            f"scale dtype must be one of {list(DTYPES)}, got {scale_dtype!r}")
    _check_model(model)
    plan = resolve_plan(model, bits)
    sdt = DTYPES[scale_dtype]
    layers = elastic_layers(model)
    tensors, _aliases = _unique(_float_named(model, ()))  # tied once; config.json re-ties them
    qbytes = weights = 0
    for name, b in plan.items():
        layer = layers[name]
        if b is None:
            tensors[f"{name}.weight"] = layer.weight.detach().contiguous()
            if layer.bias is not None:
                tensors[f"{name}.bias"] = layer.bias.detach().contiguous()
            continue
        parts = layer_tensors(layer, b, sdt)
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
        weights += layer.weight.numel()
        qbytes += sum(parts[k].numel() * parts[k].element_size()
                      for k in ("weight_packed", "weight_scale", "weight_zero_point"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(model.config)
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(model).__name__]
    cfg.quantization_config = quantization_config(model, plan)
    cfg.dtype = str(next(iter(layers.values())).weight.dtype).removeprefix("torch.")
    cfg.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    tmp = folder / (CT_WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / CT_WEIGHTS)
    widths = sorted({b for b in plan.values() if b is not None})
    summary = {
        "format": "compressed-tensors", "path": str(folder), "scale_dtype": scale_dtype,
        "bits": bits_label(plan.values()),
        "widths": {str(b): sum(v == b for v in plan.values()) for b in widths},
        "float_layers": sum(b is None for b in plan.values()),
        "quantized_weights": weights, "quantized_bytes": qbytes,
        "bits_per_weight": 8 * qbytes / max(weights, 1),
        "file_bytes": (folder / CT_WEIGHTS).stat().st_size,
        **({"source": dict(provenance)} if provenance else {}),
    }
    (folder / "quept-export.json").write_text(json.dumps(summary, indent=1))
    log.info("compressed-tensors folder written to %s (%.3f bits per quantized weight)", folder,
             summary["bits_per_weight"])
    return summary


# --------------------------------------------------------------------------- reading
def is_compressed_tensors(folder: str | os.PathLike) -> bool:
    """Whether ``folder/config.json`` declares a compressed-tensors quantization."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    q = cfg.get("quantization_config") if isinstance(cfg, Mapping) else None
    return isinstance(q, Mapping) and q.get("quant_method") == "compressed-tensors"


def load_compressed_tensors(folder: str | os.PathLike, model_class: Any,
                            dtype: torch.dtype = torch.float32) -> nn.Module:
    """A compressed-tensors folder as a float model of ``model_class`` (an auto class or a
    model class; eval mode): which
    layers are quantized and how is decided by the ``compressed-tensors`` package's own target
    matching, and each layer is dequantized by its own decompressor (so a per-layer plan of
    several widths reads right; transformers' dequantizing loader applies one scheme to every
    dense layer). Built on the meta device, then filled; ``net.quept_compressed_tensors`` holds
    each quantized layer's width, the stored bits per quantized weight and the "source" quept's
    summary records (:func:`~quept.export.onnx_runtime.read_export_source`)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from quept.export.load import WeightsCheck, fill, parameters_on_meta
    from quept.export.onnx_runtime import read_export_source

    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.utils.match import match_named_modules
    except ImportError:
        raise CompressedTensorsExportError(
            f"{folder} is a compressed-tensors model; reading it needs the compressed-tensors "
            "package: pip install 'quept[ct]'") from None
    folder = Path(folder)
    cfg = AutoConfig.from_pretrained(folder)
    qdict = cfg.quantization_config
    qdict = qdict if isinstance(qdict, Mapping) else qdict.to_dict()
    try:
        qcfg = QuantizationConfig.model_validate(dict(qdict))
    except (ValueError, TypeError) as e:  # pydantic's ValidationError, or a validator's own
        raise CompressedTensorsExportError(
            f"{folder / 'config.json'}: its quantization_config cannot be read: "
            f"{' '.join(str(e).split())}") from None
    unweighted = [n for n, g in qcfg.config_groups.items() if g.weights is None]
    if unweighted:
        raise CompressedTensorsExportError(
            f"{folder / 'config.json'}: config group {unweighted[0]!r} quantizes no weights; "
            "quept reads compressed-tensors models whose groups quantize weights")
    del cfg.quantization_config
    build = getattr(model_class, "from_config", None) or model_class._from_config  # auto / concrete
    with parameters_on_meta():
        net = build(cfg, dtype=dtype)
    schemes = {}
    for key, group in qcfg.config_groups.items():
        for name, _ in match_named_modules(net, group.targets, qcfg.ignore):
            schemes.setdefault(name, (key, group))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CompressedTensorsExportError(f"{folder} holds no .safetensors file")
    if not schemes:
        raise CompressedTensorsExportError(
            f"{folder}: no layer of the model matches the config groups' targets")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                raw.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
        except Exception as e:  # safetensors raises several types for a damaged file
            raise CompressedTensorsExportError(f"{f} cannot be read: {e}") from None
    fits = WeightsCheck(folder / "config.json", files[0] if len(files) == 1 else
                        f"{folder}'s safetensors files", "quept export --format compressed-tensors")
    fits.block_count(net, raw)
    fits.shapes(net, raw)  # the float tensors (the quantized layers' names differ)
    state, stored, weights = {}, 0, 0
    for name, (key, scheme) in schemes.items():
        prefix = f"{name}."
        own = {k[len(prefix):]: raw.pop(k) for k in list(raw) if k.startswith(prefix)}
        if (scheme.format or qcfg.format) == CT_FORMAT:
            _check_packed(fits, name, own, net.get_submodule(name).weight.shape,
                          scheme.weights, f"quantization_config.config_groups.{key}")
        stored += sum(t.numel() * t.element_size() for k, t in own.items()
                      if k not in ("bias", "weight_shape"))
        weights += net.get_submodule(name).weight.numel()
        if "bias" in own:
            state[f"{name}.bias"] = own.pop("bias").to(dtype)
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qcfg.format)
        try:
            state[f"{name}.weight"] = compressor.decompress(own, scheme)["weight"].to(dtype)
        except (KeyError, AssertionError, RuntimeError, ValueError, TypeError) as e:
            raise CompressedTensorsExportError(
                f"{folder}: layer {name} cannot be decompressed as {scheme.format or qcfg.format} "
                f"(tensors {sorted(own)}): {e}") from None
    state.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in raw.items()})
    tied = getattr(net, "get_expanded_tied_weights_keys", lambda **_: {})(all_submodels=True)
    fill(net, state, {k: v for k, v in (tied or {}).items() if k not in state}, str(folder))
    net.eval().requires_grad_(False)
    widths = {n: s.weights.num_bits for n, (_, s) in schemes.items()}
    source = read_export_source(folder, CompressedTensorsExportError)
    net.quept_compressed_tensors = {"widths": widths, "bits_per_weight": 8 * stored / weights,
                                    "source": source}
    net.quept_calibration_text = source.get("calibration_text")
    return net


def _check_packed(fits: WeightsCheck, name: str, own: Mapping[str, torch.Tensor],
                  shape: torch.Size, args: Any, group: str) -> None:
    """The tensors of the pack-quantized layer ``name`` (``own``, by their suffix) are of the
    shapes its weights ``args`` (num_bits, strategy, group_size of the config ``group``, a
    path in config.json) give a ``shape`` (out, in) weight; the first that is not is refused
    naming config.json's field."""
    out_f, in_f = shape
    if "weight_packed" not in own:
        raise fits.refuse(f"{fits.config} says {group} quantizes layer {name}",
                          f"no {name}.weight_packed")
    says = f"{fits.config} says {group}.weights"
    stored = own.get("weight_shape")
    if stored is not None and stored.tolist() != [out_f, in_f]:
        raise fits.refuse(f"{fits.config} describes a model whose {name} is {out_f}x{in_f}",
                          f"{name}.weight_shape {stored.tolist()}")
    bits, packed = args.num_bits, list(own["weight_packed"].shape)
    if packed != [out_f, -(-in_f * bits // 32)]:
        fit = [b for b in range(1, 9) if packed == [out_f, -(-in_f * b // 32)]]
        raise fits.refuse(f"{says}.num_bits {bits}", f"{name}.weight_packed of shape {packed}"
                          + (f", {fit[0]}-bit codes" if len(fit) == 1 else "")
                          + f" ({bits}-bit codes would be [{out_f}, {-(-in_f * bits // 32)}])")
    strategy = getattr(args.strategy, "value", args.strategy)
    groups = {"channel": 1, "group": -(-in_f // (args.group_size or in_f))}.get(strategy)
    scale = list(own["weight_scale"].shape) if "weight_scale" in own else None
    if groups is not None and scale is not None and scale != [out_f, groups]:
        what = f"group_size {args.group_size}" if strategy == "group" else "strategy channel"
        raise fits.refuse(f"{says}.{what}", f"{name}.weight_scale of shape {scale} ({groups} "
                          f"scale{'s' if groups > 1 else ''} per row would be [{out_f}, "
                          f"{groups}])")
