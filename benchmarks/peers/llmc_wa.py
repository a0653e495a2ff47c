"""Weight+activation peers through ``llmcompressor``: W{b}A{b} with the weights integer,
asymmetric, group-wise at the benchmark's group size (round-to-nearest with a
``QuantizationModifier``, or GPTQ with a ``GPTQModifier``) and every block linear's input
quantized per token, symmetric, dynamic, at the same width, as quept's weight+activation mode
does. ``options["rotation"]`` = "spinquant" first applies llmcompressor's ``SpinQuantModifier``
with random Hadamard rotations R1 (residual stream), R2 (value heads) and R4 (down_proj's input,
online): the QuaRot recipe, without learned rotations. The model is evaluated as it comes
back (compressed-tensors quantizes the inputs in the forward pass).
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
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    (bits,) = job["bits"]
    opts = job.get("options", {})
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                               group_size=job["group_size"])
    acts = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="token",
                            dynamic=True)
    groups = {"wa": QuantizationScheme(targets=["Linear"], weights=weights,
                                       input_activations=acts)}
    recipe: list[Any] = []
    if opts.get("rotation") == "spinquant":
        from llmcompressor.modifiers.transform import SpinQuantModifier

        recipe.append(SpinQuantModifier(rotations=["R1", "R2", "R4"],
                                        transform_type="random-hadamard"))
    cls = GPTQModifier if opts.get("gptq") else QuantizationModifier
    recipe.append(cls(config_groups=groups, ignore=["lm_head"]))
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, tokenizer=tok, dataset=data, recipe=recipe,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    what = "GPTQModifier defaults" if opts.get("gptq") else "QuantizationModifier (min/max)"
    rot = ", after SpinQuantModifier R1/R2/R4 random-hadamard" if opts.get("rotation") else ""
    return Quantized(lambda b: model, {"settings": {
        "recipe": f"{what}{rot}; inputs int{bits} per token, symmetric, dynamic"}})
