"""Pack unsigned integer codes at their true bit-width into dense uint8 buffers, and back.

Pure tensor functions over the last dimension: ``pack(codes (..., n), bits)`` gives a uint8
tensor (..., packed_length(n, bits)); ``unpack(packed, bits, n)`` returns the codes exactly.

Layout (the same for every width, so one fused kernel reads all of them): a row is padded with
zero codes to a multiple of :data:`BLOCK` (64) codes, then split into *bit planes*, the binary
decomposition of the width in :data:`PLANES` (7 bits = a 4-bit, a 2-bit and a 1-bit plane, low
bits first). The planes are stored one after another. A plane of ``p`` bits is a run of 8-byte
lanes; lane byte ``i`` of sub-block ``s`` holds the codes ``s * 8 * (8 // p) + i + 8 j`` at bit
offset ``p * j``. So 8 consecutive codes always come from 8 consecutive bytes with one shift and
one mask per plane (one AVX2 register), and every width costs exactly ``bits`` bits per code.
"""

from __future__ import annotations

import torch

BLOCK = 64  # codes per row are padded to a multiple of this
LANES = 8  # bytes per plane sub-block; 8 codes decode at once

# Width -> plane widths, low bits first. The table every packer and kernel reads.
PLANES: dict[int, tuple[int, ...]] = {
    2: (2,),
    3: (2, 1),
    4: (4,),
    5: (4, 1),
    6: (4, 2),
    7: (4, 2, 1),
    8: (8,),
}


class PackError(ValueError):
    """Codes or a packed buffer do not fit the requested width or length."""


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths of ``bits`` (low bits first)."""
    if bits not in PLANES:
        raise PackError(f"no packed layout for {bits} bits; widths are {sorted(PLANES)}")
    return PLANES[bits]


def padded(n: int) -> int:
    """Codes per row after padding to whole blocks."""
    return -(-n // BLOCK) * BLOCK


def packed_length(n: int, bits: int) -> int:
    """Bytes that a row of ``n`` codes of ``bits`` bits occupies."""
    planes(bits)
    return padded(n) * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., n) in ``[0, 2^bits)`` -> packed uint8 (..., packed_length(n, bits))."""
    widths = planes(bits)
    if codes.dtype != torch.uint8:
        raise PackError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise PackError(f"a code ({int(codes.max())}) does not fit in {bits} bits")
    n = codes.shape[-1]
    full = torch.nn.functional.pad(codes, (0, padded(n) - n)).contiguous()
    if widths == (8,) or n == 0:
        return full
    words = full.view(torch.int64)  # 8 codes per word; byte-wise shifts never carry
    out, shift = [], 0
    for p in widths:
        part = (words >> shift) & _byte_mask(p) if shift or p < 8 else words
        out.append(_pack_plane(part, p))
        shift += p
    return torch.cat(out, -1).view(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: packed uint8 (..., m) -> uint8 codes (..., n)."""
    widths = planes(bits)
    m = packed.shape[-1]
    if packed.dtype != torch.uint8:
        raise PackError(f"packed buffer must be uint8, got {packed.dtype}")
    if m != packed_length(n, bits):
        raise PackError(
            f"{m} bytes per row cannot hold {n} codes of {bits} bits "
            f"(expected {packed_length(n, bits)})"
        )
    if widths == (8,) or n == 0:
        return packed[..., :n].contiguous()
    words = packed.contiguous().view(torch.int64)
    codes, start, shift = None, 0, 0
    for p in widths:
        size = m * p // bits // 8  # words in this plane
        part = _unpack_plane(words[..., start : start + size], p)
        codes = part if codes is None else codes.bitwise_or_(part << shift)
        start, shift = start + size, shift + p
    return codes.view(torch.uint8)[..., :n].contiguous()


def _byte_mask(p: int) -> int:
    """``2^p - 1`` in every byte of an int64."""
    return (2**p - 1) * 0x0101010101010101


def _pack_plane(words: torch.Tensor, p: int) -> torch.Tensor:
    """(..., w) words of byte values < 2^p -> (..., w * p / 8) words, lane layout."""
    per = 8 // p
    *lead, w = words.shape
    lanes = words.reshape(*lead, w // per, per)
    out = lanes[..., 0].clone()
    for j in range(1, per):
        out |= lanes[..., j] << (p * j)
    return out


def _unpack_plane(words: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`_pack_plane`: (..., v) words -> (..., v * 8 / p) words."""
    per = 8 // p
    *lead, v = words.shape
    if per == 1:
        return words.clone()
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * p
    return ((words.unsqueeze(-1) >> shifts) & _byte_mask(p)).reshape(*lead, v * per)
