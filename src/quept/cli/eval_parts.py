"""The parts of ``quept eval`` beyond perplexity per width: plans, zero-shot tasks,
encoders, image classifiers and packed folders."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quept import api
from quept.api.elastic import check_plan_record
from quept.cli.common import (
    EVAL_IMAGES,
    EVAL_SENTENCES,
    _eval_sentences,
    _images,
    _packed_label,
    _print_accuracy,
    _print_embedding,
    _print_widths,
    _refuse_text_options,
    _table,
    _task,
    _text,
    check_context,
    counted,
    perplexity_windows,
    plan_paths,
    width_label,
)
from quept.config import ConfigError, ElasticSpec
from quept.export.packed import bits_label
from quept.nn import elastic_layers
from quept.search import Plan
from quept.search.objective import objective_for
from quept.search.plan import split_warning
from quept.search.plan_files import read_plan

log = logging.getLogger("quept")


def _load_plans(values: list[str]) -> list[tuple[str, Plan | dict[str, int]]]:
    """Each ``--plan`` value read as a plan file, or a folder's plan files, as (path, plan): a
    :class:`Plan` from `quept plan`, or a hand-written ``{layer: bits}`` that
    :func:`_recorded` makes one once the model is loaded."""
    return [(str(f), read_plan(f)) for f in plan_paths(values)]


def _recorded(model: torch.nn.Module, plans: list[tuple[str, Plan | dict[str, int]]]
              ) -> list[tuple[str, Plan]]:
    """Hand-written plans as :class:`Plan` records of what they store on ``model``."""
    out = []
    for path, plan in plans:
        if not isinstance(plan, Plan):
            try:
                plan = api.plan_record(model, plan)
            except ConfigError as e:
                raise ConfigError(f"--plan {path}: {e}") from None
            note = split_warning(plan.widths, f"--plan {path}")
            if note:
                log.warning(note)
        out.append((path, plan))
    return out


def _put_plans(result: dict[str, Any], measured: list[dict[str, Any]]) -> None:
    """One plan's record under "plan" (as it always was), several under "plans"."""
    if len(measured) == 1:
        result["plan"] = measured[0]
    elif measured:
        result["plans"] = measured


def _print_plans(measured: list[dict[str, Any]], title: str, what: str,
                 cell: Callable[[dict[str, Any]], str]) -> None:
    rows = [[m["path"], f"{m['bits_per_weight']:.4f}", f"{m['stored_bytes'] / 1e6:.2f}",
             cell(m), ", ".join(f"W{b}: {n}" for b, n in m["widths"].items())]
            for m in measured]
    print(f"\n{title}")
    print(_table(rows, ["plan", "bits/weight stored", "MB of linears", what,
                        "layers per width"], left=1))


def _apply_plan(model: torch.nn.Module, plan: Plan, path: str) -> float:
    """Set ``plan``'s widths on ``model``; its stored bits per weight, checked against the
    plan's record."""
    switch = getattr(model, "quept_switch", None)
    bpw = check_plan_record(elastic_layers(model) if switch is None else switch.skeletons(),
                            plan, path)
    api.set_bits(model, plan.widths)  # the record is checked: its widths alone
    return bpw


def _refuse_task_options(a: argparse.Namespace) -> None:
    given = [f"--{n.replace('_', '-')}" for n in ("limit", "task_path")
             if getattr(a, n, None) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} with "
                          "--tasks")


def _score_cell(v: float | None, metric: str) -> str:
    if v is None:
        return ""
    return f"{v:.2%}" if metric.startswith("acc") else f"{v:.2f}" if v < 1e5 else f"{v:.3g}"


def _task_cells(scores: dict[str, dict[str, float]] | None, columns: list[tuple[str, str]]
                ) -> list[str]:
    if scores is None:
        return ["" for _ in columns]
    out = []
    for t, m in columns:
        text, diff = _score_cell(scores[t].get(m), m), scores[t].get(f"{m}_vs_float")
        if diff is not None:
            text += f" ({100 * diff:+.1f} ± {100 * scores[t][f'{m}_vs_float_stderr']:.1f})"
        out.append(text)
    return out


