"""Run a folder written by :func:`quept.export.onnx_format.write_onnx` with ONNX Runtime."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quept.checks import check_json_fields, read_json_object
from quept.export.onnx_format import GENAI_TYPES, ONNX_FILE
from quept.export.onnx_nbits import OnnxExportError
from quept.export.packed import check_bits_label

ONNX_TASKS = ("causal-lm", "encoder", "image-classification")  # what OrtModel runs

EXPORT_SUMMARY = "quept-export.json"
"""The summary quept writes beside a compressed-tensors or ONNX export (widths, sizes; for
ONNX the task, inputs and outputs, which running it needs)."""

GENAI_CONFIG = "genai_config.json"

TASK_INPUTS = {"causal-lm": {"input_ids", "attention_mask", "position_ids"},
               "encoder": {"input_ids", "attention_mask"},
               "image-classification": {"pixel_values"}}
"""The inputs of each task's graph besides a decoder's past keys and values."""

AGAIN = "export it again with `quept export --format onnx`"


def is_onnx_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ONNX_FILE).is_file() and (Path(folder) / EXPORT_SUMMARY).is_file()


def read_onnx_summary(folder: str | os.PathLike) -> dict[str, Any]:
    """The summary of the ONNX export in ``folder``, checked against itself and config.json:
    a task quept runs, which config.json's model runs too; a width label its widths give; for
    a decoder, config.json's model type that genai_config.json records."""
    from quept.export.load import check_model_config
    from quept.export.packed import PackedFormatError

    folder = Path(folder)
    path = folder / EXPORT_SUMMARY
    summary = read_json_object(path, OnnxExportError)
    task = summary.get("task")
    if not isinstance(task, str) or task not in ONNX_TASKS:
        raise OnnxExportError(f"{path} names no task quept runs ({task!r}; expected one of "
                              f"{', '.join(ONNX_TASKS)}); {AGAIN}")
    check_json_fields(summary, {"bits": (int, str), "bits_per_weight": float, "widths": dict},
                      path, OnnxExportError, optional={"float_layers": int})
    check_width_label(summary, path, OnnxExportError)
    export_source(summary, path, OnnxExportError)
    _check_config_task(folder, task)
    genai = folder / GENAI_CONFIG
    if task == "causal-lm" and genai.is_file():
        model = read_json_object(genai, OnnxExportError).get("model")
        recorded = model.get("type") if isinstance(model, dict) else None
        model_type = {v: k for k, v in GENAI_TYPES.items()}.get(recorded, recorded)
        try:
            check_model_config(folder, "an ONNX export", "quept export --format onnx",
                               GENAI_CONFIG, model_type)
        except PackedFormatError as e:
            raise OnnxExportError(str(e)) from None
    return summary


def export_source(summary: Mapping[str, Any], path: Path,
                  error: type[Exception] = OnnxExportError) -> dict[str, Any]:
    """What the summary of a compressed-tensors or ONNX export (read from ``path``) records of
    where its model came from, checked: its "source", as a packed folder's JSON records it
    (the base model, the sample of the calibration text); {} for an export written before
    quept recorded it."""
    check_json_fields(summary, {}, path, error, optional={"source": dict})
    source = summary.get("source", {})
    check_json_fields(source, {}, f"{path} (its source)", error,
                      optional={"base_model": str, "calibration_text": dict})
    return source


def read_export_source(folder: str | os.PathLike, error: type[Exception] = OnnxExportError
                       ) -> dict[str, Any]:
    """:func:`export_source` of the summary in ``folder``; {} for a folder without one (a
    compressed-tensors model written by another tool)."""
    path = Path(folder) / EXPORT_SUMMARY
    if not path.is_file():
        return {}
    return export_source(read_json_object(path, error), path, error)


def check_width_label(summary: dict[str, Any], path: Path,
                      error: type[Exception] = OnnxExportError) -> None:
    """The ``bits`` of an export's summary (at ``path``) is the label its ``widths`` (layers
    per width) and ``float_layers`` give, as the writers make it: their one width, or "mixed";
    a label edited apart from them would name a width the codes are not at."""
    widths, floats = summary["widths"], summary.get("float_layers", 0)
    if not all(k.isdigit() and isinstance(n, int) for k, n in widths.items()):
        raise error(f"{path} is damaged: its \"widths\" should map widths to layer counts, got "
                    f"{widths!r}")
    held = ", ".join(f"{n} layers at {b} bits" for b, n in widths.items())
    check_bits_label(summary["bits"], [int(b) for b in widths] + [None] * bool(floats), path,
                     error, f"its \"widths\" hold {held}"
                     + (f" and {floats} float" if floats else ""))


