"""AWQ (activation-aware per-channel scaling) through ``llmcompressor``, run on the CPU.

The recipe is llmcompressor's own for AWQ: an ``AWQModifier`` (its default mappings for the
architecture, duo scaling, a 20-point grid per mapping) followed by a ``QuantizationModifier``
with the benchmark's scheme (integer, asymmetric, group-wise, every block linear, lm_head
ignored). ``options["observer"]`` picks the weight observer that sets each group's range:
"minmax" (the library's default) or "mse" (each group's range shrunk to the lowest weight
error; AutoAWQ's own clipping step minimises the output error instead). The calibration
windows go in as a ``datasets.Dataset`` of token ids; the scaled model comes back with its
weights quantized in place and is evaluated as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peers.common import Quantized


def _no_pinning_without_accelerator() -> None:
    """llmcompressor 0.14's AWQ pins its cached activations before each grid search, to speed
    up host-to-device copies; without an accelerator ``Tensor.pin_memory`` raises. Pinning does
    not change a value, so on a machine without one it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def quantize(model: nn.Module, tok: Any, ids: torch.Tensor, job: dict[str, Any]) -> Quantized:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    _no_pinning_without_accelerator()
    (bits,) = job["bits"]
    opts = dict(job.get("options", {}))
    observer = opts.get("observer", "minmax")
    n_grid = int(opts.get("n_grid", 20))
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                               group_size=job["group_size"], observer=observer)
    groups = {"weights": QuantizationScheme(targets=["Linear"], weights=weights)}
    recipe = [AWQModifier(duo_scaling=True, n_grid=n_grid),
              QuantizationModifier(config_groups=groups, ignore=job.get("ignore", ["lm_head"]))]
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, tokenizer=tok, dataset=data, recipe=recipe,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    return Quantized(lambda b: model, {"settings": {
        "recipe": f"AWQModifier (default mappings, duo_scaling, n_grid {n_grid}) then "
                  f"QuantizationModifier, weight observer {observer}"}})
