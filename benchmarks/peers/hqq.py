"""HQQ through the PyPI ``hqq`` package (calibration-free half-quadratic optimisation).

Each linear is quantized by ``HQQLinear`` (asymmetric, group size along the input axis, axis=1,
the library's default optimisation); its ``dequantize()`` weights go back into the float model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peers.common import Quantized, block_linears


@torch.no_grad()
def quantize(model: nn.Module, tok: Any, ids: torch.Tensor, job: dict[str, Any]) -> Quantized:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    (bits,) = job["bits"]
    cfg = BaseQuantizeConfig(nbits=bits, group_size=job["group_size"], axis=1)
    for lin in block_linears(model).values():
        q = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu",
                      del_orig=False)
        lin.weight.copy_(q.dequantize().reshape(lin.weight.shape))
        del q
    return Quantized(lambda b: model, {"settings": {"nbits": bits, "axis": 1,
                                                    "group_size": job["group_size"]}})
