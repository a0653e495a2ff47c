"""KV-cache quantization inside a decoder's attention.

A decoder calibrated with ``ElasticSpec.kv_bits`` quantizes the keys and values its attention
reads, per token and per head (:func:`quept.ops.fake_quant_kv`), the keys *after* the rotary
embedding. The cache then holds exactly what the attention multiplies, so a runtime that reads
the codes does no per-token work beyond unpacking them: the queries are rotated into the keys'
Hadamard basis instead, and the weighted sum of the values is rotated back once
(:mod:`quept.export.kv_cache`).

The key and value projections carry the quantizer's settings (``kv_quant`` = (bits, head_dim,
Hadamard-rotated heads)); the quantizer is on whenever its projection is quantized (off in the
float reference). :func:`install` points each such attention module at :func:`kv_attention`
(through a copy of its config naming the ``quept_kv`` implementation), which quantizes the keys
and values and hands them to the implementation the module used before (sdpa, eager, ...). A
``QuantizedKVCache`` attached to the module computes the attention over its codes instead.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quept.ops.quant import fake_quant_kv

ATTENTION = "quept_kv"  # the attention implementation's name in transformers' registry
KVQuant = tuple[int, int, bool]  # (bits, head_dim, Hadamard-rotated heads)


def layer_kv(linear: nn.Module) -> KVQuant | None:
    """A key or value projection's quantizer while it applies (the layer is quantized)."""
    q = getattr(linear, "kv_quant", None)
    return q if q is not None and getattr(linear, "bits", None) is not None else None


def active_kv(module: nn.Module) -> tuple[KVQuant | None, KVQuant | None]:
    """The (keys, values) quantizers an attention module applies now."""
    k, v = module.quept_kv_linears
    return layer_kv(module.get_submodule(k)), layer_kv(module.get_submodule(v))


def kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``quept_kv`` attention: keys and values (batch, heads, tokens, head_dim), after the
    rotary embedding, quantized per token and head, then the module's own implementation; or,
    when an attached quantized cache has just stored these tokens, attention over its codes."""
    cache = getattr(module, "quept_kv_cache", None)
    if cache is not None and cache.holds(key, value):
        return cache.attend(module, query, attention_mask, **kwargs)
    kq, vq = active_kv(module)
    if kq is not None:
        key = fake_quant_kv(key, *kq)
    if vq is not None:
        value = fake_quant_kv(value, *vq)
    return base_attention(module)(module, query, key, value, attention_mask, **kwargs)


def base_attention(module: nn.Module) -> Callable[..., Any]:
    """The attention function the module used before :func:`install` (eager when unnamed)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = module.quept_kv_base
    if name not in (None, "eager") and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} names attention {name!r}, which quept "
                           "cannot find: use 'sdpa' or 'eager'")
    return eager


def install_attention(module: nn.Module, linears: tuple[str, str]) -> None:
    """Make ``module`` (a decoder's attention) run :func:`kv_attention`, reading the quantizers
    of its ``linears`` (key and value projection names inside it). Idempotent."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION, kv_attention)
    module.quept_kv_linears = linears
    config = module.config
    if config._attn_implementation == ATTENTION:
        return
    module.quept_kv_base = config._attn_implementation
    config = copy.copy(config)  # this module's own: the model's masks keep their kind
    config._attn_implementation_internal = ATTENTION
    module.config = config
