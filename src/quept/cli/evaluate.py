"""``quept eval``: what a folder scores at each width or plan."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from quept import api
from quept.checks import ConfigError, check_device
from quept.cli.common import (
    _TASK_WORDS,
    EVAL_OWN_TASK,
    PPL_SEQ_LEN,
    PPL_WINDOWS,
    _eval_rows,
    _names,
    _print_eval,
    _refuse_other_tasks_options,
    _sentences,
    _task,
    _text,
    _width_list,
    _window_len,
    _windows,
    check_context,
    check_texts,
    check_widths,
    counted,
    folder_config,
    folder_task,
    perplexity_windows,
    positive,
    recorded_overlap,
)
from quept.cli.eval_parts import (
    _apply_plan,
    _eval_encoder,
    _eval_export_encoder,
    _eval_images,
    _eval_tasks,
    _fixed_width,
    _kv_note,
    _load_plans,
    _print_plans,
    _put_plans,
    _recorded,
    _refuse_task_options,
    eval_packed,
)
from quept.cli.plan import _print_plan
from quept.config import QuEPTConfig
from quept.data.hub import hub_model_dir, is_repo_id


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity per width of an elastic folder (or a HF folder)",
                       description="Perplexity over non-overlapping windows of a text. FOLDER is "
                       "an elastic folder written by `quept quantize`, a compact checkpoint "
                       "(`quept compact`), a packed, compressed-tensors or ONNX folder (`quept "
                       "export`: its one configuration), or a plain HF model folder (then the "
                       "float model is reported).")
    p.add_argument("folder",
                   help="elastic, compact, packed, compressed-tensors, ONNX or HF model folder, "
                   "or a hub model id (OWNER/NAME: the float model)")
    p.add_argument("--bits", type=_width_list, default=None,
                   help="comma-separated widths, e.g. 2,3,4,8 (default: all widths)")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help=".txt/.jsonl evaluation text, or a hub text: wikitext2 (its test "
                   "split), c4 (the first 1,100 validation documents) or "
                   "hf:REPO[:CONFIG][@SPLIT] (default: Pride and Prejudice)")
    p.add_argument("--windows", type=_windows, default=None,
                   help="causal LMs: number of perplexity windows, or 'all' for every full "
                   f"window of the text (default {PPL_WINDOWS})")
    p.add_argument("--seq-len", type=_window_len, default=None,
                   help=f"causal LMs: tokens per window (default {PPL_SEQ_LEN}; the paper's "
                   "protocol: 2048)")
    p.add_argument("--device", default="cpu",
                   help="device the model runs on (cpu, cuda, cuda:1, ...; default cpu); "
                   "packed layers and ONNX models run on the CPU")
    p.add_argument("--sentences", type=_sentences, default=None,
                   help="encoders: paragraphs whose embeddings are compared with the float "
                   "encoder's, instead of perplexity (at least 2; default 256)")
    p.add_argument("--images", type=positive, default=None,
                   help="image classifiers: Fashion-MNIST test images for top-1 accuracy, "
                   "instead of perplexity (default 10000, the whole test split)")
    p.add_argument("--rtn", action="store_true", help="also report round-to-nearest per width")
    p.add_argument("--model", default=None,
                   help="base model folder, if not the one recorded in the elastic folder; "
                   "for an encoder's export (packed, compressed-tensors, ONNX): the float "
                   "encoder its embeddings are compared with, if not the one it records")
    p.add_argument("--plan", action="append", default=None, metavar="PLAN.json",
                   help="evaluate this mixed-precision plan (from `quept plan`, or a "
                   "hand-written JSON {layer or pattern: bits} such as {\"*\": 3, "
                   "\"*.down_proj\": 4}, applied in order, or the same inline: "
                   "'*=3,*.down_proj=4') instead of every width; --bits "
                   "then adds uniform widths to compare. Repeat it, or name a folder of plans "
                   "(`quept plan --avg-bits 2.5,3,3.5 --out DIR`), to evaluate several, one "
                   "loaded model for all")
    p.add_argument("--packed", action="store_true",
                   help="elastic/compact folders of causal LMs: measure packed layers (the "
                   "codes `quept export` writes, switched in memory from width to width) "
                   "instead of the fake-quantized elastic model; no float row, no --rtn")
    p.add_argument("--tasks", type=_names, default=None, metavar="NAMES",
                   help="causal LMs: zero-shot task accuracy through lm-evaluation-harness "
                   "instead of perplexity (the lmeval extra); comma-separated: the built-in "
                   "last-word and next-sentence (made from the evaluation text, no downloads) "
                   "or lm-evaluation-harness task names, whose data must be reachable; an "
                   "elastic folder's accuracies also show their paired difference against "
                   "the float model on the same items")
    p.add_argument("--limit", type=int, default=None,
                   help="with --tasks: at most this many items per task (default: all)")
    p.add_argument("--task-path", default=None, metavar="DIR",
                   help="with --tasks: a folder of your own lm-evaluation-harness task YAMLs")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_eval)


def cmd_eval(a: argparse.Namespace) -> dict[str, Any]:
    """What ``quept eval`` measured: every result carries "folder", "elastic", "packed",
    "calibration_overlap" and "float_is" (false or null where they do not apply), then the
    rows of what it measures (perplexity, embedding fidelity, top-1 or tasks), of the same
    fields for every kind of folder."""
    check_device(a.device, "--device")
    folder = Path(a.folder)
    if not folder.exists() and is_repo_id(a.folder):  # a hub model: its float perplexity
        folder = hub_model_dir(a.folder)
    kind = api.model_kind(folder)  # a file, a missing path or no model is named as such
    return {"folder": str(folder), "elastic": kind in ("elastic", "compact"),
            "packed": kind == "packed" or a.packed, **_evaluate(a, folder, kind)}


BASE_MODEL_KINDS = ("elastic", "packed", "compressed-tensors", "onnx")
"""The folder kinds `quept eval --model` applies to: an elastic folder's base model, and the
float encoder an encoder's export is compared with."""


