"""Load a packed folder with the inference modules only: the model is built on the meta
device, its quantized linears (and a packed head) are swapped for meta :class:`PackedLinear`
shells, and ``load_state_dict(assign=True)`` fills every tensor."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from quept.checks import check_json_fields, read_json_object
from quept.export.packed import (
    KV_QUANT_KIND,
    KV_QUANT_KIND_BEFORE_ROTARY,
    PACKED_FORMAT,
    PACKED_JSON,
    PACKED_VERSION,
    PACKED_WEIGHTS,
    SCALE_DTYPES,
    PackedFormatError,
    check_bits_label,
)
from quept.models.kv import install_kv_attention
from quept.nn.packed_linear import PackedEmbedding, PackedLinear


def read_packed_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / PACKED_JSON
    if not path.is_file():
        raise PackedFormatError(f"{folder} is not a packed model folder (no {PACKED_JSON})")
    meta = read_json_object(path, PackedFormatError)
    if meta.get("format") != PACKED_FORMAT:
        raise PackedFormatError(f"{path} has format {meta.get('format')!r}, not {PACKED_FORMAT!r}")
    if meta.get("version") != PACKED_VERSION:
        raise PackedFormatError(
            f"{path} is version {meta.get('version')!r}; this quept reads {PACKED_VERSION}")
    check_json_fields(meta, {"model_type": str, "bits": (int, str), "scale_dtype": str,
                             "layers": dict, "sizes": dict}, path, PackedFormatError,
                      optional={"head": dict, "aliases": dict, "source": dict})
    if meta["scale_dtype"] not in SCALE_DTYPES:
        raise PackedFormatError(f"{path} is damaged: scale dtype {meta['scale_dtype']!r} is not "
                                f"one of {sorted(SCALE_DTYPES)}")
    check_sizes_and_aliases(meta, path)
    for part, extra in (("layers", {}), ("head", {"embedding": bool})):
        for name, info in meta.get(part, {}).items():
            if not isinstance(info, dict):
                raise PackedFormatError(f"{path} is damaged: {part} entry {name!r} is not an "
                                        "object")
            check_json_fields(info, {**_LAYER_FIELDS, **extra}, f"{path} ({part} entry {name})",
                              PackedFormatError)
    check_width_label(meta, path)
    return meta


def check_width_label(meta: Mapping[str, Any], path: Path) -> None:
    """The ``bits`` of a packed folder's JSON is the label its layers' widths give
    (:func:`check_bits_label`)."""
    widths = sorted({info["bits"] for info in meta["layers"].values()})
    held = (f"every layer at {widths[0]} bits" if len(widths) == 1 else
            f"layers at {', '.join(map(str, widths))} bits")
    check_bits_label(meta["bits"], widths, path, PackedFormatError,
                     f"its layers entries hold {held}")


def check_sizes_and_aliases(meta: Mapping[str, Any], path: Path) -> None:
    """What the JSON of a packed folder and of a compact checkpoint both hold, checked: the
    stored bits per weight among the sizes, and the tied tensors as name -> name."""
    check_json_fields(meta["sizes"], {"bits_per_weight": float}, f"{path} (its sizes)",
                      PackedFormatError)
    if not all(isinstance(v, str) for v in meta.get("aliases", {}).values()):
        raise PackedFormatError(f"{path} is damaged: its aliases should name tensors")


MODEL_CONFIG = "config.json"
"""The model's Hugging Face configuration, which packed folders and compact checkpoints keep
beside their JSON: their model is built from it."""


def check_model_config(folder: Path, holds: str, made_by: str, listed_in: str,
                       model_type: str) -> None:
    """The ``config.json`` a packed folder or compact checkpoint (``holds``, "a packed model")
    builds its model from is there and of the ``model_type`` its JSON (``listed_in``) records,
    or a :class:`PackedFormatError` naming the folder damaged or mixed up and the command that
    writes it again (``made_by``, "quept export"); checked before transformers reads the
    folder, whose error would not say so."""
    path = folder / MODEL_CONFIG
    if not path.is_file():
        raise PackedFormatError(f"{folder} is damaged: it holds {holds} but no {MODEL_CONFIG} "
                                "(the model's configuration, written beside its weights, which "
                                f"the model is built from); write it again with `{made_by}`")
    found = read_json_object(path, PackedFormatError).get("model_type")
    if found != model_type:
        raise PackedFormatError(f"{path} describes a {found!r} model, but {listed_in} a "
                                f"{model_type!r} one: the folder is damaged or mixed up; write "
                                f"it again with `{made_by}`")


_LAYER_FIELDS = {"bits": int, "group_size": int, "in": int, "out": int, "bias": bool}
"""What every packed layer's entry holds (activation and KV quantizers add optional fields)."""