def _pair_with_float(float_scores: dict[str, dict[str, Any]] | None,
                     scores: dict[str, dict[str, Any]] | None) -> None:
    """Add to ``scores`` each accuracy's paired difference against the float model over the same
    items (``<metric>_vs_float`` and its standard error), then drop the per-item results."""
    from quept.eval.harness import paired_difference

    for task, row in (scores or {}).items():
        items = row.pop("per_item", {})
        ref = (float_scores or {}).get(task, {}).get("per_item", {})
        for metric, hits in items.items():
            if metric in ref:
                diff, err = paired_difference(hits, ref[metric])
                row[f"{metric}_vs_float"], row[f"{metric}_vs_float_stderr"] = diff, err


def _eval_tasks(a: argparse.Namespace, folder: Path, model: torch.nn.Module, tok: Any,
                elastic: bool, plans: list[tuple[str, Plan]], bits: list[int]
                ) -> dict[str, Any]:
    """`quept eval --tasks`: zero-shot task scores per width (or of the one configuration)."""
    from quept.data.tasks import BUILTIN_TASKS
    from quept.eval.harness import TaskRunner

    if _task(model) != "causal-lm":
        raise ConfigError(f"--tasks needs a causal LM; {folder} holds a "
                          f"{model.config.model_type} {_task(model)} model")
    text = _text(a.text, "eval") if any(t in BUILTIN_TASKS for t in a.tasks) else None
    runner = TaskRunner(model, tok, a.tasks, text=text, limit=a.limit,
                        include_path=a.task_path, per_item=elastic)
    if elastic:
        widths = bits if plans else [None, *bits]  # only plans: no width of its own
        rows = (api.evaluate_tasks(model, tok, a.tasks, widths, rtn=a.rtn, runner=runner)
                if widths else [])
    else:
        rows = [api.TaskRow(*_fixed_width(model), runner())]
    result: dict[str, Any] = {"folder": str(folder), "elastic": elastic, "tasks": a.tasks,
                              "limit": a.limit}
    measured = [{"path": path, "bits_per_weight": _apply_plan(model, plan, path),
                 "stored_bytes": plan.stored_bytes, "widths": plan.histogram(),
                 "scores": runner()} for path, plan in plans]
    _put_plans(result, measured)
    # Accuracies against the float model's on the same items: paired, so their error is far
    # below that of the two accuracies (the float row comes first when there is one).
    ref = rows[0].scores if rows and rows[0].bits is None else None
    for scores in [*(s for r in rows[1:] for s in (r.scores, r.scores_rtn)),
                   *(m["scores"] for m in measured)]:
        _pair_with_float(ref, scores)
    for row in (ref or {}).values():
        row.pop("per_item", None)
    result["task_rows"] = [r.__dict__ for r in rows]
    if not a.json:
        first = (rows[0].scores if rows else measured[0]["scores"])
        columns = [(t, m) for t in a.tasks for m in sorted(  # accuracies first
            first[t], key=lambda m: not m.startswith("acc"))
            if m != "items" and not m.endswith(("_stderr", "_vs_float"))]
        names = [f"{t} {m}" for t, m in columns]
        items = ", ".join(f"{t}: {counted(first[t]['items'], 'item')}" for t in a.tasks
                          if "items" in first[t])
        if rows:
            _print_widths(rows, lambda r: _task_cells(r.scores, columns)
                          + (_task_cells(r.scores_rtn, columns) if a.rtn else []),
                          names + ([f"RTN {n}" for n in names] if a.rtn else []),
                          f"\nTask scores of {folder} ({items}; acc = accuracy"
                          + ("; in brackets: points against the float model on the same "
                             "items, ± standard error" if ref is not None else "") + ")",
                          elastic and model.quept_spec.activations != "none")
        for m in measured:
            print(f"\nplan {m['path']} ({m['bits_per_weight']:.3f} bits per weight): "
                  + ", ".join(f"{n} {c}" for n, c in
                              zip(names, _task_cells(m["scores"], columns))))
    return result


