"""What an artifact holds, read from its JSON and tensor headers alone: no weights are loaded
and no base model is needed (``quept info PATH``).

:func:`describe` returns a JSON-ready dict for any folder quept reads or writes (elastic,
compact, packed, compressed-tensors, ONNX, a plain Hugging Face model) or a ``.gguf`` file;
:func:`render` turns it into the lines ``quept info`` prints.
"""

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
from quept.calib.checkpoint import CHECKPOINT_DIR, PROGRESS_JSON
from quept.config import (
    CalibConfig,
    ConfigError,
    ElasticSpec,
    QuEPTConfig,
    check_json_fields,
    read_json_object,
)
from quept.export.compact import COMPACT_JSON, read_compact_meta
from quept.export.load import read_packed_meta
from quept.export.packed import PACKED_JSON, PackedFormatError
from quept.models.families import UnsupportedModelError, family_for_type
from quept.nn.switch import is_pattern
from quept.ops.quant import stored_bits_per_weight
from quept.search.objective import cost_number, cost_words
from quept.search.plan import PLAN_FORMAT, Plan, read_plan, unit_of
from quept.search.sweeps import describe_sweeps
from quept.search.table import SensitivityCacheError, SensitivityTable

EXPORT_JSON = "quept-export.json"  # compressed-tensors and ONNX exports' summary


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
    kind = readable_kind(path)
    if kind == "hf" and not (path / "config.json").is_file():
        for ckpt in (path / CHECKPOINT_DIR, path):
            if (ckpt / PROGRESS_JSON).is_file():
                return {"path": str(path), "kind": "calibration checkpoint",
                        **_checkpoint(ckpt), "files": _files(ckpt)}
        if any(_is_plan(f) for f in path.glob("*.json")):  # `quept plan ... --out DIR`
            plans = sorted((_plan(f) for f in path.glob("*.json") if _is_plan(f)),
                           key=lambda d: d["bits_per_weight"])
            return {"path": str(path), "kind": "plans", "plans": plans, "files": _files(path)}
    info = {"elastic": _elastic, "compact": _compact, "packed": _packed,
            "compressed-tensors": _compressed_tensors, "onnx": _onnx, "hf": _hf}[kind](path)
    info["files"] = _files(path)
    return {"path": str(path), "kind": kind, **info}


# --- readers ------------------------------------------------------------------------------------
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
            "objective": plan.objective,
            "constraints": list(plan.constraints), "files": {path.name: path.stat().st_size}}


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
        bits = sum(stored_bits_per_weight(b, cfg.spec.group_size_for(b), i) * o * i
                   for o, i in shapes.values())
        rows.append({"bits": b, "bits_per_weight": bits / max(weights, 1),
                     "quantized_bytes": bits / 8})
    return rows


def _elastic(folder: Path) -> dict[str, Any]:
    try:
        meta = read_meta(folder)
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
        "base_fingerprint": meta["base_fingerprint"],
        "layers": len(shapes),
        "quantized_weights": sum(o * i for o, i in shapes.values()),
        "spec": _spec_summary(cfg),
        "calibration": {**_calib_summary(cfg.calib),
                        "seconds": meta.get("calibration_seconds"),
                        "peak_rss_gib": meta.get("calibration_peak_rss_gib"),
                        "text": _calibration_text_name(meta)},
        "widths": _width_rows(cfg, shapes),
    }
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


def _calibration_text_name(meta: dict[str, Any]) -> str | None:
    """What the elastic model was calibrated on, as ``quept quantize`` recorded it."""
    record = meta.get("calibration_text")
    name = record.get("name") if isinstance(record, dict) else None
    return name if isinstance(name, str) else None


def _checkpoint(folder: Path) -> dict[str, Any]:
    """An unfinished `quept quantize`: the blocks done so far and how they were calibrated."""
    prog = _json(folder / PROGRESS_JSON)
    fp = prog.get("fingerprint") or {}
    try:
        cfg = QuEPTConfig(spec=ElasticSpec.from_dict(fp["spec"]),
                          calib=CalibConfig.from_dict(fp["calib"]))
        done = int(prog["next_block"])
    except (KeyError, TypeError, ValueError) as e:
        raise InfoError(f"{folder / PROGRESS_JSON} cannot be read as a calibration checkpoint: "
                        f"{e!r}") from None
    reports = prog.get("reports") or []
    last = reports[-1] if reports else {}
    return {"blocks_done": done, "seconds": sum(r.get("seconds", 0.0) for r in reports),
            "last_block": {k: last.get(k) for k in ("block", "bits", "loss_before",
                                                     "loss_after")} if last else None,
            "spec": _spec_summary(cfg), "calibration": _calib_summary(cfg.calib)}


