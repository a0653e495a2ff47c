"""AutoRound (sign-gradient rounding and min/max tuning, block by block) through ``auto-round``.

The calibration windows go in as a list of (1, seq_len) token tensors; asymmetric, group-wise,
the library's own defaults otherwise (batch 8, seed 42), ``iters``/``lr`` from the method
(light: 50 iterations at lr 5e-3; default: 200). ``quantize()`` leaves the model's weights
quantized in place, and it is evaluated as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peers.common import Quantized


def quantize(model: nn.Module, tok: Any, ids: torch.Tensor, job: dict[str, Any]) -> Quantized:
    from auto_round import AutoRound

    (bits,) = job["bits"]
    opts = dict(job["options"])
    n = int(opts.pop("nsamples", ids.shape[0]))
    data = [ids[i : i + 1] for i in range(n)]
    ar = AutoRound(model, tok, bits=bits, group_size=job["group_size"], sym=False,
                   nsamples=n, seqlen=ids.shape[1], dataset=data, device_map="cpu",
                   enable_torch_compile=False, **opts)
    qmodel, _ = ar.quantize()
    settings = {"bits": bits, "group_size": job["group_size"], "sym": False, "nsamples": n,
                "seqlen": ids.shape[1], **opts}
    return Quantized(lambda b: qmodel, {"n_samples": n, "settings": settings})
