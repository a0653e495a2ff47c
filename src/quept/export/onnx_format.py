"""Export one configuration of an elastic model to ONNX, for ONNX Runtime.

Each quantized linear becomes ONNX Runtime's ``com.microsoft.MatMulNBits`` (the operator and
its packing: :mod:`quept.export.onnx_nbits`). The graph is traced by
``torch.onnx.export(dynamo=True)``: quantized linears run a custom torch op whose ONNX
translation is the ``MatMulNBits`` node. Inputs and outputs by task: causal LMs take
``input_ids``, ``attention_mask`` (over past and new tokens), ``position_ids`` and the KV cache
``past_key_values.{i}.key`` / ``.value`` (batch, kv heads, past tokens, head dim; zero past
tokens for a prompt) and give ``logits`` and ``present.{i}.key`` / ``.value`` (the past with
the new tokens appended), the layout ONNX Runtime GenAI reads, whose ``genai_config.json`` is
written beside the model; encoders ``input_ids``, ``attention_mask`` -> ``last_hidden_state``;
image classifiers ``pixel_values`` -> ``logits``. Batch and sequence axes are dynamic.
:class:`quept.export.onnx_runtime.OrtModel` runs the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quept.export.ct_format import resolve_plan
from quept.export.onnx_nbits import (
    ACCURACY_LEVELS,
    CONTAINER,
    NBitsLinear,
    OnnxExportError,
    _translation,
)
from quept.export.packed import bits_label
from quept.export.runtime import cache_keyword
from quept.models.kv import config_head_dim
from quept.nn.switch import elastic_layers

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OPSET = 18


# --------------------------------------------------------------------------- model surgery
def _check_model(model: nn.Module) -> None:
    spec = getattr(model, "quept_spec", None)
    if spec is None or not elastic_layers(model):
        raise OnnxExportError(
            "the model has no elastic layers; load a calibrated folder with quept.api.load")
    refused = {"activations": spec.activations != "none", "kv_bits": spec.kv_bits is not None,
               "rotation": spec.rotation != "none"}
    if any(refused.values()):
        what = ", ".join(k for k, v in refused.items() if v)
        raise OnnxExportError(
            f"ONNX export is weight-only: this model was calibrated with {what} (activation or "
            "KV-cache quantizers, online rotations), which MatMulNBits does not apply; export "
            "the packed quept format, which keeps them")


MIN_BLOCK = 16
"""The smallest ``block_size`` MatMulNBits takes; every block is a power of two."""


def _is_block(size: int) -> bool:
    return size >= MIN_BLOCK and not size & (size - 1)


def _check_blocks(model: nn.Module, plan: Mapping[str, int | None]) -> None:
    """Refuse a plan whose quantized layers' groups are not MatMulNBits blocks, naming the
    blocks that would do (:func:`_block_advice`)."""
    layers = elastic_layers(model)
    quantized = {name: b for name, b in plan.items() if b is not None}
    for name, b in quantized.items():
        gs = layers[name].spec.group_size_for(b) or layers[name].in_features
        if not _is_block(gs):
            inputs = [layers[n].in_features for n in quantized]
            raise OnnxExportError(
                f"layer {name}: MatMulNBits needs a power-of-two block of at least {MIN_BLOCK} "
                f"inputs; the {b}-bit group is {gs}: {_block_advice(inputs)}")


def _block_advice(inputs: list[int]) -> str:
    """The group sizes to calibrate with for ONNX: the MatMulNBits blocks that divide every
    quantized layer's number of ``inputs``."""
    common = math.gcd(*inputs)
    fits = [str(2 ** k) for k in range(common.bit_length())
            if _is_block(2 ** k) and common % 2 ** k == 0]
    if not fits:
        return (f"no block divides every quantized layer's inputs ({common} in common): export "
                "the quept or compressed-tensors format instead")
    sizes = fits[0] if len(fits) == 1 else f"{', '.join(fits[:-1])} or {fits[-1]}"
    return (f"calibrate with a group size of {sizes} (`quept quantize --group-size`), the "
            "blocks that divide every quantized layer's inputs")


