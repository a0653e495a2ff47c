"""What a folder or file holds, read from its JSON and tensor headers alone (no weights
loaded): :func:`describe`."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open

from quept.api import (
    ELASTIC_JSON,
    ELASTIC_WEIGHTS,
    SENSITIVITY_EXACT_JSON,
    SENSITIVITY_JSON,
    SWEEPS_JSON,
    ArtifactError,
    read_meta,
    readable_kind,
)
from quept.api.folders import busy, is_gguf
from quept.api.store import UNCALIBRATED, check_same_save
from quept.calib.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_DISCARD,
    PROGRESS_JSON,
    CalibCheckpoint,
    CheckpointCorruptError,
)
from quept.checks import ConfigError, check_json_fields, read_json_object
from quept.config import CalibConfig, ElasticSpec, QuEPTConfig
from quept.export.compact import COMPACT_JSON, COMPACT_WEIGHTS, read_compact_meta
from quept.export.gguf import linear_sizes
from quept.export.load import check_model_config, read_packed_meta
from quept.export.onnx_nbits import OnnxExportError
from quept.export.onnx_runtime import EXPORT_SUMMARY, check_width_label, read_onnx_summary
from quept.export.packed import PACKED_JSON, PACKED_WEIGHTS, PackedFormatError
from quept.models.families import UnsupportedModelError, family_for_type
from quept.nn.switch import is_pattern
from quept.ops.quant import stored_bits_per_weight
from quept.search.plan import PLAN_FORMAT, Plan, unit_of
from quept.search.plan_files import read_plan
from quept.search.sweeps import describe_sweeps
from quept.search.table import SensitivityCacheError, SensitivityTable

EXPORT_JSON = EXPORT_SUMMARY  # compressed-tensors and ONNX exports' summary


class InfoError(ValueError):
    """The path is not an artifact quept can describe, or its metadata is damaged."""


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``quept info`` reports about ``path``, as plain JSON types."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return _plan(path)
        if path.suffix != ".gguf":
            raise InfoError(f"{path} is a file; quept info reads a .gguf file, a plan JSON "
                            "from `quept plan`, or a folder (elastic, compact, packed, "
                            "compressed-tensors, ONNX or Hugging Face model)")
        return _gguf(path)
    running = path.is_dir() and busy(path)  # a `quept quantize` writing it right now
    kind = readable_kind(path)
    if running or (kind == "hf" and not (path / "config.json").is_file()):
        for ckpt in (path / CHECKPOINT_DIR, path):
            if (ckpt / PROGRESS_JSON).is_file():
                return {"path": str(path), "kind": "calibration checkpoint",
                        **_checkpoint(ckpt), "running": running, "files": _files(ckpt)}
        if running:
            raise InfoError(f"{path} is being written by a running `quept quantize`, which has "
                            "not finished its first block yet; `quept info` describes its "
                            "progress once it has")
        if any(_is_plan(f) for f in path.glob("*.json")):  # `quept plan ... --out DIR`
            plans = sorted((_plan(f) for f in path.glob("*.json") if _is_plan(f)),
                           key=lambda d: d["bits_per_weight"])
            return {"path": str(path), "kind": "plans", "plans": plans, "files": _files(path)}
    info = {"elastic": _elastic, "compact": _compact, "packed": _packed,
            "compressed-tensors": _compressed_tensors, "onnx": _onnx, "hf": _hf}[kind](path)
    info["files"] = _files(path)
    return {"path": str(path), "kind": kind, **info}


def _is_plan(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == PLAN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _plan(path: Path) -> dict[str, Any]:
    """A mixed-precision plan written by `quept plan`: its budget, what it realises, the widths
    per block and how it was chosen."""
    d = _json(path)
    if "format" not in d:
        return _hand_plan(path)
    if d.get("format") != PLAN_FORMAT:
        raise InfoError(f"{path} is not a plan from `quept plan` (format {d.get('format')!r}); "
                        "quept info reads plan JSON files, .gguf files and artifact folders")
    try:
        plan = Plan.from_dict(d, str(path))
    except ConfigError as e:
        raise InfoError(str(e)) from None
    blocks: dict[str, list[int]] = {}
    for name, b in plan.widths.items():
        blocks.setdefault(unit_of(name, "block"), []).append(b)
    return {"path": str(path), "kind": "plan", "budget": plan.budget,
            "bits_per_weight": plan.bits_per_weight, "stored_bytes": plan.stored_bytes,
            "n_weights": plan.n_weights, "layers": len(plan.widths),
            "layers_per_width": {str(b): n for b, n in plan.histogram().items()},
            "blocks": {u: sorted(set(w)) for u, w in blocks.items()}, "chosen": plan.label,
            "predicted_kl": plan.predicted_kl, "checked_kl": plan.checked_kl,
            "objective": plan.objective, "constraints": list(plan.constraints),
            "refinement": None if plan.refinement is None else plan.refinement.to_dict(),
            "files": {path.name: path.stat().st_size}}


def _hand_plan(path: Path) -> dict[str, Any]:
    """A hand-written plan ``{layer name or pattern: bits}``: its entries, in the order they
    apply. What it stores depends on the model's layers, so only `quept eval` reports that."""
    try:
        entries = read_plan(path)
    except ConfigError as e:
        raise InfoError(f"{e}; quept info reads plan JSON files, .gguf files and artifact "
                        "folders") from None
    assert isinstance(entries, dict)  # a `quept plan` file was handled by the caller
    names = {k: b for k, b in entries.items() if not is_pattern(k)}
    blocks: dict[str, list[int]] = {}
    for name, b in names.items():
        blocks.setdefault(unit_of(name, "block"), []).append(b)
    return {"path": str(path), "kind": "hand plan", "entries": entries,
            "patterns": sum(is_pattern(k) for k in entries), "names": len(names),
            "widths": sorted(set(entries.values())),
            "blocks": {u: sorted(set(w)) for u, w in blocks.items()},
            "files": {path.name: path.stat().st_size}}


