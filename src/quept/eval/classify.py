"""Top-1 accuracy of an image classifier."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from quept.checks import ConfigError, check_count


@torch.no_grad()
def top1_accuracy(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 256, progress: bool = False, desc: str = "accuracy") -> float:
    """Share of ``pixel_values`` (N, C, H, W) whose highest logit is the label (N,)."""
    if (not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point()
            or labels.is_complex() or labels.numel() == 0):
        got = (f"{labels.dtype} of shape {tuple(labels.shape)}"
               if isinstance(labels, torch.Tensor) else type(labels).__name__)
        raise ConfigError(f"{desc}: labels must be (N,) integer class indices with N >= 1, got "
                          f"{got}")
    if pixel_values.shape[0] != labels.shape[0]:
        raise ConfigError(f"{pixel_values.shape[0]} images but {labels.shape[0]} labels")
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if classes is not None and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ConfigError(f"{desc}: labels run from {int(labels.min())} to "
                          f"{int(labels.max())}; the model has classes 0..{classes - 1}")
    check_count(batch_size, f"{desc}: batch_size")
    device = next(model.parameters()).device
    correct = 0
    for i in tqdm(range(0, labels.shape[0], batch_size), disable=not progress, desc=desc,
                  leave=False):
        logits = model(pixel_values=pixel_values[i : i + batch_size].to(device)).logits
        correct += (logits.argmax(-1).cpu() == labels[i : i + batch_size]).sum().item()
    return correct / labels.shape[0]
