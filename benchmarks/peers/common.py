"""What every adapter shares: the linears that are quantized, and a check of their levels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quept.models import family_for


@dataclass
class Quantized:
    """What an adapter returns: ``select(bits)`` gives the model to evaluate at ``bits``
    (None = float); ``info`` may override the run's record (calib_seconds, n_samples, seq_len,
    calib_reused, library settings)."""

    select: Callable[[int | None], nn.Module]
    info: dict[str, Any] = field(default_factory=dict)


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized linear (each linear of each decoder block), by its full module name."""
    fam = family_for(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    out = {}
    for block in fam.get_blocks(model):
        for name, lin in fam.block_linears(block).items():
            out[f"{prefix[id(block)]}.{name}"] = lin
    return out


@torch.no_grad()
def levels_max(weight: torch.Tensor, group_size: int, rows: int = 64) -> int:
    """Most distinct values in one group of ``group_size`` inputs over the first ``rows`` rows of
    ``weight`` (out, in): at most 2^b for a real b-bit quantizer."""
    w = weight[:rows].float()
    g = w.reshape(w.shape[0], -1, group_size).sort(dim=-1).values
    return int(((g[..., 1:] != g[..., :-1]).sum(-1) + 1).max())


def current_weight(lin: nn.Module, bits: int | None) -> torch.Tensor:
    """The weight a linear computes with at ``bits`` (elastic layers quantize on the fly)."""
    if bits is not None and hasattr(lin, "quantized_weight"):
        return lin.quantized_weight(bits)
    scheme = getattr(lin, "quantization_scheme", None)  # compressed-tensors: quantized in forward
    if bits is not None and scheme is not None and scheme.weights is not None:
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        with torch.no_grad():
            return forward_quantize(lin, lin.weight, "weight", scheme.weights)
    return lin.weight