def _json(path: Path) -> dict[str, Any]:
    return read_json_object(path, InfoError)


def _shapes(path: Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor of a safetensors file, from its header."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise InfoError(f"{path} is missing") from None
    except Exception as e:  # safetensors raises several types for a damaged header
        raise InfoError(f"{path} cannot be read: {e}") from None


def _files(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}


def _config(meta: dict[str, Any], where: Path) -> QuEPTConfig:
    try:
        return QuEPTConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise InfoError(f"{where}: its quantization config cannot be read: {e}") from None


def _spec_summary(cfg: QuEPTConfig) -> dict[str, Any]:
    s = cfg.spec
    return {
        "widths": sorted(s.bits),
        "bit_groups": [list(g) for g in s.bit_groups],
        "ranks": list(s.ranks),
        "group_size": {str(b): s.group_size_for(b) for b in sorted(s.bits)},
        "activations": s.activations,
        "rotation": s.rotation,
        "kv_bits": s.kv_bits,
        "unclipped_bits": sorted(s.unclipped_bits),
        "protect_outliers": s.protect_outliers,
    }


def _calib_summary(c: CalibConfig) -> dict[str, Any]:
    return {"samples": c.n_samples, "seq_len": c.seq_len, "epochs": c.epochs,
            "batch_size": c.batch_size, "loss": c.loss, "lr_adapter": c.lr_adapter,
            "lr_adapter_groups": None if c.lr_adapter_groups is None
            else list(c.lr_adapter_groups), "lr_clip": c.lr_clip,
            "massive_ratio": c.massive_ratio, "seed": c.seed, "bf16": c.bf16}


def _width_rows(cfg: QuEPTConfig, shapes: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Stored bits per weight and bytes of the quantized linears at every width."""
    weights = sum(o * i for o, i in shapes.values())
    rows = []
    for b in sorted(cfg.spec.bits):
        bits = sum(stored_bits_per_weight(b, cfg.spec.group_size_for(b), i, o) * o * i
                   for o, i in shapes.values())
        rows.append({"bits": b, "bits_per_weight": bits / max(weights, 1),
                     "quantized_bytes": bits / 8})
    return rows


def _elastic(folder: Path) -> dict[str, Any]:
    try:
        meta = read_meta(folder)
        check_same_save(folder, meta)  # weights and JSON of one save (a header read)
    except ArtifactError as e:
        raise InfoError(str(e)) from None
    cfg = _config(meta, folder / ELASTIC_JSON)
    header = _shapes(folder / ELASTIC_WEIGHTS)
    shapes = {}
    for name in meta["layers"]:
        u, v = header.get(f"{name}.lora_u"), header.get(f"{name}.lora_v")
        if u is None or v is None:
            raise InfoError(f"{folder / ELASTIC_WEIGHTS} has no adapter of layer {name}, which "
                            f"{ELASTIC_JSON} lists: the folder is damaged or mixed up")
        shapes[name] = (u[0], v[1])
    info: dict[str, Any] = {
        "quept_version": meta.get("quept_version"),
        "base_model": meta["base_model"],
        "model_type": meta["model_type"],
        "task": _task(meta["model_type"]),
        "base_fingerprint": meta["base_fingerprint"],
        "layers": len(shapes),
        "quantized_weights": sum(o * i for o, i in shapes.values()),
        "spec": _spec_summary(cfg),
        "calibration": {**_calib_summary(cfg.calib),
                        "seconds": meta.get("calibration_seconds"),
                        "peak_rss_gib": meta.get("calibration_peak_rss_gib"),
                        "text": _calibration_text_name(meta),
                        "images": _calibration_images(meta)},
        "widths": _width_rows(cfg, shapes),
    }
    if meta.get(UNCALIBRATED) is False:
        info["calibrated"] = False
    if meta.get("evaluation"):
        info["evaluation"] = meta["evaluation"]
    ckpt = folder / CHECKPOINT_DIR
    if (ckpt / PROGRESS_JSON).is_file():  # quept quantize --keep-streams
        info["checkpoint_bytes"] = sum(_files(ckpt).values())
    for key, name in (("sensitivity", SENSITIVITY_JSON), ("sensitivity_exact",
                                                           SENSITIVITY_EXACT_JSON)):
        if (folder / name).is_file():
            try:
                t = SensitivityTable.load(folder / name)
            except SensitivityCacheError as e:  # a cache: `quept plan` measures it again
                info[key] = {"error": str(e)}
                continue
            info[key] = {"layers": len(t.kl), "widths": list(t.bits), "seconds": t.seconds,
                         "settings": t.settings}
    sweeps = folder / SWEEPS_JSON
    if sweeps.is_file():
        try:
            info["sweeps"] = describe_sweeps(_json(sweeps))
        except InfoError as e:  # a cache: `quept plan` measures again and rewrites it
            info["sweeps"] = {"error": str(e)}
    return info


def _source(meta: dict[str, Any]) -> dict[str, Any] | None:
    """A packed folder's or compact checkpoint's provenance, its calibration text by name
    (the sample of it kept for overlap warnings is left out)."""
    source = meta.get("source")
    if not isinstance(source, dict) or "calibration_text" not in source:
        return source
    return {**source, "calibration_text": _calibration_text_name(source)}


def _task(model_type: Any) -> str | None:
    """The task of a model type's family ("causal-lm", "encoder", "image-classification");
    None for a type quept does not support."""
    try:
        return family_for_type(model_type).task
    except UnsupportedModelError:
        return None


def _calibration_images(meta: dict[str, Any]) -> str | None:
    """Where an image classifier's calibration images came from ("Fashion-MNIST training"),
    as ``quept quantize`` recorded it; None where not recorded (the Python API)."""
    name = meta.get("calibration_images")
    return name if isinstance(name, str) else None


def _calibration_text_name(meta: dict[str, Any]) -> str | None:
    """What the elastic model was calibrated on, as ``quept quantize`` recorded it."""
    record = meta.get("calibration_text")
    name = record.get("name") if isinstance(record, dict) else None
    return name if isinstance(name, str) else None


def _checkpoint(folder: Path) -> dict[str, Any]:
    """An unfinished `quept quantize`: the blocks done so far and how they were calibrated
    (progress.json checked as resuming checks it; damage is named with its remedy)."""
    try:
        prog = CalibCheckpoint(folder, {}).progress()
        fp = prog["fingerprint"]
        cfg = QuEPTConfig(spec=ElasticSpec.from_dict(fp["spec"]),
                          calib=CalibConfig.from_dict(fp["calib"]))
    except (CheckpointCorruptError, ConfigError) as e:
        raise InfoError(f"{folder / PROGRESS_JSON} cannot be read as a calibration checkpoint: "
                        f"{e}" + ("" if isinstance(e, CheckpointCorruptError) else
                                  f"; {CHECKPOINT_DISCARD}")) from None
    reports = prog["reports"]
    last = reports[-1] if reports else {}
    return {"blocks_done": prog["next_block"], "seconds": sum(r["seconds"] for r in reports),
            "last_block": {k: last[k] for k in ("block", "bits", "loss_before",
                                                 "loss_after")} if last else None,
            "spec": _spec_summary(cfg), "calibration": _calib_summary(cfg.calib)}


def _check_model_config(folder: Path, meta: dict[str, Any], holds: str, listed_in: str,
                        made_by: str) -> None:
    """:func:`quept.export.load.check_model_config`, its refusal an InfoError."""
    try:
        check_model_config(folder, holds, made_by, listed_in, meta["model_type"])
    except PackedFormatError as e:
        raise InfoError(str(e)) from None


def _compact(folder: Path) -> dict[str, Any]:
    try:
        meta = read_compact_meta(folder)
    except PackedFormatError as e:
        raise InfoError(str(e)) from None
    _check_model_config(folder, meta, "a compact checkpoint", COMPACT_JSON, "quept compact")
    cfg = _config(meta, folder / COMPACT_JSON)
    shapes = {n: tuple(s) for n, s in meta["layers"].items()}
    _check_tensors(folder / COMPACT_WEIGHTS, shapes, "master", COMPACT_JSON)
    s = meta["sizes"]
    return {"model_type": meta["model_type"], "task": _task(meta["model_type"]),
            "layers": len(shapes), "quantized_weights": s.get("quantized_weights"),
            "bits_per_weight": s.get("bits_per_weight"),
            "parts_bits_per_weight": s.get("parts_bits_per_weight"),
            "other_bytes": s.get("other_bytes"), "spec": _spec_summary(cfg),
            "widths": _width_rows(cfg, shapes), "source": _source(meta)}


def _packed(folder: Path) -> dict[str, Any]:
    try:
        meta = read_packed_meta(folder)
    except PackedFormatError as e:
        raise InfoError(str(e)) from None
    _check_model_config(folder, meta, "a packed model", PACKED_JSON, "quept export")
    layers = meta["layers"]
    _check_tensors(folder / PACKED_WEIGHTS, layers, "qweight", PACKED_JSON,
                   meta.get("aliases", {}))
    acts = Counter(i.get("act_quant") for i in layers.values() if i.get("act_bits"))
    kv = {i["kv_quant"].get("bits") for i in layers.values()
          if isinstance(i.get("kv_quant"), dict)}
    s = meta["sizes"]
    return {"model_type": meta["model_type"], "task": _task(meta["model_type"]),
            "bits": meta["bits"], "layers": len(layers),
            "layer_widths": _histogram(i["bits"] for i in layers.values()),
            "group_size": sorted({i["group_size"] for i in layers.values()}),
            "scale_dtype": meta["scale_dtype"],
            "activations": sorted(a for a in acts if a) or None,
            "kv_bits": sorted(kv) or None,
            "rotation": "hadamard" if any(i.get("in_rotation") for i in layers.values())
            else None,
            "head": {n: i["bits"] for n, i in meta.get("head", {}).items()} or None,
            "quantized_weights": s.get("quantized_weights"),
            "bits_per_weight": s.get("bits_per_weight"),
            "quantized_bytes": s.get("quantized_bytes"), "head_bytes": s.get("head_bytes"),
            "other_bytes": s.get("other_bytes"), "source": _source(meta)}


def _check_tensors(path: Path, layers: Any, suffix: str, listed_in: str,
                   aliases: Any = ()) -> None:
    """The safetensors file ``path`` can be read (its header) and holds the ``suffix`` tensor
    (codes, master) of every layer its folder's JSON lists."""
    header = _shapes(path)
    for name in layers:
        key = f"{name}.{suffix}"
        if key not in header and key not in aliases:
            raise InfoError(f"{path} has no {suffix} tensor of layer {name}, which {listed_in} "
                            "lists: the folder is damaged or mixed up")


def _histogram(values: Any) -> dict[str, int]:
    c = Counter("float" if v is None else str(v) for v in values)
    return dict(sorted(c.items(), key=lambda kv: (kv[0] == "float", kv[0])))


def _export_summary(folder: Path) -> dict[str, Any]:
    path = folder / EXPORT_JSON
    if not path.is_file():
        return {}
    s = _json(path)
    check_json_fields(s, {}, path, InfoError, optional=_EXPORT_FIELDS)
    if "bits" in s and "widths" in s:
        check_width_label(s, path, InfoError)
    return {k: s[k] for k in _EXPORT_FIELDS if k in s}


_EXPORT_FIELDS = {"bits": (int, str), "widths": dict, "float_layers": int,
                  "quantized_weights": int, "quantized_bytes": float, "bits_per_weight": float,
                  "scale_dtype": str, "containers": dict, "accuracy_level": int, "opset": int,
                  "task": str}
"""What `quept info` shows of an export's summary, and of which kind."""


def _model_config(folder: Path) -> dict[str, Any]:
    cfg = _json(folder / "config.json")
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
    return {k: cfg[k] for k in keys if k in cfg}


def _compressed_tensors(folder: Path) -> dict[str, Any]:
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise InfoError(f"{folder} holds no .safetensors file: its compressed-tensors weights "
                        "are missing; export it again with `quept export --format "
                        "compressed-tensors`")
    for f in weights:
        _shapes(f)  # a damaged or cut-short file is named
    path = folder / "config.json"
    qc = _json(path)["quantization_config"]
    check_json_fields(qc, {"config_groups": dict}, f"{path} (its quantization_config)",
                      InfoError, optional={"ignore": list, "format": str})
    groups = []
    for name, g in qc["config_groups"].items():
        if not isinstance(g, dict):
            raise InfoError(f"{path} is damaged: config group {name!r} is not an object")
        check_json_fields(g, {"targets": list}, f"{path} (config group {name})", InfoError,
                          optional={"weights": (dict, type(None))})
        w = g.get("weights") or {}
        groups.append({"name": name, "num_bits": w.get("num_bits"),
                       "group_size": w.get("group_size"), "symmetric": w.get("symmetric"),
                       "strategy": w.get("strategy"), "targets": len(g.get("targets", [])),
                       "activations": g.get("input_activations") is not None})
    return {**_model_config(folder), "format": qc.get("format"), "groups": groups,
            "ignore": len(qc.get("ignore") or []), "export": _export_summary(folder)}


def _onnx(folder: Path) -> dict[str, Any]:
    try:
        read_onnx_summary(folder)  # checked as running it checks it
    except OnnxExportError as e:
        raise InfoError(str(e)) from None
    info = {"export": _export_summary(folder),
            "genai_config": (folder / "genai_config.json").is_file()}
    if (folder / "config.json").is_file():
        info.update(_model_config(folder))
    return info


def _hf(folder: Path) -> dict[str, Any]:
    if not (folder / "config.json").is_file():
        raise InfoError(f"{folder} is not a quept artifact or a Hugging Face model folder (no "
                        f"{ELASTIC_JSON}, {PACKED_JSON}, {COMPACT_JSON}, config.json or plan "
                        "files)")
    info = _model_config(folder)
    params = 0
    for f in sorted(folder.glob("*.safetensors")):
        params += sum(math.prod(s) for s in _shapes(f).values())
    info["parameters"] = params or None
    try:
        info["family"] = family_for_type(info.get("model_type", "")).name
    except UnsupportedModelError as e:  # names the supported model types
        info["family"] = None
        info["unsupported"] = str(e)
    return info


def _gguf(path: Path) -> dict[str, Any]:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise InfoError("reading a .gguf file needs the gguf package: pip install -e "
                        "\".[hf]\"") from None
    if not is_gguf(path):
        raise InfoError(f"{path} cannot be read as GGUF: it does not start with the GGUF "
                        "magic bytes, so it is not a GGUF file")
    size = path.stat().st_size
    try:
        r = GGUFReader(str(path))
    except Exception as e:  # the reader raises several types for a cut-short or damaged file
        raise InfoError(f"{path} is truncated or damaged: its {size} bytes do not hold the "
                        f"header and tensors it describes ({e})") from None
    ends = [int(t.data_offset) + int(t.n_bytes) for t in r.tensors]
    if ends and max(ends) > size:
        raise InfoError(f"{path} is truncated or damaged: its tensors need {max(ends)} bytes, "
                        f"the file holds {size}")
    fields = {}
    for key in ("general.architecture", "general.name", "general.file_type"):
        f = r.fields.get(key)
        if f is not None:
            fields[key] = f.contents()
    types = Counter(t.tensor_type.name for t in r.tensors)
    return {"path": str(path), "kind": "gguf", **fields, "tensors": len(r.tensors),
            "tensor_types": dict(sorted(types.items())), **linear_sizes(r.tensors),
            "files": {path.name: path.stat().st_size}}