def _evaluate(a: argparse.Namespace, folder: Path, kind: str) -> dict[str, Any]:
    """What ``quept eval`` measures of ``folder`` (of the :func:`~quept.api.folder_kind`
    ``kind``), its options checked first."""
    plans = _load_plans(a.plan or [])
    elastic = kind in ("elastic", "compact")
    if elastic:  # widths and texts checked before the model loads
        spec = folder_config(folder, kind).spec
        for b in a.bits or ():
            check_widths(b, spec, "--bits")
        for path, plan in plans:
            check_widths(dict(plan), spec, f"--plan {path}")
    else:
        _refuse_width_options(a, folder, kind)
    check_texts(a, text="eval")
    windowed = [f"--{n.replace('_', '-')}" for n in ("windows", "seq_len")
                if getattr(a, n) is not None]
    if a.tasks and windowed:  # a task's items are its own questions, not windows of the text
        raise ConfigError(f"{' and '.join(windowed)} set perplexity windows; --tasks scores "
                          "each task's own items: leave them out")
    known = folder_task(folder, kind)  # options checked before the model loads, where it can
    if known is not None:
        _refuse_other_tasks_options(a, known[1], EVAL_OWN_TASK)
        if a.packed and known[1] != "causal-lm":
            raise ConfigError(_packed_refusal(folder, *known, a.bits))
    if a.model is not None and kind not in BASE_MODEL_KINDS:
        raise ConfigError(f"--model names the base model of an elastic folder, or the float "
                          f"encoder an encoder's export is compared with; {folder} holds "
                          f"{api.KIND_NAMES[kind]}, which needs none")
    if a.rtn and plans and not a.bits:
        raise ConfigError("--rtn reports round-to-nearest at each width of --bits; a plan has "
                          "no RTN row: add --bits to compare with uniform widths")
    if a.rtn and kind == "compact" and not a.packed:  # --packed: refused below
        raise ConfigError(f"{folder} is a compact checkpoint: it keeps master codes, not the "
                          "float weights, so RTN would round the master; evaluate the elastic "
                          "folder it came from for RTN")
    if a.device != "cpu" and (kind in ("packed", "onnx") or a.packed):
        raise ConfigError(f"--device {a.device}: packed layers and ONNX models run on the CPU "
                          "here; --device applies to elastic (fake-quantized) and plain models")
    if a.packed and not elastic:
        raise ConfigError(f"--packed applies to elastic and compact folders; {folder} holds "
                          f"{api.KIND_NAMES[kind]}")
    if a.packed and (a.rtn or a.tasks):
        raise ConfigError("--packed measures the perplexity of packed layers: not with --rtn "
                          "or --tasks")
    if elastic and a.packed:
        from quept.export.compact import read_compact_meta

        meta = read_compact_meta(folder) if kind == "compact" else api.read_meta(folder)
        widths = a.bits or sorted(QuEPTConfig.from_dict(meta["config"]).spec.bits)
        model, tok = api.load_switchable(folder, plans[0][1] if plans else widths[0],
                                         model=a.model)
        if _task(model) != "causal-lm":
            raise ConfigError(_packed_refusal(folder, model.config.model_type, _task(model),
                                              a.bits))
    elif elastic:
        model, tok = (api.load_compact(folder) if kind == "compact"
                      else api.load(folder, model=a.model))
    else:
        model, tok = api.load_packed(folder) if kind == "packed" else api.load_model(folder)
        _refuse_base_model(a, folder, kind, model)
    if elastic:
        spec = model.quept_spec
        plans = _recorded(model, plans)
        bits = a.bits or ([] if plans else sorted(spec.bits))  # a.bits checked before loading
        for path, plan in plans:  # a plan made for another spec: refused before work
            _apply_plan(model, plan, path)
    else:
        bits = []
    if a.device != "cpu":
        model.to(a.device)
    overlap = _calibration_overlap(a, model)
    master = _master_note(folder) if kind == "compact" and not a.packed else None
    if master and not a.json:
        print(f"note: {master}")
    return {**_measure(a, folder, model, tok, elastic, plans, bits),
            "calibration_overlap": overlap, "float_is": master}