@contextlib.contextmanager
def _swapped(model: nn.Module, plan: Mapping[str, int | None], accuracy_level: int = 0
             ) -> Iterator[dict[str, NBitsLinear]]:
    """Swap every quantized elastic layer for an :class:`NBitsLinear` (float layers of a plan
    for a float ``nn.Linear``), restoring the elastic layers afterwards."""
    layers = elastic_layers(model)
    swapped: dict[str, nn.Module] = {}
    out: dict[str, NBitsLinear] = {}
    try:
        for name, b in plan.items():
            m = layers[name]
            if b is None:
                new: nn.Module = nn.Linear(m.in_features, m.out_features, m.bias is not None)
                new.weight = nn.Parameter(m.weight.detach(), False)
                if m.bias is not None:
                    new.bias = nn.Parameter(m.bias.detach(), False)
            else:
                gs = m.spec.group_size_for(b) or m.in_features
                codes, scale, zero = m.quantized_codes(b)
                new = out[name] = NBitsLinear(codes, scale, zero, b, gs, m.bias, accuracy_level)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            swapped[name] = m
        yield out
    finally:
        for name, m in swapped.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m)


class _Graph(nn.Module):
    """An encoder or image classifier with plain tensor inputs and one output."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.task == "encoder":
            return self.model(input_ids=x, attention_mask=mask).last_hidden_state
        return self.model(pixel_values=x).logits


class _DecoderGraph(nn.Module):
    """A causal LM with its KV cache as plain tensors: ``(input_ids, attention_mask,
    position_ids, (past key 0, past value 0, ...))`` -> ``(logits, present key 0, ...)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # A cache without the config keeps every layer whole (no sliding-window cropping): the
        # model's own mask still applies any window, and present = past + new tokens always.
        cache = DynamicCache()
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        key = cache_keyword(self.model)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, **{key: cache})
        presents = [t for layer in out[key].layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's KV cache."""
    heads = config.num_attention_heads
    return (config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
            config_head_dim(config))


def cache_names(layers: int, prefix: str) -> list[str]:
    """``past_key_values`` -> past_key_values.0.key, .0.value, ...; ``present`` likewise."""
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _example(model: nn.Module, task: str) -> tuple[tuple[Any, ...], list[str], list[str],
                                                    tuple[Any, ...]]:
    """Example inputs, input names, output names and dynamic shapes of the task's graph."""
    dim = torch.export.Dim
    batch, seq = dim("batch", min=1), dim("sequence", min=2)
    cfg = model.config
    if task == "image-classification":
        size, ch = cfg.image_size, getattr(cfg, "num_channels", 3)
        return ((torch.zeros(2, ch, size, size),), ["pixel_values"], ["logits"], ({0: batch},))
    ids = torch.randint(0, min(cfg.vocab_size, 100), (2, 8), generator=torch.Generator()
                        .manual_seed(0))
    if task == "encoder":
        return ((ids, torch.ones_like(ids)), ["input_ids", "attention_mask"],
                ["last_hidden_state"], ({0: batch, 1: seq}, {0: batch, 1: seq}))
    layers, kv_heads, head_dim = kv_shape(cfg)
    seq, past, total = dim("sequence", min=1), dim("past_sequence", min=0), dim("total_sequence")
    past_len = 5
    cache = tuple(torch.zeros(2, kv_heads, past_len, head_dim) for _ in range(2 * layers))
    mask = torch.ones(2, past_len + ids.shape[1], dtype=torch.long)
    positions = torch.arange(past_len, past_len + ids.shape[1]).expand(2, -1)
    names = ["input_ids", "attention_mask", "position_ids", *cache_names(layers, "past_key_values")]
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
              tuple({0: batch, 2: past} for _ in cache))
    return (ids, mask, positions, cache), names, ["logits", *cache_names(layers, "present")], shapes


GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def genai_config(config: Any, tokenizer: Any) -> dict[str, Any]:
    """The ``genai_config.json`` with which ONNX Runtime GenAI runs the exported decoder:
    greedy search by default, past and present in separate buffers (the graph concatenates)."""
    layers, kv_heads, head_dim = kv_shape(config)

    def token(name: str) -> Any:
        value = getattr(config, name, None)
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, name, None)
        return value

    eos, pad = token("eos_token_id"), token("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    context = int(getattr(config, "max_position_embeddings", 2048))
    return {
        "model": {
            "bos_token_id": token("bos_token_id"), "eos_token_id": eos, "pad_token_id": pad,
            "context_length": context, "type": GENAI_TYPES[config.model_type],
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "quept", "provider_options": []},
                "filename": ONNX_FILE, "head_size": head_dim, "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads, "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1,
                   "max_length": context, "min_length": 0, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0},
    }


