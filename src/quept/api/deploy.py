"""Deployable forms of an elastic model: packed folders, the compact checkpoint,
switchable packed models and the external formats."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from quept.api.elastic import check_plan_record, prepare, spec_of
from quept.api.folders import (
    KIND_NAMES,
    ArtifactError,
    check_out_folder,
    folder_kind,
    holds_model,
    readable_kind,
)
from quept.api.models import DEFAULT_MODEL, folder_tokenizer
from quept.api.store import load
from quept.config import ConfigError, QuEPTConfig
from quept.export import compact as _compact
from quept.export.compact_fit import CompactConfig
from quept.export.load import check_model_config, parameters_on_meta
from quept.export.load import load_packed as _load_packed
from quept.export.packed import PACKED_JSON, write_packed
from quept.models import family_for_type
from quept.nn import elastic_layers
from quept.nn.switch import plan_widths
from quept.outputs import marked, unfinished
from quept.search import Plan, as_layer_widths

EXPORT_FORMATS = ("quept", "gguf", "compressed-tensors", "onnx")


EXPORT_KINDS = {"quept": "packed", "compressed-tensors": "compressed-tensors", "onnx": "onnx"}
"""The :func:`folder_kind` each folder format writes (GGUF writes a file)."""


def export(model: nn.Module, bits_or_plan: int | Mapping[str, int] | Plan,
           out: str | os.PathLike, format: str = "quept", *, tokenizer: Any = None,
           scale_dtype: str = "float16", head_bits: int | None = None,
           accuracy_level: int = 0) -> dict[str, Any]:
    """Write one configuration of an elastic model: ``"quept"`` = a packed folder ``out``
    (codes at their true width, loadable with :func:`load_packed`; ``head_bits`` also packs
    the output head and a tied embedding); ``"gguf"`` = a llama.cpp GGUF file ``out``;
    ``"compressed-tensors"`` = a Hugging Face folder ``out`` in the format of vLLM and
    transformers' compressed-tensors quantizer; ``"onnx"`` = a folder ``out`` with
    ``model.onnx`` for ONNX Runtime (MatMulNBits layers; ``accuracy_level`` 4 lets its CPU
    kernels compute with int8 activations). ``scale_dtype`` ("float16" or "float32") applies
    to the quept and compressed-tensors formats; an option of another format is refused
    (:func:`check_format_options`). Returns a summary (the packed folder's JSON)."""
    widths = check_export(model, bits_or_plan, out, format, tokenizer=tokenizer)
    check_format_options(format, scale_dtype=scale_dtype, head_bits=head_bits,
                         accuracy_level=accuracy_level)
    if format == "gguf":
        from quept.export.gguf import read_sizes, write_gguf

        result = write_gguf(model, tokenizer, out, widths)
        return {"format": "gguf", "path": str(out),
                **(result if isinstance(result, Mapping) else {}), **read_sizes(out)}
    with marked(out, KIND_NAMES[EXPORT_KINDS[format]]):
        summary = _export_folder(model, widths, out, format, tokenizer=tokenizer,
                                 scale_dtype=scale_dtype, head_bits=head_bits,
                                 accuracy_level=accuracy_level)
        copy_processor_files(model, out)
        return summary


def check_export(model: nn.Module, bits_or_plan: int | Mapping[str, int] | Plan,
                 out: str | os.PathLike, format: str = "quept", *, tokenizer: Any = None,
                 source: str | os.PathLike | None = None) -> Any:
    """What :func:`export` checks before it writes anything, and needs no codes for: the
    format, the model, ``out`` (:func:`check_export_out`: never inside ``source``, the
    folder being read, by default the quept folder the model was loaded from), and for GGUF
    the architecture, widths, tensors and tokenizer llama.cpp takes. Call it before rounding
    (quept.api.round_gptq, round_learned), which takes long; returns the layer widths."""
    widths = as_layer_widths(bits_or_plan)
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {EXPORT_FORMATS}")
    if getattr(model, "quept_switch", None) is not None:
        raise ConfigError("export reads an elastic model, and this is a switchable packed one "
                          "(quept.load_switchable), which holds one width's codes at a time; "
                          "load the elastic folder with quept.load and export that")
    if not elastic_layers(model):
        raise ConfigError("the model has no elastic layers to export; quept.prepare and "
                          "quept.calibrate it (or quept.load an elastic folder) first")
    if isinstance(bits_or_plan, Plan):
        check_plan_record(elastic_layers(model), bits_or_plan)
    check_export_out(out, format, _loaded_from(model) if source is None else source)
    if format == "gguf":
        from quept.export.gguf import check_gguf

        check_gguf(model, tokenizer, widths)
    return widths


FORMAT_OPTIONS = {"head_bits": ("quept",), "scale_dtype": ("quept", "compressed-tensors"),
                  "accuracy_level": ("onnx",)}
"""The options of :func:`export` that apply to some formats only, and those formats."""


FIXED_SCALES = {"gguf": "its blocks store float16 scales",
                "onnx": "MatMulNBits takes float32 scales"}
"""Why ``scale_dtype`` does not apply to a format: the scales it stores."""


def check_format_options(format: str, **options: Any) -> None:
    """Refuse an option of :func:`export` (one of :data:`FORMAT_OPTIONS`) given a value other
    than its default (in :func:`export`'s signature) for a format it does not apply to, where
    it would do nothing."""
    defaults = export.__kwdefaults__
    for name, value in options.items():
        formats = FORMAT_OPTIONS[name]
        if format in formats or value == defaults[name]:
            continue
        why = f" ({FIXED_SCALES[format]})" if name == "scale_dtype" else ""
        raise ConfigError(f"{name}={value!r} applies to the {' and '.join(formats)} format"
                          f"{'s' if len(formats) > 1 else ''}, not {format}{why}: leave it at "
                          f"its default ({defaults[name]!r})")


def check_export_out(out: str | os.PathLike, format: str,
                     source: str | os.PathLike | None = None) -> None:
    """Refuse an ``out`` where an export in ``format`` would spoil something: a path inside
    ``source`` (the folder being read), for GGUF a path that names a folder or a file that is
    not a GGUF file, and for a folder format a folder that holds anything but an earlier export
    of that format (:func:`check_out_folder`, :func:`_check_holds_only`)."""
    kind = "gguf" if format == "gguf" else EXPORT_KINDS[format]
    check_out_folder(out, kind, source=source)
    if format != "gguf":
        _check_holds_only(out, kind)


def _check_holds_only(out: str | os.PathLike, kind: str) -> None:
    """Refuse to write ``kind`` (a :func:`folder_kind` name) into the folder ``out`` when it
    holds files but no earlier ``kind`` written by quept (finished or stopped half way): the
    write would leave them beside its own files, to be shipped with it or taken for part of
    it. :func:`check_out_folder` has refused a folder holding another model."""
    out = Path(out)
    names = sorted(f.name for f in out.iterdir()) if out.is_dir() else []
    what = unfinished(out) if names else None
    if what is not None and what != KIND_NAMES[kind]:
        raise ConfigError(f"{out} holds {what} whose writing was stopped before it ended; "
                          f"writing {KIND_NAMES[kind]} there would mix the two: give another "
                          "folder (or delete that one)")
    if names and what is None and holds_model(out) is None:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ConfigError(f"{out} is not empty and holds no model ({shown}); writing "
                          f"{KIND_NAMES[kind]} there would leave those files beside it: give a "
                          f"new or empty folder (one holding {KIND_NAMES[kind]} is replaced)")


def _loaded_from(model: nn.Module) -> str | None:
    """The quept folder (elastic, compact or packed) ``model`` was loaded from, if any."""
    source = getattr(model, "quept_source", None)
    if not isinstance(source, str) or not Path(source).is_dir():
        return None
    try:
        return source if folder_kind(source) in ("elastic", "compact", "packed") else None
    except (OSError, ValueError):
        return None


def _export_folder(model: nn.Module, widths: Any, out: str | os.PathLike, format: str, *,
                   tokenizer: Any, scale_dtype: str, head_bits: int | None,
                   accuracy_level: int) -> dict[str, Any]:
    """:func:`export` of a folder format, once its folder is checked and marked."""
    if format == "quept":
        source = _provenance(model)
        layers = elastic_layers(model)
        chosen = plan_widths(layers, widths)
        if any(chosen[n] in m.rounded for n, m in layers.items()):
            source["rounding"] = getattr(model, "quept_rounding", "gptq")
        return write_packed(model, widths, out, tokenizer, scale_dtype=scale_dtype,
                            head_bits=head_bits, provenance=source)
    if format == "compressed-tensors":
        from quept.export.ct_format import write_compressed_tensors

        return write_compressed_tensors(model, tokenizer, out, widths, scale_dtype=scale_dtype,
                                        provenance=_provenance(model))
    from quept.export.onnx_format import write_onnx

    return write_onnx(model, tokenizer, out, widths, accuracy_level=accuracy_level,
                      provenance=_provenance(model))


def load_packed(folder: str | os.PathLike, backend: str = "auto") -> tuple[nn.Module, Any]:
    """A packed folder's model (inference modules only, built on meta then filled) and
    tokenizer."""
    readable_kind(folder)
    net = _load_packed(folder, backend=backend)
    net.quept_source = str(folder)
    net.quept_calibration_text = net.quept_packed.get("source", {}).get("calibration_text")
    return net, folder_tokenizer(folder)


def save_compact(model: nn.Module, folder: str | os.PathLike, config: QuEPTConfig | None = None,
                 tokenizer: Any = None, compact: CompactConfig | None = None) -> dict[str, Any]:
    """Write the compact elastic checkpoint of a calibrated model (every width, ~10 bits per
    weight); ``config`` defaults to the model's spec with default calibration settings."""
    config = config or QuEPTConfig(spec=spec_of(model))
    if not isinstance(config, QuEPTConfig):
        raise ConfigError(f"save_compact's config is a QuEPTConfig (or None: the model's "
                          f"spec), got {type(config).__name__}")
    check_out_folder(folder, "compact")
    _check_holds_only(folder, "compact")
    source = _provenance(model)
    with marked(folder, KIND_NAMES["compact"]):
        meta = _compact.save_compact(model, folder, tokenizer, config, compact, source)
        copy_processor_files(model, folder)
        return meta


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja")
"""What a model folder keeps besides its tokenizer for feeding the model (an image
processor, a multimodal processor, a chat template): exports carry them over."""


def copy_processor_files(model: nn.Module, out: str | os.PathLike) -> list[str]:
    """Copy the :data:`PROCESSOR_FILES` of the folder ``model`` was loaded from (its base
    model's, for an elastic model) into ``out``, where the writer did not write them itself,
    so an exported ViT or vision-language model can be fed images by other runtimes; returns
    the names copied."""
    source = getattr(model, "quept_source", None)  # the built-in models keep none
    if not isinstance(source, str) or not Path(source).is_dir():
        return []
    copied = []
    for name in PROCESSOR_FILES:
        src, dst = Path(source) / name, Path(out) / name
        if src.is_file() and not dst.exists():
            shutil.copyfile(src, dst)
            copied.append(name)
    return copied


def load_compact(folder: str | os.PathLike) -> tuple[nn.Module, Any]:
    """The elastic model of a compact checkpoint (its weights are the dequantized master) and
    its tokenizer; it switches widths and exports like a calibrated model."""
    readable_kind(folder)
    net, meta = _compact_shell(folder)
    net.quept_compact = _compact.restore_compact(net, folder)
    net.eval().requires_grad_(False)
    return net, folder_tokenizer(folder)


def _compact_shell(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The compact checkpoint's model built on the meta device and prepared with its spec."""
    from transformers import AutoConfig

    meta = _compact.read_compact_meta(folder)
    cfg = QuEPTConfig.from_dict(meta["config"])
    check_model_config(Path(folder), "a compact checkpoint", "quept compact",
                       _compact.COMPACT_JSON, meta["model_type"])
    hf_cfg = AutoConfig.from_pretrained(folder)
    fam = family_for_type(hf_cfg.model_type)
    with parameters_on_meta():
        net = fam.model_class().from_config(hf_cfg)
    prepare(net, cfg.spec, seed=cfg.calib.seed)
    net.quept_source = str(folder)
    net.quept_calibration_text = meta.get("source", {}).get("calibration_text")
    return net, meta


def load_switchable(folder: str | os.PathLike, bits: int | Mapping[str, int] | Plan, *,
                    backend: str = "auto", scale_dtype: str = "float16",
                    head_bits: int | None = None, keep_bytes: int = 0,
                    model: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """A packed model that switches width at run time: the elastic or compact folder's layers
    packed at ``bits`` (a width or a plan), running on the integer codes like a packed folder;
    :func:`set_bits` re-packs them for another width or plan. From a compact checkpoint only
    its tensors (~10 bits per weight) stay in memory besides the packed codes; from an elastic
    folder the float layers stay. ``head_bits`` (e.g. 8) also packs the output head and a tied
    embedding, as ``quept export --head-bits`` does. ``keep_bytes`` keeps the packed layers of
    widths switched away from, up to that many bytes (least recently used dropped first), so
    that switching back to them packs nothing. ``model.quept_switch`` reports sizes and the
    current widths."""
    from quept.export.switchable import make_switchable, switchable_from_compact

    widths = as_layer_widths(bits)
    if (Path(folder) / PACKED_JSON).is_file():
        raise ArtifactError(f"{folder} is a packed folder of one configuration, which does not "
                            "switch: load it with quept.api.load_packed, or switch from the "
                            "elastic folder or compact checkpoint it was exported from")
    if (Path(folder) / _compact.COMPACT_JSON).is_file():
        net, meta = _compact_shell(folder)
        switchable_from_compact(net, folder, meta, widths, backend=backend,
                                scale_dtype=scale_dtype, head_bits=head_bits,
                                keep_bytes=keep_bytes)
        net.quept_compact = meta
        tok = folder_tokenizer(folder)
    else:
        net, tok = load(folder, model)
        make_switchable(net, widths, backend=backend, scale_dtype=scale_dtype,
                        head_bits=head_bits, keep_bytes=keep_bytes)
    net.eval().requires_grad_(False)
    return net, tok


def _provenance(model: nn.Module) -> dict[str, Any]:
    """What an export (packed, compressed-tensors, ONNX) or compact checkpoint records of where
    its model came from: the base model (an encoder's fidelity is measured against it), and
    the sample of the calibration text ``quept quantize`` kept (so that an evaluation of the
    export on that text is warned of too)."""
    source = {"base_model": getattr(model, "quept_source", DEFAULT_MODEL)}
    calibration_text = getattr(model, "quept_calibration_text", None)
    if isinstance(calibration_text, dict):
        source["calibration_text"] = calibration_text
    return source