def _refuse_width_options(a: argparse.Namespace, folder: Path, kind: str) -> None:
    """--bits, --plan and --rtn choose among the widths of an elastic folder or compact
    checkpoint; for a folder of another ``kind`` (a :func:`~quept.api.folder_kind` name) they
    would be ignored: refused, naming what the folder holds."""
    given = [f"--{n}" for n in ("bits", "plan", "rtn") if getattr(a, n)]
    if not given:
        return
    held = " (float weights)" if kind == "hf" else " of one configuration"
    raise ConfigError(f"{folder} holds {api.KIND_NAMES[kind]}{held}: {', '.join(given)} "
                      f"appl{'ies' if len(given) == 1 else 'y'} to the widths of an elastic "
                      "folder (`quept quantize`) or compact checkpoint (`quept compact`)")


def _refuse_base_model(a: argparse.Namespace, folder: Path, kind: str,
                       model: torch.nn.Module) -> None:
    """--model of a folder of one configuration names the float encoder an encoder's export
    is compared with; for any other model it would be ignored: refused."""
    if a.model is not None and _task(model) != "encoder":
        raise ConfigError(f"{folder} holds {api.KIND_NAMES[kind]} of a "
                          f"{model.config.model_type} model ({_TASK_WORDS[_task(model)]}), "
                          "which needs no base model: --model names the float encoder an "
                          "encoder's export is compared with")


def _packed_refusal(folder: Path, model_type: str, task: str, bits: list[int] | None) -> str:
    """Why ``--packed`` does not apply to a folder of an encoder or image classifier, and what
    measures its packed layers instead."""
    return (f"--packed measures a causal LM's perplexity with packed layers; {folder} holds "
            f"{_TASK_WORDS[task]} ({model_type}): export a width (`quept export {folder} "
            f"--bits {bits[0] if bits else 4} --out DIR`) and evaluate that packed folder "
            "(`quept eval DIR`)")