def save_graph(model: nn.Module, task: str, folder: Path, tokenizer: Any = None
               ) -> tuple[list[str], list[str]]:
    """Trace ``model`` as it stands (quantized layers swapped in, or a float model) into
    ``folder/model.onnx`` with the task's inputs and outputs, and write its config, tokenizer
    and, for decoders, ``genai_config.json``. Returns the input and output names."""
    args, names, outputs, shapes = _example(model, task)
    graph = _DecoderGraph(model) if task == "causal-lm" else _Graph(model, task)
    with torch.no_grad():
        program = torch.onnx.export(
            graph.eval(), args, dynamo=True, input_names=names, output_names=outputs,
            dynamic_shapes=shapes, opset_version=OPSET, custom_translation_table=_translation(),
            verbose=False)
    big = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1.5e9
    folder.mkdir(parents=True, exist_ok=True)
    program.save(str(folder / ONNX_FILE), external_data=big)
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if task == "causal-lm":
        (folder / "genai_config.json").write_text(
            json.dumps(genai_config(model.config, tokenizer), indent=1))
    return names, outputs


def write_onnx(model: nn.Module, tokenizer: Any, folder: str | os.PathLike,
               bits: int | Mapping[str, int | None], *, accuracy_level: int = 0,
               provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` (a loaded elastic model) at ``bits`` (a width, or ``{layer: width or
    None}``) as ``folder/model.onnx`` with MatMulNBits layers, plus its config and tokenizer.
    ``accuracy_level`` is MatMulNBits' own: 0 computes in float32 (the elastic model's outputs),
    4 lets ONNX Runtime's CPU kernels quantize each activation block to int8 (faster, not
    exact). Returns a summary: inputs, output, widths, bits per weight, file size, and
    ``provenance`` (where the model came from: its base model, which an encoder's fidelity is
    measured against) as its "source"."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise OnnxExportError(f"accuracy level must be one of {ACCURACY_LEVELS}, got "
                              f"{accuracy_level!r}")
    from quept.models import family_for

    _check_model(model)
    fam = family_for(model)
    if fam.name == "llava-ov-language":
        raise OnnxExportError("ONNX export of a vision-language model is not supported: "
                              "export the packed quept format or compressed-tensors instead")
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise OnnxExportError("ONNX export needs onnx and onnxscript: pip install "
                              "'quept[onnx]'") from None
    plan = resolve_plan(model, bits)
    _check_blocks(model, plan)
    folder = Path(folder)
    was_training = model.training
    model.eval()
    with _swapped(model, plan, accuracy_level) as nbits:
        qbytes = sum(m.stored_bytes() for m in nbits.values())
        weights = sum(m.k * m.n for m in nbits.values())
        names, outputs = save_graph(model, fam.task, folder, tokenizer)
    model.train(was_training)
    widths = sorted({b for b in plan.values() if b is not None})
    summary = {
        "format": "onnx", "path": str(folder), "task": fam.task, "inputs": names,
        "output": outputs[0], "outputs": outputs, "opset": OPSET, "accuracy_level": accuracy_level,
        "bits": bits_label(plan.values()),
        "widths": {str(b): sum(v == b for v in plan.values()) for b in widths},
        "containers": {str(b): CONTAINER[b] for b in widths},
        "float_layers": sum(b is None for b in plan.values()),
        "quantized_weights": weights, "quantized_bytes": qbytes,
        "bits_per_weight": 8 * qbytes / max(weights, 1),
        "file_bytes": sum(f.stat().st_size for f in folder.glob("model.onnx*")),
        **({"source": dict(provenance)} if provenance else {}),
    }
    (folder / "quept-export.json").write_text(json.dumps(summary, indent=1))
    log.info("ONNX model written to %s (%.3f bits per quantized weight)", folder / ONNX_FILE,
             summary["bits_per_weight"])
    return summary
