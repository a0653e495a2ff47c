"""A KV cache that holds the quantized keys and values as packed integer codes.

A decoder calibrated with ``ElasticSpec.kv_bits`` quantizes the outputs of its key and value
projections per token and head (keys before the rotary embedding). Transformers' own cache then
stores those values as floats, so the cache is no smaller. :class:`QuantizedKVCache` stores what
a runtime would: each token's codes packed at their true width (:mod:`quept.ops.pack`), with a
step (in the model's dtype) and an int16 zero-point per head (int32 if one does not fit), and
the position of every token (int32). Attached to a model, it makes each key/value projection
hand over its codes (the layer's ``kv_sink``); on every step it rebuilds the past tokens' keys (dequantized, rotated back
when the heads were quantized in a Hadamard basis, the rotary embedding applied at their
positions) and values, and appends the new tokens' as the model computed them. The logits are
the same to the bit as with transformers' float cache over the same quantized keys (tested).

One cache per model at a time: making a cache attaches it (a newer one takes over), and
:meth:`QuantizedKVCache.detach` lets go. ``quept run`` and :func:`quept.export.runtime.generate`
use it whenever the model quantizes its cache.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from quept.config import ConfigError
from quept.models import family_for
from quept.models.kv import kv_linears
from quept.ops.pack import pack, unpack
from quept.ops.quant import dequantize_kv

INT16_MAX = 2**15 - 1


class _Store:
    """One of a layer's two streams (keys or values): packed codes (batch, tokens, bytes),
    steps (batch, tokens, heads) and zero-points (batch, tokens, heads), grown by appending."""

    def __init__(self, bits: int, heads: int, head_dim: int, rotate: bool) -> None:
        self.bits, self.heads, self.head_dim, self.rotate = bits, heads, head_dim, rotate
        self.codes: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def take(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """The projection's sink: the codes (batch, tokens, heads, head_dim) of its last call."""
        self.pending = (codes, scale, zero)

    def append(self, tokens: int, what: str) -> None:
        if self.pending is None:
            raise RuntimeError(
                f"the {what} projection handed no quantized codes to the cache: make the cache "
                "for this model (QuantizedKVCache(model)) and keep it attached while it runs")
        codes, scale, zero = self.pending
        self.pending = None
        if codes.ndim != 4 or codes.shape[1] != tokens:
            raise RuntimeError(f"the {what} projection's codes cover {tuple(codes.shape[:-2])} "
                               f"(batch, tokens), but the cache was given {tokens} new tokens")
        packed = pack(codes.flatten(-2), self.bits)
        scale, zero = scale.squeeze(-1), zero.squeeze(-1)
        if self.codes is None:
            dtype = torch.int16 if float(zero.abs().max()) <= INT16_MAX else torch.int32
            self.codes, self.scale, self.zero = packed, scale, zero.to(dtype)
            return
        if self.zero.dtype == torch.int16 and float(zero.abs().max()) > INT16_MAX:
            self.zero = self.zero.to(torch.int32)
        self.codes = torch.cat([self.codes, packed], 1)
        self.scale = torch.cat([self.scale, scale], 1)
        self.zero = torch.cat([self.zero, zero.to(self.zero.dtype)], 1)

    def dequantized(self, tokens: int) -> torch.Tensor:
        """The first ``tokens`` tokens as floats, (batch, heads, tokens, head_dim)."""
        codes = unpack(self.codes[:, :tokens], self.bits, self.heads * self.head_dim)
        codes = codes.unflatten(-1, (self.heads, self.head_dim))
        x = dequantize_kv(codes, self.scale[:, :tokens, :, None],
                          self.zero[:, :tokens, :, None].to(self.scale.dtype), self.rotate)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def select(self, index: torch.Tensor) -> None:
        if self.codes is not None:
            index = index.to(self.codes.device)
            self.codes, self.scale, self.zero = (t.index_select(0, index) for t in (
                self.codes, self.scale, self.zero))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero)
                   if t is not None)


