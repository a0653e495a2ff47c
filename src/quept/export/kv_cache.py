"""A KV cache that holds the quantized keys and values as packed integer codes.

A decoder calibrated with ``ElasticSpec.kv_bits`` quantizes the keys (after the rotary
embedding) and values its attention reads, per token and head (:mod:`quept.nn.kv`).
Transformers' own cache stores the float keys and values, and the attention quantizes all of
them again on every step. :class:`QuantizedKVCache` stores what a runtime would: per token and
layer, the codes of its key and value heads packed at their true width as one row
(:mod:`quept.ops.pack`), with a step (in the model's dtype) and an int16 zero-point per head
(int32 if one does not fit).

Attached to a model, it quantizes the new tokens' keys and values as they arrive and then
computes the attention itself. The past tokens' codes are dequantized in one pass (quept's
compiled CPU kernel, or torch ops without a compiler) and left in the quantizer's basis: with
``H`` the heads' Hadamard rotation (when they are quantized in that basis), ``q . (k H) =
(q H) . k`` and ``sum_t p_t (v_t H) = (sum_t p_t v_t) H``, so the queries are rotated once per
step and the weighted sum of the values rotated back once, and no past key is rebuilt (the
rotary embedding is already in the codes). The new tokens' keys and values enter as the
quantizer gave them. The result equals transformers' float cache over the same quantized
values up to float rounding (the sums run in another order; tested).

One cache per model at a time: making a cache attaches it (a newer one takes over), and
:meth:`QuantizedKVCache.detach` lets go. ``quept run`` and :func:`quept.export.runtime.generate`
use it whenever the model quantizes its cache.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from quept.config import ConfigError
from quept.models import family_for
from quept.models.kv import KV_LINEARS, install_kv_attention
from quept.nn.kv import ATTENTION, active_kv, base_attention
from quept.ops import kernels
from quept.ops.pack import pack, unpack
from quept.ops.quant import dequantize_kv, hadamard_matrix, quantize_kv, rotate_heads

INT16_MAX = 2**15 - 1


class _Store:
    """A layer's keys and values, quantized together (the same width and head size): per token,
    the codes of its key heads then its value heads packed as one row (batch, tokens, bytes),
    and a step and a zero-point per head (batch, tokens, 2 x heads), in buffers that double
    when full."""

    def __init__(self, bits: int, heads: int, head_dim: int, rotate: bool) -> None:
        self.bits, self.heads, self.head_dim, self.rotate = bits, heads, head_dim, rotate
        self.codes: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.length = 0

    def append(self, key: torch.Tensor, value: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and store ``key`` and ``value`` (batch, heads, new, head_dim); returns the
        values their codes stand for, in the same layout (what the attention's quantizer
        gives)."""
        flat = torch.cat([key, value], 1).transpose(1, 2).flatten(-2)  # (batch, new, 2hd)
        batch, new, width = flat.shape
        if flat.dtype == torch.float32 and _kernel_reads(self.bits, width, self.head_dim,
                                                         flat.device):
            rotation = hadamard_matrix(self.head_dim) if self.rotate else None
            packed, scale, zero, out = (t.view(batch, new, -1) for t in kernels.kv_quantize(
                flat.reshape(batch * new, width).contiguous(), self.bits, self.head_dim,
                rotation))
        else:
            codes, step, zero_point = quantize_kv(flat, self.bits, self.head_dim, self.rotate)
            packed = pack(codes.flatten(-2), self.bits)
            scale, zero = step.squeeze(-1), zero_point.squeeze(-1)
            out = dequantize_kv(codes, step, zero_point, self.rotate)
        if self.codes is None:
            dtype = torch.int16 if float(zero.abs().max()) <= INT16_MAX else torch.int32
            self.codes, self.scale, self.zero = packed, scale, zero.to(dtype)
            self.length = new
        else:
            if self.zero.dtype == torch.int16 and float(zero.abs().max()) > INT16_MAX:
                self.zero = self.zero.to(torch.int32)
            self._reserve(self.length + new)
            end = self.length + new
            self.codes[:, self.length:end] = packed
            self.scale[:, self.length:end] = scale
            self.zero[:, self.length:end] = zero.to(self.zero.dtype)
            self.length = end
        out = out.to(key.dtype).unflatten(-1, (2 * self.heads, self.head_dim)).transpose(1, 2)
        return out[:, :self.heads], out[:, self.heads:]

    def _reserve(self, tokens: int) -> None:
        have = self.codes.shape[1]
        if tokens <= have:
            return
        grow = max(tokens, 2 * have)

        def grown(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((t.shape[0], grow, *t.shape[2:]))
            out[:, :self.length] = t[:, :self.length]
            return out

        self.codes, self.scale, self.zero = grown(self.codes), grown(self.scale), grown(self.zero)

    def rows(self, tokens: int) -> torch.Tensor | None:
        """The first ``tokens`` tokens dequantized by the compiled kernel, ``step * (code -
        zero)`` in the quantizer's basis: float32 (batch * tokens, 2 * heads * head_dim), key
        heads then value heads; None where the kernel cannot read these codes."""
        batch, width = self.codes.shape[0], 2 * self.heads * self.head_dim
        if not _kernel_reads(self.bits, width, self.head_dim, self.codes.device):
            return None
        scale = self.scale[:, :tokens].float()
        zs = -(self.zero[:, :tokens].float() * scale)
        out = torch.empty(batch * tokens, width)
        return kernels.qdequant(
            self.codes[:, :tokens].reshape(batch * tokens, -1),
            scale.reshape(batch * tokens, -1), zs.reshape(batch * tokens, -1), self.bits, width,
            self.head_dim, out)

    def past(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``tokens`` tokens' keys and values in the quantizer's basis (not rotated
        back), ``step * (code - zero)``: float32 (batch, tokens, heads, head_dim) each."""
        batch, width = self.codes.shape[0], 2 * self.heads * self.head_dim
        rows = self.rows(tokens)
        if rows is not None:
            x = rows.view(batch, tokens, 2 * self.heads, self.head_dim)
        else:
            x = unpack(self.codes[:, :tokens], self.bits, width)
            x = x.unflatten(-1, (2 * self.heads, self.head_dim)).float()
            x = (x - self.zero[:, :tokens, :, None].float()) * self.scale[:, :tokens, :, None]
        return x[:, :, :self.heads], x[:, :, self.heads:]

    def select(self, index: torch.Tensor) -> None:
        if self.codes is not None:
            index = index.to(self.codes.device)
            self.codes, self.scale, self.zero = (t[:, :self.length].index_select(0, index)
                                                 for t in (self.codes, self.scale, self.zero))

    def reset(self) -> None:
        self.codes = self.scale = self.zero = None
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes the stored tokens take (the buffers' spare room not counted)."""
        return sum(t[:, :self.length].numel() * t.element_size()
                   for t in (self.codes, self.scale, self.zero) if t is not None)


def _kernel_reads(bits: int, width: int, head_dim: int, device: torch.device) -> bool:
    """Whether quept's compiled CPU kernel dequantizes these codes in one pass."""
    return (device.type == "cpu" and kernels.supported(bits, width, head_dim)
            and kernels.load() is not None)


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's cache: its keys' and values' codes, and the attention over them."""

    is_croppable = False

    def __init__(self, attention: nn.Module, bits: int, heads: int, head_dim: int,
                 rotate: bool) -> None:
        super().__init__()
        self.attention = attention
        self.store = _Store(bits, heads, head_dim, rotate)
        self.fresh: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and store the new tokens' keys and values (batch, heads, new, head_dim);
        returns them as quantized. The attention then reads the past from the codes."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if getattr(self.attention, "quept_kv_cache", None) is not self:
            raise RuntimeError("this quantized KV cache is not attached to the model's "
                               "attention (detached, or a newer cache took over): make a new "
                               "QuantizedKVCache(model)")
        kq, vq = active_kv(self.attention)
        if kq is None or vq is None:
            raise RuntimeError("the model runs this layer's keys or values in float (the float "
                               "reference, or a float layer of a plan): a quantized KV cache "
                               "needs them quantized; use transformers' cache")
        keys, values = self.store.append(key_states, value_states)
        self.length += key_states.shape[-2]
        self.fresh = (keys, values)
        return keys, values

    def holds(self, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether ``key``/``value`` are what :meth:`update` just returned."""
        return self.fresh is not None and key is self.fresh[0] and value is self.fresh[1]

    def attend(self, module: nn.Module, query: torch.Tensor, mask: torch.Tensor | None,
               scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Attention of ``query`` (batch, query heads, q, head_dim) over the past tokens'
        codes and the new tokens; returns (batch, q, query heads, head_dim) as the model's
        attention functions do."""
        new_k, new_v = self.fresh
        self.fresh = None
        new = new_k.shape[-2]
        past = self.length - new
        if past == 0:
            return base_attention(module)(module, query, new_k, new_v, mask, scaling=scaling,
                                          **kwargs)
        batch, q_heads, q, dim = query.shape
        heads = new_k.shape[1]
        group = q_heads // heads
        scaling = dim**-0.5 if scaling is None else scaling
        rows = self.store.rows(past) if q == 1 else None
        if rows is None:  # several new tokens (a prompt in chunks), or no compiled kernel
            keys, values = self.store.past(past)
            return self._attend_many(query, keys, values, new_k, new_v, mask, scaling), None
        # one new token: the compiled kernel, over the rows it dequantized
        qg = query.float().reshape(batch, heads, group, dim) * scaling
        if mask is not None:  # (batch, 1, 1, keys), boolean or additive
            mask = mask[:, 0, -1, :past + new]
            mask = torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask
            mask = mask.float().contiguous()
        rotate = self.store.rotate
        out = kernels.kv_attend((rotate_heads(qg) if rotate else qg).contiguous(),
                                qg.contiguous(), rows, new_k.float().contiguous(),
                                new_v.float().contiguous(), mask,
                                hadamard_matrix(dim) if rotate else None)
        return out.view(batch, q_heads, 1, dim).transpose(1, 2).to(query.dtype), None

    def _attend_many(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     new_k: torch.Tensor, new_v: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
        """:meth:`attend` with torch ops (several new tokens, or no compiled kernel): every key
        and value in the codes' basis (the new ones rotated into it), one sdpa call (memory
        stays low over a long chunk), the output rotated back."""
        rotate = self.store.rotate
        turn = rotate_heads if rotate else (lambda x: x)
        keys = torch.cat([keys.transpose(1, 2), turn(new_k.float())], 2)
        values = torch.cat([values.transpose(1, 2), turn(new_v.float())], 2)
        q, total = query.shape[-2], keys.shape[-2]
        if mask is None:  # causal over the new tokens
            mask = torch.ones(q, total, dtype=torch.bool, device=query.device).tril(total - q)
        else:
            mask = mask[..., :total]
            mask = mask if mask.dtype == torch.bool else mask.float()
        out = F.scaled_dot_product_attention(turn(query.float()), keys, values, attn_mask=mask,
                                             scale=scaling,
                                             enable_gqa=keys.shape[1] != query.shape[1])
        return turn(out).transpose(1, 2).contiguous().to(query.dtype)

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        super().reset()
        self.store.reset()
        self.fresh, self.length = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.store.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store.codes is not None:
            index = torch.arange(self.batch).repeat_interleave(repeats)
            self.batch_select_indices(index)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped")

    @property
    def batch(self) -> int:
        codes = self.store.codes
        return 0 if codes is None else codes.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, steps and zero-points of the stored tokens."""
        return self.store.nbytes


class QuantizedKVCache(Cache):
    """A cache for ``model`` (a decoder with ``kv_bits``) that stores packed integer codes.

    Pass it as the model's cache (``model(ids, cache=QuantizedKVCache(model), use_cache=True)``
    in transformers 5.x, ``past_key_values=`` earlier); ``nbytes`` is what it holds and
    ``float_nbytes(dtype)`` what a float cache of the same tokens would.
    """

    def __init__(self, model: nn.Module) -> None:
        fam = family_for(model)
        if fam.name not in KV_LINEARS:
            raise ConfigError(f"{fam.name} models have no KV cache to quantize")
        k_name = KV_LINEARS[fam.name][0]
        install_kv_attention(model)
        layers, self._attached = [], []
        for i, block in enumerate(fam.get_blocks(model)):
            k = block.get_submodule(k_name)
            attention = block.get_submodule(k_name.rpartition(".")[0])
            if getattr(k, "kv_quant", None) is None:
                raise ConfigError(f"block {i} does not quantize its keys and values (kv_bits "
                                  "unset): a quantized KV cache needs a model calibrated with "
                                  "--kv-bits; use transformers' own cache otherwise")
            if attention.config._attn_implementation != ATTENTION:
                raise ConfigError(f"block {i}'s attention does not run quept's KV quantizer")
            bits, head_dim, rotate = k.kv_quant
            layer = QuantizedKVLayer(attention, bits, k.out_features // head_dim, head_dim,
                                     rotate)
            attention.quept_kv_cache = layer
            self._attached.append((attention, layer))
            layers.append(layer)
        super().__init__(layers=layers)

    def detach(self) -> None:
        """Let go of the model's attention modules (they then quantize as without a cache)."""
        for attention, layer in self._attached:
            if getattr(attention, "quept_kv_cache", None) is layer:
                attention.quept_kv_cache = None

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (codes, steps, zero-points)."""
        return sum(layer.nbytes for layer in self.layers)

    def float_nbytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes a float cache of ``dtype`` would hold for the same tokens."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(2 * layer.batch * layer.length * layer.store.heads * layer.store.head_dim
                   * size for layer in self.layers)
