"""MB-ToMe: multi-bit token merging of block outputs (DESIGN 2.4), vectorised."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def multibit_merge(
    outs: Sequence[torch.Tensor], weights: Sequence[float], top_p: float
) -> torch.Tensor:
    """Merge one block's outputs at several widths into the next quantized-stream input.

    outs: per bit group, high to low, tensors of shape (..., N, C) (N tokens per sample).
    weights: mixing weight per group. For each sample the ``floor(top_p * N)`` tokens whose
    highest- and lowest-group features are most cosine-similar keep the highest-group feature;
    every other token becomes ``sum_g weights[g] * outs[g]``.
    """
    if len(outs) != len(weights):
        raise ValueError(f"{len(outs)} outputs but {len(weights)} merge weights")
    high, low = outs[0], outs[-1]
    mixed = sum(w * o for w, o in zip(weights, outs))
    n_tokens = high.shape[-2]
    k = math.floor(top_p * n_tokens)
    if k == 0:
        return mixed
    sim = F.cosine_similarity(high, low, dim=-1)  # (..., N)
    keep = torch.zeros_like(sim, dtype=torch.bool)
    keep.scatter_(-1, sim.topk(k, dim=-1).indices, True)
    return torch.where(keep.unsqueeze(-1), high, mixed)