def _master_note(folder: Path) -> str:
    """What the "float" row of a compact checkpoint is: its master codes, not float weights."""
    from quept.export.compact import read_compact_meta

    bits = read_compact_meta(folder)["compact"]["master_bits"]
    return (f"a compact checkpoint keeps {bits}-bit master codes, not the float weights: its "
            f"'float' row (and what KL, fidelity and task differences are measured against) "
            f"is that {bits}-bit master")


def _calibration_overlap(a: argparse.Namespace, model: torch.nn.Module) -> float | None:
    """The share of the evaluation text's paragraphs that the model's calibration text held
    (:func:`~quept.cli.common.recorded_overlap`), when the evaluation reads the text."""
    from quept.data.tasks import BUILTIN_TASKS

    text_used = not a.tasks or any(t in BUILTIN_TASKS for t in a.tasks)
    if _task(model) == "image-classification" or not text_used:
        return None
    return recorded_overlap(model, lambda: _text(a.text, "eval"))


def _measure(a: argparse.Namespace, folder: Path, model: torch.nn.Module, tok: Any,
             elastic: bool, plans: list, bits: list[int]) -> dict[str, Any]:
    """What ``quept eval`` measures of a loaded model: tasks, embeddings, top-1 or
    perplexity, at each width and plan."""
    if a.tasks:
        return _eval_tasks(a, folder, model, tok, elastic, plans, bits)
    _refuse_task_options(a)
    _refuse_other_tasks_options(a, _task(model), EVAL_OWN_TASK)
    if _task(model) == "encoder":
        if elastic:
            return _eval_encoder(a, folder, model, tok, plans, bits)
        return _eval_export_encoder(a, folder, model, tok, _text(a.text, "eval"))
    if getattr(model, "quept_packed", None) is not None:  # a packed folder: its one row
        return eval_packed(a, folder, model, tok)
    if _task(model) == "image-classification":
        return _eval_images(a, folder, model, elastic, plans, bits)
    n_windows, seq_len = perplexity_windows(a)
    check_context(model, seq_len, "--seq-len", "" if a.seq_len else " (the default)")
    windows = api.windows_from_text(tok, _text(a.text, "eval"), seq_len, n_windows)
    from quept.eval import perplexity

    if elastic:
        widths = bits if plans or a.packed else [None, *bits]  # only plans: none of its own
        rows = (api.evaluate(model, windows, widths, rtn=a.rtn, progress=not a.json)
                if widths else [])
    else:
        rows = [api.EvalRow(*_fixed_width(model), perplexity(model, windows, progress=not a.json))]
    result = {"folder": str(folder), "elastic": elastic, "windows": windows.shape[0],
              "seq_len": seq_len, "rows": _eval_rows(rows), "packed": a.packed}
    measured = []
    for path, plan in plans:
        bpw = _apply_plan(model, plan, path)
        ppl = perplexity(model, windows, progress=not a.json, desc=f"eval {Path(path).name}")
        measured.append({"path": path, "bits_per_weight": bpw, "ppl": ppl,
                         "stored_bytes": plan.stored_bytes, "widths": plan.histogram()})
    _put_plans(result, measured)
    if not a.json:
        layers = " (packed layers)" if a.packed else ""
        on = f"{counted(windows.shape[0], 'window')} x {seq_len} tokens"
        if rows:
            _print_eval(rows, windows.shape[0], seq_len, f"Perplexity of {folder}{layers}"
                        + (_kv_note(model.quept_spec) if elastic else ""),
                        elastic and model.quept_spec.activations != "none")
        if len(plans) == 1:
            _print_plan(plans[0][1], f"plan {plans[0][0]}{layers}: perplexity "
                        f"{measured[0]['ppl']:.2f} ({on})")
        elif plans:
            _print_plans(measured, f"Plans{layers}, perplexity on {on}", "perplexity",
                         lambda m: f"{m['ppl']:.2f}")
    return result
