"""Round-to-nearest: min/max asymmetric per group, this project's quantizer with no clipping."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peers.common import Quantized, block_linears
from quept.ops.quant import rtn


@torch.no_grad()
def quantize(model: nn.Module, tok: Any, ids: torch.Tensor, job: dict[str, Any]) -> Quantized:
    (bits,) = job["bits"]
    for lin in block_linears(model).values():
        lin.weight.copy_(rtn(lin.weight, bits, job["group_size"]))
    return Quantized(lambda b: model)
