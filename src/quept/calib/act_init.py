"""Inputs of a block's linears gathered during its float pass, for the static activation
quantizers (ElasticSpec.activations "per-tensor"): per-channel ranges for the
reparameterisation and a token sample for the percentile search."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from quept.ops.hadamard import hadamard_transform

SAMPLE_TOKENS = 2048  # tokens per layer the percentile search sees


@contextmanager
def channel_ranges(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Yields ``{name: [min per channel, max per channel]}`` of each layer's inputs, filled
    while the block runs inside the ``with``."""
    out: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            lo, hi = x.amin(0).cpu(), x.amax(0).cpu()
            if name in out:
                lo, hi = torch.minimum(out[name][0], lo), torch.maximum(out[name][1], hi)
            out[name] = [lo, hi]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def input_samples(layers: Mapping[str, nn.Module], total_tokens: int
                  ) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Yields ``{name: [token rows]}``: about :data:`SAMPLE_TOKENS` evenly spaced tokens of
    each layer's inputs out of ``total_tokens`` seen inside the ``with``."""
    stride = max(1, total_tokens // SAMPLE_TOKENS)
    out: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def fn(m: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if getattr(m, "in_rotation", False):  # the quantizer sees the rotated input
                x = hadamard_transform(x)
            out.setdefault(name, []).append(x[::stride].float().cpu())
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
