"""Perplexity of a causal LM over fixed token windows (DESIGN section 6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quept.checks import ConfigError, check_count


@torch.no_grad()
def window_nll(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 2, progress: bool = False,
    desc: str = "perplexity",
) -> torch.Tensor:
    """Mean next-token NLL (nats) of each window of ``windows`` (n, T): a float64 tensor (n,).
    ``exp(window_nll(...).mean())`` is :func:`perplexity`; the per-window values let a
    comparison of two configurations on the same windows be resampled (a paired bootstrap)."""
    if (not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[0] < 1
            or windows.shape[1] < 2 or windows.dtype not in (torch.int64, torch.int32)):
        got = (f"{windows.dtype} of shape {tuple(windows.shape)}"
               if isinstance(windows, torch.Tensor) else type(windows).__name__)
        raise ConfigError(f"{desc}: the windows must be (n, T) integer token ids (int64 or "
                          "int32) with n >= 1 and T >= 2 (a window predicts its T - 1 last "
                          f"tokens), got {got}")
    check_count(batch_size, f"{desc}: batch_size")
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, windows.shape[0], batch_size), disable=not progress, desc=desc,
                  leave=False):
        ids = windows[i : i + batch_size].to(device, torch.int64)  # the loss takes int64
        logits = model(ids, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                              ids[:, 1:].reshape(-1), reduction="none")
        out.append(nll.view(ids.shape[0], -1).double().mean(1).cpu())
        del logits
        if not torch.isfinite(out[-1]).all():
            j = i + int((~torch.isfinite(out[-1])).nonzero()[0])
            raise FloatingPointError(
                f"{desc}: the next-token loss of window {j} is {out[-1][j - i].item()}: the "
                "model's logits are not finite; its weights hold non-finite values or this "
                "configuration overflows")
    return torch.cat(out)


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 2, progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """exp(mean next-token NLL) over every predicted token of ``windows`` (n, T): every window
    predicts T - 1 tokens, so that is the exponential of the mean of :func:`window_nll`."""
    return math.exp(window_nll(model, windows, batch_size, progress, desc).mean().item())