def _eval_encoder(a: argparse.Namespace, folder: Path, model: torch.nn.Module, tok: Any,
                  plans: list[tuple[str, Plan]], bits: list[int]) -> dict[str, Any]:
    """`quept eval` of an elastic encoder: embedding fidelity per width against its float
    encoder."""
    from quept.eval import fidelity, sentence_embeddings

    sentences = _eval_sentences(model, tok, _text(a.text, "eval"), a.sentences or EVAL_SENTENCES)
    rows = (api.evaluate_embeddings(model, sentences, bits, rtn=a.rtn, progress=not a.json)
            if bits else [])
    n = sentences.input_ids.shape[0]
    result = {"folder": str(folder), "elastic": True, "sentences": n,
              "embedding_rows": [r.__dict__ for r in rows]}
    measured = []
    if plans:
        api.set_bits(model, None)
        ref = sentence_embeddings(model, sentences)
        for path, plan in plans:
            bpw = _apply_plan(model, plan, path)
            emb = sentence_embeddings(model, sentences, progress=not a.json,
                                      desc=f"embed {Path(path).name}")
            measured.append({"path": path, "bits_per_weight": bpw, **fidelity(emb, ref),
                             "stored_bytes": plan.stored_bytes, "widths": plan.histogram()})
    _put_plans(result, measured)
    if not a.json:
        if rows:
            _print_embedding(rows, n, f"Embedding fidelity of {folder}")
        if measured:
            _print_plans(measured, f"Plans, embedding fidelity on {n} paragraphs (cosine of "
                         "each sentence embedding with the float encoder's; same neighbour)",
                         "cosine (same neighbour)",
                         lambda m: f"{m['cosine_mean']:.4f} ({m['neighbour_agreement']:.1%})")
    return result


def _eval_images(a: argparse.Namespace, folder: Path, model: torch.nn.Module, elastic: bool,
                 plans: list[tuple[str, Plan]], bits: list[int]) -> dict[str, Any]:
    """`quept eval` of an image classifier: top-1 on Fashion-MNIST test images per width."""
    _refuse_text_options(a, "text")
    pixels, labels = _images(model, "test", a.images or EVAL_IMAGES, 0)
    measured = []
    if elastic:
        widths = bits if plans else [None, *bits]  # only plans: no width of its own
        rows = (api.evaluate_accuracy(model, pixels, labels, widths, rtn=a.rtn,
                                      progress=not a.json) if widths else [])
        measured = _image_plans(a, model, plans, pixels, labels)
    else:
        from quept.eval import top1_accuracy

        rows = [api.AccuracyRow(*_fixed_width(model), top1_accuracy(model, pixels, labels,
                                                                     progress=not a.json))]
    result = {"folder": str(folder), "elastic": elastic, "images": len(labels),
              "accuracy_rows": [r.__dict__ for r in rows]}
    _put_plans(result, measured)
    if not a.json:
        if rows:
            _print_accuracy(rows, len(labels), f"Top-1 accuracy of {folder} on the "
                            "Fashion-MNIST test split",
                            elastic and model.quept_spec.activations != "none")
        if measured:
            _print_plans(measured, f"Plans on {len(labels)} Fashion-MNIST test images: top-1, "
                         "and the KL of each image's class distribution to the float model's",
                         "top-1 (KL to float)",
                         lambda m: f"{m['accuracy']:.2%} ({m['kl_to_float']:.3g})")
    return result