def load_packed(folder: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """Build the packed model of ``folder`` on the meta device and fill it (eval mode)."""
    from transformers import AutoConfig

    from quept.models import family_for_type

    folder = Path(folder)
    meta = read_packed_meta(folder)
    check_model_config(folder, "a packed model", "quept export", PACKED_JSON, meta["model_type"])
    cfg = AutoConfig.from_pretrained(folder)
    fam = family_for_type(cfg.model_type)
    weights = folder / PACKED_WEIGHTS
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise PackedFormatError(f"{weights} cannot be read: {e}") from None
    with parameters_on_meta():
        net = fam.model_class().from_config(cfg)
    fits = WeightsCheck(folder / MODEL_CONFIG, weights, "quept export")
    fits.block_count(net, state)
    fits.shapes(net, state)  # the float tensors, against config.json
    scale_dtype = SCALE_DTYPES[meta["scale_dtype"]]
    for name, info in meta["layers"].items():
        _swap(net, name, info, scale_dtype)
    for name, info in meta.get("head", {}).items():
        _swap(net, name, info, scale_dtype, PackedEmbedding if info["embedding"] else PackedLinear)
    fits.shapes(net, state, _layer_fields(meta, folder / PACKED_JSON))  # the packed layers
    fill(net, state, meta.get("aliases", {}), str(folder))
    for m in net.modules():
        if isinstance(m, PackedLinear):
            m.set_backend(backend)
    install_kv_attention(net)
    net.eval().requires_grad_(False)
    net.quept_packed = meta
    return net


def _swap(net: nn.Module, name: str, info: Mapping[str, Any], scale_dtype: torch.dtype,
          cls: type[PackedLinear] = PackedLinear) -> None:
    try:
        old = net.get_submodule(name)
    except AttributeError:
        raise PackedFormatError(f"packed layer {name} does not exist in the model") from None
    if isinstance(old, nn.Embedding):
        shape = (old.embedding_dim, old.num_embeddings)
    else:
        shape = (getattr(old, "in_features", None), getattr(old, "out_features", None))
    if shape != (info["in"], info["out"]):
        raise PackedFormatError(
            f"packed layer {name} is {info['out']}x{info['in']} but the model has {old}")
    new = cls(info["in"], info["out"], info["bits"], info["group_size"], info["bias"],
              scale_dtype, device="meta")
    if info.get("act_bits") is not None:
        if info.get("act_quant") not in ("per-token", "per-tensor"):
            raise PackedFormatError(f"packed layer {name}: activation quantizer "
                                    f"{info.get('act_quant')!r} is unknown (known: per-token, "
                                    "per-tensor)")
        new.act_bits = int(info["act_bits"])
        if info["act_quant"] == "per-tensor":
            step, zero = info.get("act_step"), info.get("act_zero")
            if not (isinstance(step, float) and step > 0 and isinstance(zero, (int, float))
                    and 0 <= zero < 2**new.act_bits):
                raise PackedFormatError(f"packed layer {name}: a per-tensor activation quantizer "
                                        f"needs act_step > 0 and act_zero in 0..2^bits - 1, got "
                                        f"{step!r} and {zero!r}")
            new.act_static = (step, float(zero))
    rotation = info.get("in_rotation")
    if rotation not in (None, "hadamard"):
        raise PackedFormatError(f"packed layer {name}: input rotation {rotation!r} is unknown "
                                "(known: hadamard)")
    new.in_rotation = rotation == "hadamard"
    new.kv_quant = _kv_quant(name, info)
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, new)


SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size")
"""The fields of config.json that size tensors directly: the one that disagrees with the
weights is named."""


class WeightsCheck:
    """Whether the tensors read from ``weights`` fit the model built from ``config`` (its
    config.json) on the meta device, before ``load_state_dict`` would fail with PyTorch's
    multi-line list; a :class:`PackedFormatError` names the file, the field that disagrees
    with the weights and the command that writes the folder again (``made_by``)."""

    def __init__(self, config: Path, weights: Path | str, made_by: str):
        self.config, self.weights, self.made_by = config, weights, made_by

    def refuse(self, says: str, holds: str) -> PackedFormatError:
        """The error: ``says`` (what a file says), ``holds`` (what the weights hold)."""
        return PackedFormatError(f"{says}, but {self.weights} holds {holds}: the folder is "
                                 f"damaged or mixed up; write it again with `{self.made_by}`")

    def block_count(self, net: nn.Module, names: Iterable[str]) -> None:
        """The weights hold as many blocks as the model has (config.json's
        num_hidden_layers)."""
        from quept.models import family_for

        path = family_for(net).blocks
        if "*" in path:  # blocks in stages (Swin): their tensors' shapes are checked instead
            return
        prefix = f"{path}."
        held = {n[len(prefix):].split(".", 1)[0] for n in names if n.startswith(prefix)}
        built = len(net.get_submodule(path))
        if held and len(held) != built:
            layers = getattr(net.config, "num_hidden_layers", None)
            says = (f"num_hidden_layers {layers}" if layers == built
                    else f"{built} block{'s' * (built != 1)}")
            raise self.refuse(f"{self.config} says {says}", f"the weights of {len(held)} "
                              f"block{'s' * (len(held) != 1)} ({path}.*)")

    def shapes(self, net: nn.Module, state: Mapping[str, torch.Tensor],
               layer_says: Callable[[str], str | None] = lambda name: None) -> None:
        """Every tensor of ``state`` the model has is of the model's shape; one that is not
        is blamed on what ``layer_says`` of it (the JSON that sizes a quantized layer), else
        on config.json's :data:`SIZE_FIELDS`. Codes and scales are checked before
        zero-points, whose size both bits and group size set."""
        model = {**dict(net.named_parameters(remove_duplicate=False)),
                 **dict(net.named_buffers(remove_duplicate=False))}
        for name in sorted(state, key=lambda n: n.endswith(".qzero")):
            want, got = model.get(name), state[name]
            if want is None or want.shape == got.shape:
                continue
            says = layer_says(name) or self._config_says(net, list(want.shape),
                                                         list(got.shape))
            raise self.refuse(says, f"{name} of shape {list(got.shape)} (the model needs "
                                    f"{list(want.shape)})")

    def _config_says(self, net: nn.Module, want: list[int], got: list[int]) -> str:
        """What config.json says that sizes a tensor ``want`` where the weights hold ``got``."""
        sizes = {w for w, g in zip(want, got) if w != g} if len(want) == len(got) else set()
        fields = [f"{f} {getattr(net.config, f)}" for f in SIZE_FIELDS
                  if getattr(net.config, f, None) in sizes]
        if not fields:
            return f"{self.config} describes another model"
        return f"{self.config} says {' and '.join(fields)}"