def _check_config_task(folder: Path, task: str) -> None:
    """config.json's model is one that runs the summary's ``task``; an unsupported model type
    is left to the loader, which names the supported ones."""
    from quept.models import UnsupportedModelError, family_for_type

    path = folder / "config.json"
    model_type = read_json_object(path, OnnxExportError).get("model_type")
    try:
        runs = family_for_type(model_type).task
    except UnsupportedModelError:
        return
    if runs != task:
        raise OnnxExportError(f"{path} describes a {model_type!r} model ({runs}), but "
                              f"{folder / EXPORT_SUMMARY} says task {task!r}: the folder is "
                              f"damaged or mixed up; {AGAIN}")


def check_graph_inputs(inputs: list[str], task: str, folder: Path) -> None:
    """The graph in ``folder`` takes the inputs of the summary's ``task``
    (:data:`TASK_INPUTS`), and a decoder's past keys and values."""
    past = any(i.startswith("past_key_values.") for i in inputs)
    if task == "causal-lm" and not past:
        raise OnnxExportError(f"{folder} was exported without a KV cache (an earlier quept); "
                              f"{AGAIN}")
    fixed = {i for i in inputs if not i.startswith("past_key_values.")}
    if fixed != TASK_INPUTS[task] or (past and task != "causal-lm"):
        fits = [t for t, names in TASK_INPUTS.items() if names == fixed]
        raise OnnxExportError(
            f"{folder / EXPORT_SUMMARY} says task {task!r}, but {folder / ONNX_FILE} takes the "
            f"inputs {', '.join(sorted(fixed))}" + (", past_key_values.*" if past else "")
            + (f" (those of the {fits[0]} task)" if fits else "")
            + f": the folder is damaged or mixed up; {AGAIN}")


class OrtModel(nn.Module):
    """An exported folder run by ONNX Runtime behind the call signature quept's evaluators and
    generation loop use: ``model(ids, past_key_values=..., use_cache=True)`` -> ``.logits`` and
    ``.past_key_values`` for decoders, ``model(input_ids=, attention_mask=).last_hidden_state``
    or ``model(pixel_values=).logits``."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxExportError(f"{folder} is an ONNX model; running it needs onnxruntime: "
                                  "pip install 'quept[onnx]'") from None
        from transformers import AutoConfig

        folder = Path(folder)
        self.quept_onnx = read_onnx_summary(folder)
        self.quept_calibration_text = self.quept_onnx.get("source", {}).get("calibration_text")
        self.task = self.quept_onnx["task"]
        self.config = AutoConfig.from_pretrained(folder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(folder / ONNX_FILE), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a damaged graph
            raise OnnxExportError(f"{folder / ONNX_FILE} cannot be loaded by ONNX Runtime: "
                                  f"{e}") from None
        check_graph_inputs([i.name for i in self.session.get_inputs()], self.task, folder)
        # (name, KV heads, head dim) of every past input, in the graph's order
        self._past = [(i.name, i.shape[1], i.shape[3]) for i in self.session.get_inputs()
                      if i.name.startswith("past_key_values.")]
        self._device = nn.Parameter(torch.zeros(0), requires_grad=False)  # device for callers

    def _empty_past(self, batch: int) -> list[Any]:
        import numpy as np

        return [np.zeros((batch, heads, 0, dim), np.float32) for _, heads, dim in self._past]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None
                = None, pixel_values: torch.Tensor | None = None, past_key_values: Any = None,
                use_cache: bool = False, **_: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput

        if self.task == "image-classification":
            (out,) = self.session.run(["logits"], {"pixel_values": pixel_values.float().numpy()})
            return ModelOutput(logits=torch.from_numpy(out))
        if self.task == "encoder":
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            (out,) = self.session.run(["last_hidden_state"], {"input_ids": input_ids.numpy(),
                                                              "attention_mask": mask.numpy()})
            return ModelOutput(last_hidden_state=torch.from_numpy(out))
        batch, new = input_ids.shape
        past = self._empty_past(batch) if past_key_values is None else list(past_key_values)
        seen = past[0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, seen + new, dtype=torch.long)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, seen:]
        feeds = {"input_ids": input_ids.long().numpy(), "attention_mask":
                 attention_mask.long().numpy(), "position_ids": positions.numpy(),
                 **{name: p for (name, _, _), p in zip(self._past, past)}}
        if not use_cache:
            (out,) = self.session.run(["logits"], feeds)
            return CausalLMOutputWithPast(logits=torch.from_numpy(out))
        out, *present = self.session.run(None, feeds)
        return CausalLMOutputWithPast(logits=torch.from_numpy(out), past_key_values=present)