def _image_plans(a: argparse.Namespace, model: torch.nn.Module, plans: list[tuple[str, Plan]],
                 pixels: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    """Top-1 and the mean KL of the class distribution to the float model's (per image) of
    each plan on ``pixels``, both from one forward of each batch per plan."""
    from tqdm.auto import tqdm

    if not plans:
        return []
    objective, size = objective_for(model), 256
    device = next(model.parameters()).device
    kl, correct = [0.0] * len(plans), [0] * len(plans)
    batches = objective.batches(pixels, size, device)
    with torch.no_grad():
        for i, batch in enumerate(tqdm(batches, total=-(-len(labels) // size), leave=False,
                                       desc="plans", disable=a.json)):
            api.set_bits(model, None)
            ref = objective.target(objective.output(model, batch))
            truth = labels[i * size:(i + 1) * size]
            for k, (_, plan) in enumerate(plans):
                api.set_bits(model, plan)
                out = objective.output(model, batch)
                kl[k] += objective.cost(out, ref)
                correct[k] += (out.argmax(-1).cpu() == truth).sum().item()
    return [{"path": path, "bits_per_weight": _apply_plan(model, plan, path),
             "accuracy": correct[k] / len(labels), "kl_to_float": kl[k] / len(labels),
             "stored_bytes": plan.stored_bytes, "widths": plan.histogram()}
            for k, (path, plan) in enumerate(plans)]


def _eval_export_encoder(a: argparse.Namespace, folder: Path, model: Any, tok: Any,
                         text: str) -> dict[str, Any]:
    """Embedding fidelity of an encoder's export (packed, compressed-tensors or ONNX) against
    its float base model: --model, or the base model the export records."""
    from quept.eval import fidelity, sentence_embeddings

    export = _export_record(model)
    if export is None:
        raise ConfigError(f"{folder} is not an elastic folder or an export: it holds a float "
                          "encoder (a Hugging Face model), and embedding fidelity compares a "
                          "quantized encoder with its float one; pass an elastic folder, a "
                          "compact checkpoint or an export of one (packed, compressed-tensors "
                          "or ONNX), which records its base model")
    how, record = export
    base, float_model = _base_encoder(a, folder, model, record)
    sentences = _eval_sentences(model, tok, text, a.sentences or EVAL_SENTENCES)
    ref = sentence_embeddings(float_model, sentences, progress=not a.json, desc="embed float")
    emb = sentence_embeddings(model, sentences, progress=not a.json, desc=f"embed {how}")
    row = api.EmbeddingRow(*_fixed_width(model), **fidelity(emb, ref))
    n = sentences.input_ids.shape[0]
    if not a.json:
        label = _packed_label(record) if how == "packed" else width_label(row.bits)
        print(f"\nEmbedding fidelity of {folder} against {base} ({n} paragraphs): {label} "
              f"{how}, {row.bits_per_weight:.3f} bits per weight stored, cosine "
              f"{row.cosine_mean:.4f} (min {row.cosine_min:.4f}), same nearest paragraph "
              f"{row.neighbour_agreement:.1%}")
    return {"folder": str(folder), "sentences": n, "embedding_rows": [row.__dict__]}


EXPORT_RECORDS = {"quept_packed": "packed", "quept_compressed_tensors": "compressed-tensors",
                  "quept_onnx": "ONNX"}
"""The attribute each export's loader records its folder's JSON under, and the export's
name."""


def _export_record(model: torch.nn.Module) -> tuple[str, dict[str, Any]] | None:
    """The name of the export ``model`` was loaded from and what its folder records (its
    "source" among it); None for a plain model."""
    for attr, how in EXPORT_RECORDS.items():
        record = getattr(model, attr, None)
        if record is not None:
            return how, record
    return None


def _base_encoder(a: argparse.Namespace, folder: Path, model: torch.nn.Module,
                  record: dict[str, Any]) -> tuple[str, torch.nn.Module]:
    """The float encoder an export's embeddings are compared with, and its name: --model, or
    the base model the export records; checked to be an encoder of the export's type and
    width."""
    base = a.model or record.get("source", {}).get("base_model")
    if base is None:
        raise ConfigError(f"{folder} records no base model (it was exported by an earlier "
                          "quept): pass --model with the float encoder it was made from")
    try:
        float_model, _ = api.load_model(base)
    except (FileNotFoundError, api.ArtifactError) as e:
        if a.model is not None:
            raise
        raise ConfigError(f"{folder} was exported from the base model {base!r}, which cannot "
                          f"be loaded: {e}. If that model has moved, name it with --model "
                          "PATH") from None
    named = f"--model {base}" if a.model is not None else f"its base model {base}"
    for field in ("model_type", "hidden_size"):
        want, got = getattr(model.config, field, None), getattr(float_model.config, field, None)
        if want != got:
            raise ConfigError(f"{named} has {field} {got!r}, but {folder} holds a model of "
                              f"{field} {want!r}: name the float encoder it was exported from")
    return str(base), float_model.to(a.device)


def _eval_packed_images(a: argparse.Namespace, folder: Path, model: Any) -> dict[str, Any]:
    """Top-1 of a packed image classifier on Fashion-MNIST test images."""
    from quept.eval import top1_accuracy

    _refuse_text_options(a, "text")
    meta = model.quept_packed
    pixels, labels = _images(model, "test", a.images or EVAL_IMAGES, 0)
    row = api.AccuracyRow(*_fixed_width(model), top1_accuracy(
        model, pixels, labels, progress=not a.json, desc="accuracy packed"))
    if not a.json:
        print(f"\nTop-1 accuracy of {folder} on {counted(len(labels), 'Fashion-MNIST test image')}"
              f": {_packed_label(meta)} packed, {row.bits_per_weight:.3f} bits per weight "
              f"stored, top-1 {row.accuracy:.2%}")
    return {"folder": str(folder), "images": len(labels), "accuracy_rows": [row.__dict__]}


def eval_packed(a: argparse.Namespace, folder: Path, model: Any, tok: Any) -> dict[str, Any]:
    """Perplexity (top-1) of the model of a packed folder (its one configuration)."""
    from quept.eval import perplexity

    if _task(model) == "image-classification":
        return _eval_packed_images(a, folder, model)
    n_windows, seq_len = perplexity_windows(a)
    check_context(model, seq_len, "--seq-len", "" if a.seq_len else " (the default)")
    windows = api.windows_from_text(tok, _text(a.text, "eval"), seq_len, n_windows)
    row = api.EvalRow(*_fixed_width(model), perplexity(model, windows, progress=not a.json,
                                                        desc="eval packed"))
    if not a.json:
        print(f"\nPerplexity of {folder} ({counted(windows.shape[0], 'window')} x {seq_len} "
              f"tokens): {_packed_label(model.quept_packed)} packed, "
              f"{row.bits_per_weight:.3f} bits per weight stored, perplexity {row.ppl:.2f}")
    return {"folder": str(folder), "windows": windows.shape[0], "seq_len": seq_len,
            "rows": [row.__dict__]}


def _fixed_width(model: torch.nn.Module) -> tuple[int | str | None, float]:
    """Width label and stored bits per weight of a non-elastic model: float (32 bits), or an
    export's one width ("mixed" for a plan): packed, compressed-tensors or ONNX."""
    packed = getattr(model, "quept_packed", None)
    if packed is not None:
        return packed["bits"], packed["sizes"]["bits_per_weight"]
    onnx = getattr(model, "quept_onnx", None)
    if onnx is not None:
        return onnx["bits"], onnx["bits_per_weight"]
    info = getattr(model, "quept_compressed_tensors", None)
    if info is None:
        return None, 32.0
    return bits_label(info["widths"].values()), info["bits_per_weight"]


def _kv_note(spec: ElasticSpec) -> str:
    """Title suffix of a perplexity table whose quantized rows run with a quantized KV cache."""
    if spec.kv_bits is None:
        return ""
    return f"; quantized rows with the KV cache at {spec.kv_bits} bits (per token and head)"
