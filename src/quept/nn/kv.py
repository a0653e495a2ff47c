"""The KV quantizer at a key or value projection's output, with an optional sink for its codes.

A projection whose output a decoder's KV cache holds (``kv_quant`` = (bits, head_dim,
rotated)) quantizes it per token and head. Its ``kv_sink``, when set (by
:class:`quept.export.kv_cache.QuantizedKVCache`), receives the integer codes, steps and
zero-points, so the cache can store those instead of floats; the output is the same to the
bit either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quept.ops.quant import dequantize_kv, fake_quant_kv, quantize_kv

KVSink = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def quantize_kv_output(y: torch.Tensor, kv_quant: tuple[int, int, bool],
                       sink: KVSink | None) -> torch.Tensor:
    """``y`` (..., heads * head_dim) fake-quantized per token and head; with a ``sink``, its
    codes, steps and zero-points are handed to it first (no gradient on that path)."""
    if sink is None:
        return fake_quant_kv(y, *kv_quant)
    codes, scale, zero = quantize_kv(y, *kv_quant)
    sink(codes, scale, zero)
    return dequantize_kv(codes, scale, zero, kv_quant[2]).to(y.dtype)
