"""GPTQ through ``llmcompressor`` (``oneshot`` with a ``GPTQModifier``), run on the CPU.

The calibration windows go in as a ``datasets.Dataset`` of token ids; the scheme is integer,
asymmetric, group-wise at the benchmark's group size, every block linear (lm_head ignored, or
the modules the job's ``ignore`` names).
The model comes back with its weights quantized in place and is evaluated as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peers.common import Quantized


def quantize(model: nn.Module, tok: Any, ids: torch.Tensor, job: dict[str, Any]) -> Quantized:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    (bits,) = job["bits"]
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                               group_size=job["group_size"])
    recipe = GPTQModifier(config_groups={"weights": QuantizationScheme(targets=["Linear"],
                                                                       weights=weights)},
                          ignore=job.get("ignore", ["lm_head"]))
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, tokenizer=tok, dataset=data, recipe=recipe,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    return Quantized(lambda b: model, {"settings": {
        "recipe": "GPTQModifier defaults (block_size 128, dampening 0.01, actorder static)"}})
