"""Inputs of a block's linears gathered during its float pass, for the static activation
quantizers (ElasticSpec.activations "per-tensor"): per-channel ranges for the
reparameterisation and a token sample for the percentile search."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from quept.calib.capture import watch_inputs

SAMPLE_TOKENS = 2048  # tokens per layer the percentile search sees


@contextmanager
def channel_ranges(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Yields ``{name: [min per channel, max per channel]}`` of each layer's inputs (as the
    preceding norm writes them), filled while the block runs inside the ``with``."""
    out: dict[str, list[torch.Tensor]] = {}

    def record(name: str, x: torch.Tensor) -> None:
        lo, hi = x.amin(0).cpu(), x.amax(0).cpu()
        if name in out:
            lo, hi = torch.minimum(out[name][0], lo), torch.maximum(out[name][1], hi)
        out[name] = [lo, hi]

    with watch_inputs(layers, record, rotate=False):
        yield out


@contextmanager
def input_samples(layers: Mapping[str, nn.Module], total_tokens: int
                  ) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Yields ``{name: [token rows]}``: about :data:`SAMPLE_TOKENS` evenly spaced tokens of
    each layer's inputs (as its quantizer sees them) out of ``total_tokens`` seen inside the
    ``with``."""
    stride = max(1, total_tokens // SAMPLE_TOKENS)
    out: dict[str, list[torch.Tensor]] = {}

    def record(name: str, x: torch.Tensor) -> None:
        out.setdefault(name, []).append(x[::stride].cpu())

    with watch_inputs(layers, record):
        yield out