class _SharedRotary:
    """The rotary embedding's (cos, sin) at the past tokens' positions, computed once per step
    for every layer (all layers of a step hold the same positions)."""

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary
        self.key: tuple[torch.Tensor, torch.dtype] | None = None
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, like: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if (self.key is None or self.key[1] != like.dtype
                or self.key[0].shape != positions.shape or not torch.equal(self.key[0], positions)):
            self.key, self.value = (positions, like.dtype), self.rotary(like, positions)
        return self.value


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's cache: the keys' and values' codes and every token's position."""

    is_croppable = False

    def __init__(self, bits: int, heads: int, head_dim: int, rotate: bool,
                 rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                 rope: Callable[..., Any]) -> None:
        super().__init__()
        self.keys_store = _Store(bits, heads, head_dim, rotate)
        self.values_store = _Store(bits, heads, head_dim, rotate)
        self.rotary, self.rope = rotary, rope
        self.positions: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' codes; return every token's keys and values (batch, heads,
        tokens, head_dim): the past rebuilt from codes, the new ones as given."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, new = key_states.shape[0], key_states.shape[-2]
        past = self.length
        self.keys_store.append(new, "key")
        self.values_store.append(new, "value")
        pos = _positions(kwargs, batch, new, past, key_states.device)
        self.positions = pos if self.positions is None else torch.cat([self.positions, pos], 1)
        self.length += new
        if past == 0:
            return key_states, value_states
        keys = self.keys_store.dequantized(past).to(key_states.dtype)
        cos, sin = self.rotary(keys, self.positions[:, :past])
        keys = self.rope(keys, keys, cos, sin)[1]
        values = self.values_store.dequantized(past).to(value_states.dtype)
        return torch.cat([keys, key_states], -2), torch.cat([values, value_states], -2)

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        super().reset()
        for s in (self.keys_store, self.values_store):
            s.codes = s.scale = s.zero = s.pending = None
        self.positions, self.length = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for s in (self.keys_store, self.values_store):
            s.select(indices)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, indices.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.positions is not None:
            index = torch.arange(self.positions.shape[0]).repeat_interleave(repeats)
            self.batch_select_indices(index)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped")

    @property
    def batch(self) -> int:
        return 0 if self.positions is None else self.positions.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, steps, zero-points and positions."""
        pos = 0 if self.positions is None else self.positions.numel() * 4  # stored as int32
        return self.keys_store.nbytes + self.values_store.nbytes + pos


def _positions(kwargs: dict[str, Any], batch: int, new: int, past: int,
               device: torch.device) -> torch.Tensor:
    """The new tokens' positions (batch, new): the attention's ``position_ids`` where the model
    passes them through (transformers 5.x), else the next ``new`` positions after ``past``."""
    inner = kwargs.get("kwargs") or {}
    pos = inner.get("position_ids", kwargs.get("position_ids"))
    if pos is None:
        pos = torch.arange(past, past + new, device=device)[None]
    pos = pos.to(device=device, dtype=torch.int32)
    if pos.shape[-1] != new:
        raise RuntimeError(f"position_ids cover {pos.shape[-1]} tokens, the keys {new}")
    return pos.expand(batch, new)


class QuantizedKVCache(Cache):
    """A cache for ``model`` (a decoder with ``kv_bits``) that stores packed integer codes.

    Pass it as the model's cache (``model(ids, cache=QuantizedKVCache(model), use_cache=True)``
    in transformers 5.x, ``past_key_values=`` earlier); ``nbytes`` is what it holds and
    ``float_nbytes(dtype)`` what a float cache of the same tokens would.
    """

    def __init__(self, model: nn.Module) -> None:
        fam = family_for(model)
        names = kv_linears(fam)
        blocks = fam.get_blocks(model)
        rotary = _SharedRotary(_rotary_embedding(model, fam.blocks))
        layers, self._attached = [], []
        for i, block in enumerate(blocks):
            k, v = (block.get_submodule(n) for n in names)
            if k.kv_quant is None or v.kv_quant is None:
                raise ConfigError(f"block {i} does not quantize its keys and values (kv_bits "
                                  "unset): a quantized KV cache needs a model calibrated with "
                                  "--kv-bits; use transformers' own cache otherwise")
            bits, head_dim, rotate = k.kv_quant
            heads = k.out_features // head_dim
            attention = block.get_submodule(names[0].rpartition(".")[0])
            rope = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
            if rope is None:
                raise ConfigError(f"{type(attention).__name__} has no apply_rotary_pos_emb "
                                  "beside it: cannot rebuild its keys from the cache's codes")
            layer = QuantizedKVLayer(bits, heads, head_dim, rotate, rotary, rope)
            k.kv_sink, v.kv_sink = layer.keys_store.take, layer.values_store.take
            self._attached += [(k, layer.keys_store.take), (v, layer.values_store.take)]
            layers.append(layer)
        super().__init__(layers=layers)

    def detach(self) -> None:
        """Stop the model's projections from handing codes to this cache."""
        for module, sink in self._attached:
            if module.kv_sink == sink:
                module.kv_sink = None

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (codes, steps, zero-points, positions)."""
        return sum(layer.nbytes for layer in self.layers)

    def float_nbytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes a float cache of ``dtype`` would hold for the same tokens."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(2 * layer.batch * layer.length * layer.keys_store.heads
                   * layer.keys_store.head_dim * size for layer in self.layers)


def _rotary_embedding(model: nn.Module, blocks_path: str) -> nn.Module:
    """The rotary embedding module beside the decoder's blocks (``model.rotary_emb``)."""
    parent = blocks_path.rpartition(".")[0]
    name = f"{parent}.rotary_emb" if parent else "rotary_emb"
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"no rotary embedding at {name}: a quantized KV cache rebuilds keys "
                          "with the decoder's rotary embedding") from None