def _compact(folder: Path) -> dict[str, Any]:
    try:
        meta = read_compact_meta(folder)
    except PackedFormatError as e:
        raise InfoError(str(e)) from None
    cfg = _config(meta, folder / COMPACT_JSON)
    shapes = {n: tuple(s) for n, s in meta["layers"].items()}
    s = meta["sizes"]
    return {"model_type": meta["model_type"], "layers": len(shapes),
            "quantized_weights": s.get("quantized_weights"),
            "bits_per_weight": s.get("bits_per_weight"),
            "parts_bits_per_weight": s.get("parts_bits_per_weight"),
            "other_bytes": s.get("other_bytes"), "spec": _spec_summary(cfg),
            "widths": _width_rows(cfg, shapes), "source": meta.get("source")}


def _packed(folder: Path) -> dict[str, Any]:
    try:
        meta = read_packed_meta(folder)
    except PackedFormatError as e:
        raise InfoError(str(e)) from None
    layers = meta["layers"]
    acts = Counter(i.get("act_quant") for i in layers.values() if i.get("act_bits"))
    kv = {i["kv_quant"].get("bits") for i in layers.values()
          if isinstance(i.get("kv_quant"), dict)}
    s = meta["sizes"]
    return {"model_type": meta["model_type"], "bits": meta["bits"],
            "layers": len(layers),
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
            "other_bytes": s.get("other_bytes"), "source": meta.get("source")}


def _histogram(values: Any) -> dict[str, int]:
    c = Counter("float" if v is None else str(v) for v in values)
    return dict(sorted(c.items(), key=lambda kv: (kv[0] == "float", kv[0])))


def _export_summary(folder: Path) -> dict[str, Any]:
    path = folder / EXPORT_JSON
    if not path.is_file():
        return {}
    s = _json(path)
    check_json_fields(s, {}, path, InfoError, optional=_EXPORT_FIELDS)
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
    try:
        r = GGUFReader(str(path))
    except Exception as e:  # the reader raises several types for a damaged file
        raise InfoError(f"{path} cannot be read as GGUF: {e}") from None
    fields = {}
    for key in ("general.architecture", "general.name", "general.file_type"):
        f = r.fields.get(key)
        if f is not None:
            fields[key] = f.contents()
    types = Counter(t.tensor_type.name for t in r.tensors)
    return {"path": str(path), "kind": "gguf", **fields, "tensors": len(r.tensors),
            "tensor_types": dict(sorted(types.items())),
            "files": {path.name: path.stat().st_size}}


# --- text ---------------------------------------------------------------------------------------
def _bits(x: float | None) -> str:
    return "?" if x is None else f"{x:.3f}"


def _table_words(s: dict[str, Any]) -> str:
    """A cached sensitivity table's size and time: "210 layers x 7 widths, measured in 126 s"."""
    return (f"{s['layers']} layers x {len(s['widths'] or [])} widths"
            + ("" if s.get("seconds") is None else f", measured in {s['seconds']:.0f} s"))


