"""An elastic model measured at each width: perplexity, top-1, embedding fidelity, tasks."""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quept.api.elastic import as_plan, check_text, checked_widths, set_bits, spec_of
from quept.calib.capture import check_model_inputs
from quept.checks import ConfigError, check_bits
from quept.data.tokens import eval_windows, tokenize
from quept.eval import Sentences, fidelity, perplexity, sentence_embeddings, top1_accuracy
from quept.models import family_for
from quept.nn import BitsPlan, elastic_layers
from quept.ops import stored_bits_per_weight

log = logging.getLogger(__name__)


@dataclass
class EvalRow:
    bits: int | None
    bits_per_weight: float
    ppl: float
    ppl_rtn: float | None = None


def stored_bits(model: nn.Module, plan: BitsPlan | None = None) -> float:
    """Parameter-weighted bits per quantized weight at ``plan`` (a width, or a plan as
    :func:`set_bits` takes it; a float layer counts 32), scales and zero-points included;
    None = the layers' current widths (of a switchable packed model: the bytes its packed
    layers hold)."""
    switch = getattr(model, "quept_switch", None)
    if switch is not None and plan is None:
        return switch.bits_per_weight()
    layers = elastic_layers(model) if switch is None else switch.skeletons()
    if not layers:
        raise ConfigError("the model has no elastic layers; quept.prepare or quept.load it")
    widths = ({n: m.bits for n, m in layers.items()} if plan is None
              else checked_widths(layers, as_plan(plan)))
    total, n = 0.0, 0
    for name, m in layers.items():
        b = widths[name]
        numel = m.in_features * m.out_features
        bpw = 32.0 if b is None else stored_bits_per_weight(
            b, m.spec.group_size_for(b), m.in_features, m.out_features)
        total += bpw * numel
        n += numel
    return total / n


def _brief(value: Any) -> Any:
    """``value`` for the log: task scores without their per-item results."""
    if isinstance(value, dict):
        return {k: _brief(v) for k, v in value.items() if k != "per_item"}
    return value


def _evaluated_widths(model: nn.Module, bits: Sequence[int | None] | int | None
                      ) -> list[int | None]:
    """``bits`` as a non-empty list of the model's widths (None = float); one width (an int, or
    None) is taken as a list of one. Checked before any evaluation work starts."""
    spec = spec_of(model)
    if bits is None or isinstance(bits, numbers.Integral):
        bits = [bits]
    if isinstance(bits, str) or not isinstance(bits, Iterable):
        raise ConfigError(f"bits must be a width, None (float) or a list of them, got {bits!r}")
    bits = [None if b is None else check_bits(b, spec.bits) for b in bits]
    if not bits:
        raise ConfigError("no widths to evaluate (bits is empty): pass at least one bit-width, "
                          "or None for the float model")
    return bits


def _per_width(model: nn.Module, bits: list[int | None], rtn: bool,
               measure: Callable[[str], Any]) -> list[tuple[int | None, float, Any, Any]]:
    """``measure(label)`` at each width in ``bits`` (None = float; :func:`_evaluated_widths`)
    and, with ``rtn``, under RTN too: [(bits, stored bits per weight, value, RTN value or
    None)]. Leaves the model float; a switchable packed model (:func:`load_switchable`), which
    has neither float layers nor RTN, goes back to the widths it had."""
    switch = getattr(model, "quept_switch", None)
    if switch is not None:
        if rtn or None in bits:
            raise ConfigError("a switchable packed model has no float layers and no RTN; "
                              "evaluate the elastic model (quept.load) for those")
        before = switch.widths
        out = []
        for b in bits:
            switch.set_bits(b)
            out.append((b, switch.bits_per_weight(), measure(f"packed {b}"), None))
        switch.set_bits(before)
        return out
    out = []
    for b in bits:
        set_bits(model, b)
        bpw, value = stored_bits(model), measure(str(b or "float"))
        value_rtn = None
        if rtn and b is not None:
            set_bits(model, b, rtn=True)
            value_rtn = measure(f"rtn {b}")
        out.append((b, bpw, value, value_rtn))
        log.info("bits=%s %s rtn=%s", b, _brief(value), _brief(value_rtn))
    set_bits(model, None)
    for m in elastic_layers(model).values():
        m.clear_cache()
    return out


def evaluate(
    model: nn.Module, windows: torch.Tensor, bits: Sequence[int | None], *, rtn: bool = False,
    batch_size: int = 2, progress: bool = True,
) -> list[EvalRow]:
    """Perplexity of the elastic model (and optionally RTN) at each width in ``bits`` (a list
    of widths, None = float, or one width)."""
    _check_evaluated(model, "causal-lm", windows, "evaluation windows")
    bits = _evaluated_widths(model, bits)
    rows = _per_width(model, bits, rtn, lambda label: perplexity(
        model, windows, batch_size, progress, f"eval {label}"))
    return [EvalRow(*row) for row in rows]


@dataclass
class AccuracyRow:
    """One width of :func:`evaluate_accuracy`: top-1 of the elastic model (and of RTN)."""

    bits: int | None
    bits_per_weight: float
    accuracy: float
    accuracy_rtn: float | None = None


