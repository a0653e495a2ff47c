"""Perplexity of a causal LM over fixed token windows (DESIGN section 6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 2, progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """exp(mean next-token NLL) over every predicted token of ``windows`` (n, T)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), disable=not progress, desc=desc,
                  leave=False):
        ids = windows[i : i + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1]
        nll += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        del logits
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
