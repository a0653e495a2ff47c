"""Fused unpack + matmul CPU kernels for bit-plane packed codes (see :mod:`quept.ops.pack`).

PyTorch's packed integer CPU kernels (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``)
are vectorised for AVX-512 only; on an AVX2 CPU they run 5-10x slower than a float32 matmul,
and the int8 one takes per-channel scales only (quept's codes are group-wise asymmetric). So
quept compiles its own small kernel on first use (C++ source ``csrc/qgemv.cpp``, shipped with
the package, through ``torch.utils.cpp_extension.load_inline``, cached in the torch extensions
folder): it reads every width 2..8 in its stored layout, decodes 8 codes per step with one shift
and mask per bit plane and accumulates in float32. Without a C++ compiler :func:`load` returns
None and callers fall back to dequantize + ``F.linear``.

Maths per output row n and group g: ``y[m, n] = sum_g s[n, g] * (x_g . q_g) + zs[n, g] *
sum(x_g)`` with ``zs = -zero * scale``, i.e. ``x @ ((q - zero) * scale)^T`` up to float rounding.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from quept.ops.cpp import CppKernel
from quept.ops.pack import PLANES, padded

log = logging.getLogger(__name__)
MAX_ROWS = 8  # the fused kernel takes at most this many activation rows (decode)

_KERNEL = CppKernel("quept_qgemv", "qgemv.cpp", ["qgemv", "qdequant", "kv_quantize", "kv_attend"],
                    "fused CPU kernel unavailable (%s); using dequantize + matmul")


def load() -> ModuleType | None:
    """The compiled kernel module, building it once (about a minute) if needed; None when no
    compiler is available or ``QUEPT_NO_KERNEL=1`` is set."""
    return _KERNEL.load()


def supported(bits: int, in_features: int, group_size: int) -> bool:
    """Whether the fused kernel handles this layer shape (group size a multiple of 8)."""
    return bits in PLANES and in_features % 8 == 0 and group_size % 8 == 0


def qgemv(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zs: torch.Tensor, bits: int,
    group_size: int,
) -> torch.Tensor:
    """x (M <= 8, K) float32 @ dequantized(packed)^T -> (M, N); scale, zs (N, K / group_size)."""
    k = x.shape[-1]
    return _KERNEL.module.qgemv(x, packed, scale, zs, bits, k, group_size, padded(k))


def qdequant(
    packed: torch.Tensor, scale: torch.Tensor, zs: torch.Tensor, bits: int, in_features: int,
    group_size: int, out: torch.Tensor,
) -> torch.Tensor:
    """Write ``scale * code + zs`` (N, in_features) float32 into ``out``; returns ``out``."""
    _KERNEL.module.qdequant(packed, scale, zs, bits, in_features, group_size, padded(in_features), out)
    return out


def kv_quantize(
    x: torch.Tensor, bits: int, head_dim: int, rotation: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of keys and values ``x`` (N, W) float32 quantized per head of ``head_dim`` (in the
    basis ``x @ rotation`` when given) as :func:`quept.ops.quant.quantize_kv` does, in one pass:
    (codes packed as :func:`quept.ops.pack.pack` packs them (N, bytes), steps (N, W / head_dim),
    zero-points (same), the values the codes stand for (N, W), rotated back)."""
    rotation = x.new_empty(0) if rotation is None else rotation
    return tuple(_KERNEL.module.kv_quantize(x, bits, head_dim, rotation, padded(x.shape[1])))


def kv_attend(
    qr: torch.Tensor, qn: torch.Tensor, kv: torch.Tensor, new_k: torch.Tensor,
    new_v: torch.Tensor, mask: torch.Tensor | None, rotation: torch.Tensor | None,
) -> torch.Tensor:
    """One new token's attention over a KV cache's dequantized rows, per (batch, KV head,
    query of its group): ``qr`` (queries rotated into the rows' basis, for the past) and ``qn``
    (for the new key), (B, H, G, D) float32, scaled; ``kv`` (B * T, 2H * D): each cached
    token's key heads then value heads, in the quantizer's basis; ``new_k``/``new_v`` (B, H, 1,
    D); ``mask`` additive (B, T + 1) or None; ``rotation`` (D, D), applied to the weighted sum
    of the past values, or None. Returns (B, H, G, D)."""
    empty = qr.new_empty(0)
    return _KERNEL.module.kv_attend(qr, qn, kv, new_k, new_v, empty if mask is None else mask,
                             empty if rotation is None else rotation)
