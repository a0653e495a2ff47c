"""Run a folder written by :func:`quept.export.onnx_format.write_onnx` with ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quept.checks import check_json_fields, read_json_object
from quept.export.onnx_format import ONNX_FILE
from quept.export.onnx_nbits import OnnxExportError

ONNX_TASKS = ("causal-lm", "encoder", "image-classification")  # what OrtModel runs


def is_onnx_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ONNX_FILE).is_file() and (Path(folder) / "quept-export.json").is_file()


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
        summary = folder / "quept-export.json"
        self.quept_onnx = read_json_object(summary, OnnxExportError)
        self.task = self.quept_onnx.get("task")
        if not isinstance(self.task, str) or self.task not in ONNX_TASKS:
            raise OnnxExportError(f"{summary} names no task quept runs ({self.task!r}; "
                                  f"expected one of {', '.join(ONNX_TASKS)}); export it again")
        check_json_fields(self.quept_onnx, {"bits": (int, str), "bits_per_weight": float},
                          summary, OnnxExportError)
        self.config = AutoConfig.from_pretrained(folder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(folder / ONNX_FILE), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a damaged graph
            raise OnnxExportError(f"{folder / ONNX_FILE} cannot be loaded by ONNX Runtime: "
                                  f"{e}") from None
        inputs = [i.name for i in self.session.get_inputs()]
        if self.task == "causal-lm" and "past_key_values.0.key" not in inputs:
            raise OnnxExportError(f"{folder} was exported without a KV cache (an earlier quept); "
                                  "export it again with quept export --format onnx")
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