def _mb(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _spec_lines(s: dict[str, Any]) -> list[str]:
    groups = " ".join("{" + ",".join(map(str, g)) + "}" for g in s["bit_groups"])
    sizes = sorted(set(s["group_size"].values()))
    mode = "weight-only" if s["activations"] in (None, "none") else \
        f"weights and activations ({s['activations']})"
    extras = [mode]
    if s.get("rotation") not in (None, "none"):
        extras.append(f"rotation {s['rotation']}")
    if s.get("kv_bits"):
        extras.append(f"KV cache at {s['kv_bits']} bits")
    if s.get("unclipped_bits"):
        extras.append("unclipped (min..max) at " + ", ".join(f"W{b}" for b in
                                                              s["unclipped_bits"]))
    if s.get("protect_outliers"):
        extras.append(f"super weights protected ({s['protect_outliers']})")
    return [f"widths {min(s['widths'])}..{max(s['widths'])} in bit groups {groups}, adapter "
            f"ranks {'/'.join(map(str, s['ranks']))}, group size "
            f"{'/'.join(str(g) if g else 'per channel' for g in sizes)}",
            "; ".join(extras)]


def _value(metric: str, v: float | None) -> str:
    if v is None:
        return ""
    if metric == "perplexity":
        return f"{v:.2f}"
    return f"{100 * v:.2f}%" if "accuracy" in metric else f"{v:.4f}"


def _width_table(rows: list[dict[str, Any]], evaluation: dict[str, Any] | None,
                 activations: bool = False) -> list[str]:
    """One line per width: stored bits per weight, bytes, and what calibration measured."""
    ev = {r.get("bits"): r for r in (evaluation or {}).get("rows", [])}
    metric = (evaluation or {}).get("metric", "")
    head = "| width | stored bits/weight | quantized MB |" + (f" {metric} | RTN |" if ev else "")
    lines = [head, "|---|---|---|" + ("---|---|" if ev else "")]
    if None in ev:
        lines.append(f"| float | 32 | | {_value(metric, ev[None].get('value'))} | |")
    for r in rows:
        label = f"W{r['bits']}A{r['bits']}" if activations else f"W{r['bits']}"
        line = f"| {label} | {r['bits_per_weight']:.3f} | {r['quantized_bytes'] / 1e6:.2f} |"
        if ev:
            e = ev.get(r["bits"], {})
            line += f" {_value(metric, e.get('value'))} | {_value(metric, e.get('rtn'))} |"
        lines.append(line)
    return lines


def _calib_line(verb: str, c: dict[str, Any]) -> str:
    rates = (f"{c['lr_adapter']:g}" if not c.get("lr_adapter_groups") else
             "/".join(f"{r:g}" for r in c["lr_adapter_groups"]))
    loss = c["loss"] + (f" + massive-activation term (ratio {c['massive_ratio']:g})"
                        if c.get("massive_ratio") else "")
    text = f" of {c['text']}" if c.get("text") else ""
    return (f"{verb} on {c['samples']} x {c['seq_len']} tokens{text}, {c['epochs']} "
            f"epoch{'s' if c['epochs'] != 1 else ''}, {loss} loss, rates {rates} (adapters) / "
            f"{c['lr_clip']:g} (clips), seed {c['seed']}"
            + (", steps in bfloat16" if c.get("bf16") else ""))


def render(info: dict[str, Any]) -> str:
    """The lines ``quept info`` prints for a :func:`describe` result."""
    kind, out = info["kind"], []
    total = sum(info.get("files", {}).values())
    if kind == "elastic":
        c = info["calibration"]
        out.append(f"{info['path']}: elastic model (quept {info['quept_version']}) of "
                   f"{info['base_model']} ({info['model_type']}), {info['layers']} quantized "
                   f"linears, {info['quantized_weights'] / 1e6:.1f}M weights")
        out += _spec_lines(info["spec"])
        took = "" if c["seconds"] is None else f"; took {c['seconds']:.0f} s"
        if c.get("peak_rss_gib"):
            took += f", peak memory {c['peak_rss_gib']:.2f} GiB"
        out.append(_calib_line("calibrated", c) + took)
        ev = info.get("evaluation")
        if ev:
            out.append(f"measured after calibration: {ev.get('metric')} on {ev.get('data')}")
        out += _width_table(info["widths"], ev,
                            info["spec"]["activations"] not in (None, "none"))
        if info.get("checkpoint_bytes"):
            out.append(f"calibration checkpoint kept in {CHECKPOINT_DIR} with every block's "
                       f"input streams ({_mb(info['checkpoint_bytes'])}; --keep-streams)")
        tables = [info.get(k) or {} for k in ("sensitivity", "sensitivity_exact")]
        for t in tables:
            if t.get("error"):
                out.append(f"mixed precision: {t['error']} (`quept plan` measures it again)")
        s, exact = (None if t.get("error") else t or None for t in tables)
        if s or not exact:
            out.append("mixed precision: " + (
                f"sensitivity table cached ({_table_words(s)}); `quept plan` reuses it" if s else
                "no sensitivity table yet (`quept plan` measures and caches one)"))
        if exact:
            out.append(f"mixed precision: exact sensitivity table cached ({_table_words(exact)}"
                       "); `quept plan --sensitivity exact` reuses it")
        s = s or exact
        sw = info.get("sweeps")
        if sw and sw.get("error"):
            out.append(f"in-context sweeps: {sw['error']} (`quept plan` measures them again)")
        elif sw:
            shape = sw.get("check_shape")
            objective = ((s or {}).get("settings") or {}).get("objective")
            on = ("" if not shape else f" on {shape[0]} check images" if len(shape) == 4
                  else f" on {shape[0]} check paragraphs" if objective == "embedding-distance"
                  else f" on {shape[0]} x {shape[1]} check tokens")
            out.append(f"in-context sweeps cached{on}: {', '.join(sw['sweeps']) or 'none'} "
                       "(plans between those widths reuse them)")
    elif kind == "calibration checkpoint":
        n = info["blocks_done"]
        per = "" if not n else f", {info['seconds'] / n:.0f} s per block"
        out.append(f"{info['path']}: unfinished calibration (a `quept quantize` checkpoint): "
                   f"blocks 0..{n - 1} done in {info['seconds']:.0f} s{per}; the same `quept "
                   f"quantize` command resumes at block {n} (--restart discards the checkpoint)")
        out += _spec_lines(info["spec"])
        out.append(_calib_line("calibrating", info["calibration"]))
        last = info.get("last_block")
        if last and last.get("loss_after"):
            losses = ", ".join(f"W{b} {lb:.4g} -> {la:.4g}" for b, lb, la in
                               zip(last["bits"], last["loss_before"], last["loss_after"]))
            out.append(f"block {last['block']} loss before -> after training: {losses}")
    elif kind == "compact":
        parts = ", ".join(f"{k} {v:.3f}" for k, v in (info["parts_bits_per_weight"] or {}).items())
        out.append(f"{info['path']}: compact elastic checkpoint ({info['model_type']}), "
                   f"{info['layers']} quantized linears, {_bits(info['bits_per_weight'])} bits per "
                   f"weight for all widths together ({parts}); other tensors "
                   f"{_mb(info['other_bytes'])}")
        out += _spec_lines(info["spec"])
        out.append(f"what `quept export` materialises from it (`quept run {info['path']} "
                   "--bits 4,3,2` runs these packed, switching in memory):")
        out += _width_table(info["widths"], None,
                            info["spec"]["activations"] not in (None, "none"))
    elif kind == "packed":
        widths = ", ".join(f"W{b}: {n}" if b != "float" else f"float: {n}"
                           for b, n in info["layer_widths"].items())
        what = (f"W{info['bits']} for all {info['layers']} quantized linears"
                if isinstance(info["bits"], int) else f"a plan ({widths})")
        out.append(f"{info['path']}: packed model ({info['model_type']}), {what}")
        out.append(f"{_bits(info['bits_per_weight'])} bits per quantized weight stored (codes, "
                   f"{info['scale_dtype']} scales and zero-points), quantized linears "
                   f"{_mb(info['quantized_bytes'])}, packed head {_mb(info['head_bytes'])}, "
                   f"other tensors {_mb(info['other_bytes'])}")
        extras = []
        if info["activations"]:
            extras.append(f"activations quantized {', '.join(info['activations'])}")
        if info["kv_bits"]:
            extras.append(f"KV cache at {'/'.join(map(str, info['kv_bits']))} bits")
        if info["rotation"]:
            extras.append(f"rotation {info['rotation']}")
        out.append("; ".join(extras) if extras else "weight-only; float KV cache")
        source = info.get("source") or {}
        if source.get("base_model"):
            how = {"gptq": "by GPTQ", "learned": "with learned offsets"}.get(
                source.get("rounding"))
            out.append(f"made from {source['base_model']}"
                       + (f", codes rounded {how}" if how else ""))
    elif kind in ("compressed-tensors", "onnx"):
        e = info["export"]
        label = "compressed-tensors folder (vLLM, transformers)" if kind != "onnx" else \
            "ONNX Runtime model" + (" with genai_config.json" if info["genai_config"] else "")
        out.append(f"{info['path']}: {label}, {info.get('model_type', '?')}")
        for g in info.get("groups", []):
            out.append(f"group {g['name']}: {g['num_bits']}-bit "
                       f"{'symmetric' if g['symmetric'] else 'asymmetric'} {g['strategy']} "
                       f"weights, group size {g['group_size']}")
        if e:
            widths = ", ".join(f"W{b}: {n}" for b, n in (e.get("widths") or {}).items())
            out.append(f"written by quept: {widths} layers"
                       + (f", {e['float_layers']} float" if e.get("float_layers") else "")
                       + f"; {_bits(e.get('bits_per_weight'))} bits per quantized weight, "
                       f"quantized linears {_mb(e.get('quantized_bytes'))}")
    elif kind == "hf":
        p = info.get("parameters")
        out.append(f"{info['path']}: Hugging Face model folder, {info.get('model_type')} "
                   + ("" if p is None else f"({p / 1e6:.1f}M parameters) ")
                   + ("not quantized; `quept quantize --model FOLDER` calibrates it"
                      if info.get("family") else
                      f"not supported by quept: {info.get('unsupported')}"))
    elif kind == "plan":
        budget = ", ".join(f"{k} {v:g}" for k, v in info["budget"].items()) or "none recorded"
        out.append(f"{info['path']}: mixed-precision plan for {info['layers']} linears "
                   f"({info['n_weights'] / 1e6:.1f}M weights); budget {budget}; realised "
                   f"{info['bits_per_weight']:.4f} stored bits per weight, "
                   f"{info['stored_bytes'] / 1e6:.2f} MB of quantized linears")
        out.append("layers per width: " + ", ".join(
            f"W{b} {n}" for b, n in info["layers_per_width"].items()))
        out.append("widths per block, in order: " + " ".join(
            "/".join(str(b) for b in w) for w in info["blocks"].values()))
        if info.get("constraints"):
            out.append("chosen under the constraints " + ", ".join(info["constraints"]))
        kl = info.get("checked_kl")
        if kl:
            objective = info["objective"]
            out.append(f"chosen: {info['chosen']} (measured {cost_words(objective)}, "
                       "lowest kept: " + ", ".join(f"{k} {cost_number(objective, v)}"
                                                  for k, v in kl.items()) + ")")
        else:
            out.append(f"chosen: {info['chosen']}")
        out.append("`quept eval FOLDER --plan PLAN.json` measures it, `quept export FOLDER "
                   "--plan PLAN.json --out DIR` packs it")
    elif kind == "hand plan":
        out.append(f"{info['path']}: hand-written plan, {len(info['entries'])} entries "
                   f"({info['patterns']} patterns, {info['names']} layer names), widths "
                   + ", ".join(f"W{b}" for b in info["widths"]))
        if info["patterns"]:
            out.append("entries in the order they apply (a later one wins where two match): "
                       + ", ".join(f"{k}: {b}" for k, b in list(info["entries"].items())[:12])
                       + (" ..." if len(info["entries"]) > 12 else ""))
        elif info["blocks"]:
            out.append("widths per block, in order: " + " ".join(
                "/".join(str(b) for b in w) for w in info["blocks"].values()))
        out.append("its stored bits per weight depend on the model: `quept eval FOLDER --plan "
                   "PLAN.json` applies it, checks it names every layer and prints them")
    elif kind == "plans":
        out.append(f"{info['path']}: {len(info['plans'])} mixed-precision plans, fewest bits "
                   "first")
        for d in info["plans"]:
            budget = ", ".join(f"{k} {v:g}" for k, v in d["budget"].items()) or "none recorded"
            out.append(f"  {Path(d['path']).name}: budget {budget}; "
                       f"{d['bits_per_weight']:.4f} bits per weight, "
                       f"{d['stored_bytes'] / 1e6:.2f} MB; " + ", ".join(
                           f"W{b} {n}" for b, n in d["layers_per_width"].items())
                       + f"; chosen: {d['chosen']}")
        out.append("`quept eval FOLDER --plan DIR` measures them all, `quept info PLAN.json` "
                   "shows one")
    elif kind == "gguf":
        types = ", ".join(f"{k} {v}" for k, v in info["tensor_types"].items())
        out.append(f"{info['path']}: GGUF file ({info.get('general.architecture', '?')}), "
                   f"{info['tensors']} tensors: {types}")
    out.append(f"files: {len(info.get('files', {}))}, {_mb(total)} in all")
    return "\n".join(out)
