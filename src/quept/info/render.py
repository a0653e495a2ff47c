"""The lines ``quept info`` prints for a :func:`~quept.info.describe` result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quept.calib.checkpoint import CHECKPOINT_DIR
from quept.export.gguf import FLOAT_TYPES
from quept.search.objective import cost_number, cost_words
from quept.search.refinement import Refinement


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


def _calib_line(verb: str, c: dict[str, Any], task: str | None = None) -> str:
    """How the model was calibrated: samples (images for an image classifier, whose recorded
    seq_len is unused), epochs, loss, rates and seed."""
    rates = (f"{c['lr_adapter']:g}" if not c.get("lr_adapter_groups") else
             "/".join(f"{r:g}" for r in c["lr_adapter_groups"]))
    loss = c["loss"] + (f" + massive-activation term (ratio {c['massive_ratio']:g})"
                        if c.get("massive_ratio") else "")
    if task == "image-classification":
        data = f"{c['samples']} {c['images'] + ' ' if c.get('images') else ''}images"
    else:
        data = f"{c['samples']} x {c['seq_len']} tokens" + (f" of {c['text']}" if c.get("text")
                                                           else "")
    return (f"{verb} on {data}, {c['epochs']} "
            f"epoch{'s' if c['epochs'] != 1 else ''}, {loss} loss, rates {rates} (adapters) / "
            f"{c['lr_clip']:g} (clips), seed {c['seed']}"
            + (", steps in bfloat16" if c.get("bf16") else ""))


ACCURACY_WORDS = {0: "float32 compute, the elastic model's outputs", 1: "float32 compute",
                  2: "float16 compute", 3: "bfloat16 compute",
                  4: "activations quantized to int8 in blocks: faster, not exact"}
"""What each MatMulNBits accuracy level of an ONNX export computes in."""


def _generates(info: dict[str, Any]) -> bool:
    """The model generates text (a causal LM, or a VLM's language model), so it has a KV cache
    and `quept run` runs it; an unknown model type is taken for one."""
    return info.get("task") in (None, "causal-lm")


def _stored_widths(qtype: str, widths: list[int]) -> str:
    """What a GGUF tensor type holds: "float", "5-bit codes", "2..4-bit codes (Q4_1 stores
    each of these widths alike: which one is not recorded)"."""
    if qtype in FLOAT_TYPES:
        return "float"
    if not widths:
        return f"{qtype} is not a type quept writes"
    if len(widths) == 1:
        return f"{widths[0]}-bit codes"
    return (f"{widths[0]}..{widths[-1]}-bit codes ({qtype} stores each of these widths alike: "
            "which one is not recorded)")


def _gguf_linear_lines(info: dict[str, Any]) -> list[str]:
    """A GGUF file's linears per tensor type (widths as quept writes them, stored bits per
    weight from the byte sizes), then, where they are of several types, the quantized
    linears' totals."""
    types = info.get("linear_types", {})
    out = [f"{qtype} linears: {r['layers']}, {_stored_widths(qtype, r['widths'])}; "
           f"{r['bits_per_weight']:.3f} bits per weight stored (with the blocks' scales and "
           f"offsets), {_mb(r['bytes'])}" for qtype, r in types.items()]
    if len(types) > 1 and info.get("bits_per_weight") is not None:
        out.append(f"quantized linears: {info['quantized_linears']}, "
                   f"{info['bits_per_weight']:.3f} bits per weight stored, "
                   f"{_mb(info['quantized_bytes'])}")
    return out


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
        if info.get("calibrated") is False:
            out.append("NOT CALIBRATED: saved right after quept.prepare, with untrained "
                       "adapters and initial clips")
        else:
            out.append(_calib_line("calibrated", c, info.get("task")) + took)
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
        then = (f"a running `quept quantize` is calibrating block {n} now" if info.get("running")
                else f"the same `quept quantize` command resumes at block {n} (--restart "
                "discards the checkpoint)")
        out.append(f"{info['path']}: unfinished calibration (a `quept quantize` checkpoint): "
                   f"blocks 0..{n - 1} done in {info['seconds']:.0f} s{per}; {then}")
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
        run = (f" (`quept run {info['path']} --bits 4,3,2` runs these packed, switching in "
               "memory)" if _generates(info) else "")
        out.append(f"what `quept export` materialises from it{run}:")
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
                   f"{_mb(info['quantized_bytes'])}, "
                   + (f"packed head {_mb(info['head_bytes'])}, " if info.get("head") else "")
                   + f"other tensors {_mb(info['other_bytes'])}")
        extras = []
        if info["activations"]:
            extras.append(f"activations quantized {', '.join(info['activations'])}")
        if info["kv_bits"]:
            extras.append(f"KV cache at {'/'.join(map(str, info['kv_bits']))} bits")
        if info["rotation"]:
            extras.append(f"rotation {info['rotation']}")
        if not extras:
            extras.append("weight-only; float KV cache" if _generates(info) else "weight-only")
        out.append("; ".join(extras))
        source = info.get("source") or {}
        if source.get("base_model"):
            how = {"gptq": "by GPTQ", "learned": "with learned offsets"}.get(
                source.get("rounding"))
            text = source.get("calibration_text")
            out.append(f"made from {source['base_model']}"
                       + (f" (calibrated on {text})" if text else "")
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
        level = e.get("accuracy_level")
        if kind == "onnx" and level is not None:
            out.append(f"MatMulNBits accuracy level {level} "
                       f"({ACCURACY_WORDS.get(level, 'not one ONNX Runtime defines')})")
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
        if info.get("refinement"):
            out.append(Refinement.from_dict(info["refinement"], info["path"]).words())
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
        out += _gguf_linear_lines(info)
    out.append(f"files: {len(info.get('files', {}))}, {_mb(total)} in all")
    return "\n".join(out)
