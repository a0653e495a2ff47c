"""Top-1 accuracy of an image classifier."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def top1_accuracy(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 256, progress: bool = False, desc: str = "accuracy") -> float:
    """Share of ``pixel_values`` (N, C, H, W) whose highest logit is the label (N,)."""
    if pixel_values.shape[0] != labels.shape[0]:
        raise ValueError(f"{pixel_values.shape[0]} images but {labels.shape[0]} labels")
    device = next(model.parameters()).device
    correct = 0
    for i in tqdm(range(0, labels.shape[0], batch_size), disable=not progress, desc=desc,
                  leave=False):
        logits = model(pixel_values=pixel_values[i : i + batch_size].to(device)).logits
        correct += (logits.argmax(-1).cpu() == labels[i : i + batch_size]).sum().item()
    return correct / labels.shape[0]