def evaluate_accuracy(
    model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor,
    bits: Sequence[int | None], *, rtn: bool = False, batch_size: int = 256,
    progress: bool = True,
) -> list[AccuracyRow]:
    """Top-1 accuracy of an elastic image classifier (and optionally RTN) at each width."""
    _check_evaluated(model, "image-classification", pixel_values, "pixel values")
    bits = _evaluated_widths(model, bits)
    rows = _per_width(model, bits, rtn, lambda label: top1_accuracy(
        model, pixel_values, labels, batch_size, progress, f"accuracy {label}"))
    return [AccuracyRow(*row) for row in rows]


_EVALUATORS = {"causal-lm": "quept.evaluate (perplexity)",
               "image-classification": "quept.evaluate_accuracy (top-1)",
               "encoder": "quept.evaluate_embeddings (embedding fidelity)"}


def _check_evaluated(model: nn.Module, task: str, inputs: Any, what: str) -> None:
    """The model is of ``task`` (else the evaluator that fits it is named) and ``inputs`` are
    what it runs on (:func:`quept.calib.capture.check_model_inputs`)."""
    fam = family_for(model)
    if fam.task != task:
        raise ConfigError(f"a {fam.name} model is evaluated by {_EVALUATORS[fam.task]}, not by "
                          f"{_EVALUATORS[task]}")
    check_model_inputs(model, fam, inputs, what)


@dataclass
class EmbeddingRow:
    """One width of :func:`evaluate_embeddings`: fidelity to the float encoder's embeddings."""

    bits: int | None
    bits_per_weight: float
    cosine_mean: float
    cosine_min: float
    neighbour_agreement: float
    rtn: dict[str, float] | None = None


def evaluate_embeddings(
    model: nn.Module, sentences: Sentences, bits: Sequence[int | None], *, rtn: bool = False,
    batch_size: int = 16, progress: bool = True,
) -> list[EmbeddingRow]:
    """Embedding fidelity of an elastic encoder (and optionally RTN) at each width in ``bits``
    against its own float embeddings of ``sentences`` (:func:`quept.eval.sentences_from_text`)."""
    if not isinstance(sentences, Sentences):
        raise ConfigError("evaluate_embeddings takes quept.eval.Sentences (token ids and their "
                          f"attention mask; quept.eval.sentences_from_text makes them), got "
                          f"{type(sentences).__name__}")
    _check_evaluated(model, "encoder", sentences, "sentences")
    if sentences.input_ids.shape[0] < 2:
        raise ConfigError(
            f"embedding fidelity needs at least 2 sentences, got {sentences.input_ids.shape[0]}: "
            "its neighbour agreement compares each sentence's nearest other sentence under the "
            "quantized and the float model")
    bits = _evaluated_widths(model, bits)
    set_bits(model, None)
    ref = sentence_embeddings(model, sentences, batch_size, progress, "embed float")
    rows = _per_width(model, bits, rtn, lambda label: fidelity(
        sentence_embeddings(model, sentences, batch_size, progress, f"embed {label}"), ref))
    return [EmbeddingRow(b, bpw, **f, rtn=f_rtn) for b, bpw, f, f_rtn in rows]


@dataclass
class TaskRow:
    """One width of :func:`evaluate_tasks`: {task: {metric: value}} (and under RTN)."""

    bits: int | None
    bits_per_weight: float
    scores: dict[str, dict[str, float]]
    scores_rtn: dict[str, dict[str, float]] | None = None


def evaluate_tasks(
    model: nn.Module, tokenizer: Any, tasks: Sequence[str], bits: Sequence[int | None], *,
    rtn: bool = False, text: str | None = None, limit: int | None = None, batch_size: int = 16,
    include_path: str | os.PathLike | None = None, runner: Callable[[], Any] | None = None,
) -> list[TaskRow]:
    """Zero-shot task scores of an elastic causal LM (and optionally RTN) at each width in
    ``bits``, through lm-evaluation-harness (:class:`quept.eval.harness.TaskRunner`: built-in
    tasks "last-word" and "next-sentence" made from ``text``, or lm-evaluation-harness task
    names). Needs the ``lmeval`` extra. ``runner``: a :class:`~quept.eval.harness.TaskRunner`
    already made for this model (then the task options are its own)."""
    from quept.eval.harness import TaskRunner

    bits = _evaluated_widths(model, bits)
    if runner is None:
        runner = TaskRunner(model, tokenizer, tasks, text=text, limit=limit,
                            batch_size=batch_size, include_path=include_path)
    return [TaskRow(*row) for row in _per_width(model, bits, rtn, lambda label: runner())]


def windows_from_text(tokenizer: Any, text: str, seq_len: int = 512,
                      n_windows: int | None = 32) -> torch.Tensor:
    """The first ``n_windows`` non-overlapping windows of ``seq_len`` tokens of ``text``
    ((n_windows, seq_len) token ids, for :func:`evaluate`); ``n_windows=None``: every full
    window."""
    return eval_windows(tokenize(tokenizer, check_text(tokenizer, text, "windows_from_text")),
                        seq_len, n_windows)