def _layer_fields(meta: Mapping[str, Any], path: Path) -> Callable[[str], str | None]:
    """What a packed folder's JSON (at ``path``) says of the size of a packed layer's tensor
    ``name``: its codes by its bits, its scales by its group size, its zero-points by both;
    None for any other tensor."""
    fields = {"qweight": ("bits",), "scale": ("group_size",), "qzero": ("bits", "group_size")}
    entries = {**meta["layers"], **meta.get("head", {})}

    def says(name: str) -> str | None:
        layer, _, part = name.rpartition(".")
        if layer not in entries or part not in fields:
            return None
        return (f"{path} says layer {layer} has "
                + " and ".join(f"{f} {entries[layer][f]}" for f in fields[part]))

    return says


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (filled later from a file) and
    their buffers real: the buffers a model derives in its constructor (position ids, rotary
    frequencies) hold their values, which no initialiser could restore for every module kind
    (a SigLIP vision tower's position ids are not filled by a LLaVA-OneVision's)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def fill(net: nn.Module, state: Mapping[str, torch.Tensor], aliases: Mapping[str, str],
         where: str) -> None:
    """Assign ``state`` into a meta-built model, re-tie ``aliases`` and initialise the
    non-persistent buffers (e.g. rotary frequencies); every tensor must end up off meta."""
    try:
        res = net.load_state_dict(dict(state), strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise PackedFormatError(f"{where}: tensors do not fit the model: {e}") from None
    missing = sorted(set(res.missing_keys) - set(aliases))
    if missing or res.unexpected_keys:
        raise PackedFormatError(
            f"{where}: {len(missing)} tensors missing (e.g. {missing[:2]}), "
            f"{len(res.unexpected_keys)} unexpected (e.g. {res.unexpected_keys[:2]})")
    for name, target in aliases.items():
        parent, _, child = name.rpartition(".")
        tparent, _, tchild = target.rpartition(".")
        setattr(net.get_submodule(parent), child, getattr(net.get_submodule(tparent), tchild))
    for mod in net.modules():
        metas = [n for n, b in mod.named_buffers(recurse=False) if b is not None and b.is_meta]
        if metas:
            for n in metas:
                setattr(mod, n, torch.empty_like(getattr(mod, n), device="cpu"))
            net._init_weights(mod)  # HF's initialiser also fills derived buffers (rotary)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise PackedFormatError(f"{where}: tensors left unfilled: {left[:3]}")


def _kv_quant(name: str, info: Mapping[str, Any]) -> tuple[int, int, bool] | None:
    """A packed layer's KV-cache quantizer (bits, head_dim, Hadamard-rotated heads), checked;
    None when it has none."""
    kv = info.get("kv_quant")
    if kv is None:
        return None
    if isinstance(kv, Mapping) and kv.get("kind") == KV_QUANT_KIND_BEFORE_ROTARY:
        raise PackedFormatError(f"packed layer {name}: this folder's KV cache quantizes keys "
                                "before the rotary embedding (an earlier quept); this quept "
                                "quantizes them after it: recalibrate with --kv-bits and export "
                                "again")
    if not isinstance(kv, Mapping) or kv.get("kind") != KV_QUANT_KIND:
        raise PackedFormatError(f"packed layer {name}: KV-cache quantizer {kv!r} is unknown "
                                f"(known: kind {KV_QUANT_KIND!r} with bits and head_dim)")
    bits, dim = kv.get("bits"), kv.get("head_dim")
    if not (isinstance(bits, int) and 2 <= bits <= 8 and isinstance(dim, int) and dim > 0
            and info["out"] % dim == 0):
        raise PackedFormatError(f"packed layer {name}: KV-cache quantizer needs bits 2..8 and a "
                                f"head_dim dividing {info['out']}, got {kv!r}")
    rotate = kv.get("hadamard", False)
    if not isinstance(rotate, bool) or (rotate and dim & (dim - 1)):
        raise PackedFormatError(f"packed layer {name}: KV-cache quantizer's hadamard must be "
                                f"true or false (true only for a power-of-two head_dim), got "
                                f"{kv!r}")
    return bits, dim, rotate
