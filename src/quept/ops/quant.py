"""Asymmetric uniform weight quantization with learnable clipping (DESIGN 2.1).

Pure tensor functions: no modules, no config objects, no I/O. A weight ``w`` of shape
(out, in) is viewed as ``(out, n_groups, group_size)``; ``group_size == 0`` means one group per
output row. Clip factors ``hi_f``/``lo_f`` have shape (out, n_groups) and multiply the group's
max and min.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from quept.ops import fq_kernel
from quept.ops.hadamard import hadamard
from quept.ops.pack import packed_length, padded


class GroupSizeError(ValueError):
    """The group size does not divide the layer's input width."""


def n_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups per row (``group_size`` 0 = per channel)."""
    if group_size == 0:
        return 1
    if group_size < 0 or in_features % group_size:
        divisors = [d for d in (16, 32, 64, 128, 256) if in_features % d == 0]
        raise GroupSizeError(
            f"group size {group_size} does not divide in_features={in_features}; "
            f"use one of {divisors or 'none of the usual sizes'} or 0 (per channel)"
        )
    return in_features // group_size


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups, group_size)."""
    out, inn = w.shape
    return w.reshape(out, n_groups(inn, group_size), -1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


def fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric fake quantization of activations (..., in): each row scaled by its
    largest magnitude onto the integers -(2^(b-1) - 1)..2^(b-1) - 1 (straight-through rounding;
    the scale stays differentiable)."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return torch.clamp(round_ste(x / scale), -qmax, qmax) * scale


def fake_quant_kv(x: torch.Tensor, bits: int, head_dim: int, rotate: bool = False
                  ) -> torch.Tensor:
    """Per-head asymmetric fake quantization of keys or values (..., heads * head_dim): each
    token's ``head_dim`` features of one head share a min/max range on 0..2^b - 1, as a KV
    cache would store them (straight-through rounding; scale and zero-point differentiable).
    ``rotate`` (``head_dim`` a power of two): each head is quantized in a Hadamard-rotated
    basis, ``H Q(H x)`` (H symmetric orthonormal, its own inverse), which spreads a head's
    outlier channels over all of them; a runtime stores the codes of ``H x``."""
    return dequantize_kv(*_kv_grid(x, bits, head_dim, rotate, round_ste), rotate)


def quantize_kv(x: torch.Tensor, bits: int, head_dim: int, rotate: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The integers :func:`fake_quant_kv` rounds ``x`` (..., heads * head_dim) to: uint8 codes
    (..., heads, head_dim) on 0..2^b - 1 (of ``H x`` per head when ``rotate``), and each
    (token, head)'s float step and integer-valued zero-point, both (..., heads, 1).
    ``dequantize_kv`` of them is ``fake_quant_kv(x, ...)`` to the bit (no gradient)."""
    codes, scale, zero = _kv_grid(x.detach(), bits, head_dim, rotate, torch.round)
    return codes.to(torch.uint8), scale, zero


def _kv_grid(x: torch.Tensor, bits: int, head_dim: int, rotate: bool,
             rnd: Callable[[torch.Tensor], torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (as floats), steps and zero-points of ``x`` per token and head, rounded by ``rnd``
    (straight-through for :func:`fake_quant_kv`, plain for :func:`quantize_kv`)."""
    _check_kv(x, head_dim, rotate)
    qmax = 2**bits - 1
    xg = x.unflatten(-1, (-1, head_dim))
    if rotate:
        xg = rotate_heads(xg)
    lo, hi = xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = rnd(-lo / scale)
    return torch.clamp(rnd(xg / scale) + zero, 0, qmax), scale, zero


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  rotate: bool = False) -> torch.Tensor:
    """Codes (..., heads, head_dim) with their steps and zero-points (..., heads, 1) -> the
    keys or values (..., heads * head_dim) they stand for (:func:`quantize_kv`)."""
    q = (codes.to(scale.dtype) - zero) * scale
    return (rotate_heads(q) if rotate else q).flatten(-2)


def rotate_heads(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` over the last dimension (a power of two; H the symmetric orthonormal Hadamard
    matrix, its own inverse), as one matmul: for a KV cache's head size this is several times
    faster than the butterflies of :func:`hadamard_transform`."""
    return x @ _hadamard_matrix(x.shape[-1], x.dtype, x.device)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The symmetric orthonormal n x n Hadamard matrix the KV quantizer rotates heads by
    (cached; do not modify it)."""
    return _hadamard_matrix(n, dtype, torch.device(device))


@functools.lru_cache(maxsize=16)
def _hadamard_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # a normal tensor even when first asked for under inference_mode: calibration later
    # multiplies by it with autograd on, which an inference tensor would refuse
    with torch.inference_mode(False):
        return hadamard(n).to(dtype=dtype, device=device).clone()


def _check_kv(x: torch.Tensor, head_dim: int, rotate: bool) -> None:
    if x.shape[-1] % head_dim:
        raise GroupSizeError(f"head dimension {head_dim} does not divide the key/value width "
                             f"{x.shape[-1]}")
    if rotate and not is_power_of_two(head_dim):
        raise GroupSizeError(f"a rotated KV quantizer needs a power-of-two head dimension, got "
                             f"{head_dim}")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fake_quant_static(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | float,
                      bits: int) -> torch.Tensor:
    """Static per-tensor asymmetric fake quantization of activations: one ``step`` and integer
    ``zero`` for the whole tensor, codes 0..2^b - 1 (straight-through rounding: the gradient
    reaches ``step``, as in learned step size quantization)."""
    qmax = 2**bits - 1
    return (torch.clamp(round_ste(x / step) + zero, 0, qmax) - zero) * step


# Lower and upper quantiles the activation range search tries: min/max and four clipped ranges.
ACT_PERCENTILES = (1.0, 0.99999, 0.9999, 0.999, 0.99)
ACT_SEARCH_MAX = 2**22  # elements the search reads at most (evenly spaced beyond that)


@torch.no_grad()
def search_act_range(x: torch.Tensor, widths: tuple[int, ...] | list[int],
                     percentiles: tuple[float, ...] = ACT_PERCENTILES
                     ) -> dict[int, tuple[float, float]]:
    """Per width, the (step, zero) of the static quantizer whose range, a pair of lower/upper
    quantiles of the sample ``x``, gives the least squared quantization error on ``x``."""
    flat = x.reshape(-1).float()
    if flat.numel() > ACT_SEARCH_MAX:  # torch.quantile takes at most 2^24 elements
        flat = flat[:: -(-flat.numel() // ACT_SEARCH_MAX)]
    qs = torch.tensor([q for p in percentiles for q in (1 - p, p)], dtype=flat.dtype)
    bounds = torch.quantile(flat, qs).reshape(-1, 2).tolist()
    out = {}
    for bits in widths:
        qmax, best = 2**bits - 1, None
        for lo, hi in bounds:
            lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero stays exactly representable
            step = max((hi - lo) / qmax, 1e-8)
            zero = float(round(-lo / step))
            err = (fake_quant_static(flat, torch.tensor(step), zero, bits) - flat).pow(2).mean()
            if best is None or err < best[0]:
                best = (err, step, zero)
        out[bits] = best[1:]
    return out


def qparams(
    wg: torch.Tensor, bits: int, hi_f: torch.Tensor, lo_f: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point per group from grouped weights (out, G, gs) and clip factors (out, G).

    ``s = (hi - lo) / (2^b - 1)`` with ``hi = hi_f * max``, ``lo = lo_f * min``; the zero-point is
    rounded with a straight-through gradient and kept in ``[0, 2^b - 1]`` so it stores in b bits.
    Returns (scale, zero), each (out, G, 1).
    """
    qmax = 2**bits - 1
    hi = hi_f.unsqueeze(-1) * wg.amax(dim=-1, keepdim=True)
    lo = lo_f.unsqueeze(-1) * wg.amin(dim=-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = round_ste(-lo / scale).clamp(0, qmax)
    return scale, zero


def fake_quant(
    w: torch.Tensor, bits: int, group_size: int, hi_f: torch.Tensor, lo_f: torch.Tensor
) -> torch.Tensor:
    """Quantize-dequantize ``w`` (out, in) at ``bits``; differentiable w.r.t. ``w`` and the clips.

    The values are those of :func:`qparams` and ``clamp(round(w / s) + z, 0, 2^b - 1)``, and the
    gradient is the one autograd takes through them (straight-through rounding, clamps passing
    their inside, max and min handing theirs to the tied elements evenly), written out as one
    step: the fused CPU kernel of :mod:`quept.ops.fq_kernel` for float32 CPU tensors, else
    :class:`_FakeQuant` (a calibration spent over a third of its time here before)."""
    wg = to_groups(w, group_size)
    grad = torch.is_grad_enabled() and (w.requires_grad or hi_f.requires_grad
                                        or lo_f.requires_grad)
    if fq_kernel.usable(w, hi_f, lo_f):
        if grad:
            return _FakeQuantKernel.apply(wg, bits, hi_f, lo_f).reshape_as(w)
        return fq_kernel.forward(wg, 2**bits - 1, hi_f, lo_f)[0].reshape_as(w)
    if grad:
        return _FakeQuant.apply(wg, bits, hi_f, lo_f).reshape_as(w)
    scale, zero = qparams(wg, bits, hi_f, lo_f)
    return ((torch.round(wg / scale) + zero).clamp(0, 2**bits - 1) - zero).mul(scale).reshape_as(w)


class _FakeQuantKernel(torch.autograd.Function):
    """:func:`fake_quant` on grouped float32 CPU weights (out, G, gs) through the fused kernel."""

    @staticmethod
    def forward(ctx, wg: torch.Tensor, bits: int, hi_f: torch.Tensor,
                lo_f: torch.Tensor) -> torch.Tensor:
        ctx.qmax = 2**bits - 1
        out, stats = fq_kernel.forward(wg, ctx.qmax, hi_f, lo_f)
        ctx.save_for_backward(wg, hi_f, lo_f, stats)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        wg, hi_f, lo_f, stats = ctx.saved_tensors
        g_w, g_hi, g_lo = fq_kernel.backward(g, wg, hi_f, lo_f, stats, ctx.qmax)
        need = ctx.needs_input_grad
        return (g_w if need[0] else None, None, g_hi if need[2] else None,
                g_lo if need[3] else None)


class _FakeQuant(torch.autograd.Function):
    """:func:`fake_quant` on grouped weights (out, G, gs) with its backward written out: a few
    passes over the weight instead of the composed operations' many."""

    @staticmethod
    def forward(ctx, wg: torch.Tensor, bits: int, hi_f: torch.Tensor,
                lo_f: torch.Tensor) -> torch.Tensor:
        qmax = 2**bits - 1
        mx, mn = wg.amax(dim=-1, keepdim=True), wg.amin(dim=-1, keepdim=True)
        hi, lo = hi_f.unsqueeze(-1) * mx, lo_f.unsqueeze(-1) * mn
        raw = (hi - lo) / qmax
        scale = raw.clamp(min=1e-8)
        v = torch.round(-lo / scale)
        zero = v.clamp(0, qmax)
        u = wg / scale
        t = torch.round(u) + zero
        q = t.clamp(0, qmax)
        codes = q - zero
        inside = (t == q).to(wg.dtype)  # where the clamp passes its gradient
        # d out / d s at fixed clips: out = (q - z) s, and inside the clamp u = w / s too
        ds = codes - u * inside
        ctx.qmax = qmax
        ctx.save_for_backward(wg, hi_f, lo_f, mx, mn, lo, raw, scale, v, inside, ds)
        return codes * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        wg, hi_f, lo_f, mx, mn, lo, raw, scale, v, inside, ds = ctx.saved_tensors
        qmax = ctx.qmax
        g_in = g * inside
        g_scale = (g * ds).sum(-1, keepdim=True)
        g_zero = (g_in.sum(-1, keepdim=True) - g.sum(-1, keepdim=True)) * scale
        g_v = g_zero * ((v >= 0) & (v <= qmax))  # z = clamp(round(v)), v = -lo / s
        g_scale = g_scale + g_v * lo / scale**2
        g_raw = g_scale * (raw >= 1e-8)  # s = clamp((hi - lo) / qmax, 1e-8)
        g_hi = g_raw / qmax
        g_lo = -g_v / scale - g_raw / qmax
        g_w = g_hi_f = g_lo_f = None
        if ctx.needs_input_grad[0]:
            g_w = g_in
            for ext, g_ext in ((mx, g_hi * hi_f.unsqueeze(-1)), (mn, g_lo * lo_f.unsqueeze(-1))):
                tied = wg == ext  # amax / amin share it among tied elements
                g_w = g_w + tied * (g_ext / tied.sum(-1, keepdim=True))
        if ctx.needs_input_grad[2]:
            g_hi_f = (g_hi * mx).squeeze(-1)
        if ctx.needs_input_grad[3]:
            g_lo_f = (g_lo * mn).squeeze(-1)
        return g_w, None, g_hi_f, g_lo_f


def quantize(
    w: torch.Tensor, bits: int, group_size: int, hi_f: torch.Tensor, lo_f: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes (out, in) in ``[0, 2^b-1]`` as uint8, plus scale and zero (out, G)."""
    with torch.no_grad():
        wg = to_groups(w, group_size)
        scale, zero = qparams(wg, bits, hi_f, lo_f)
        q = torch.clamp(torch.round(wg / scale) + zero, 0, 2**bits - 1)
    return q.reshape_as(w).to(torch.uint8), scale.squeeze(-1), zero.squeeze(-1)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize`: (codes - zero) * scale, shape (out, in)."""
    qg = to_groups(codes.to(scale.dtype), group_size)
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(codes.shape)


def rtn(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest min/max fake quantization (no clipping, no adapter)."""
    ones = torch.ones(w.shape[0], n_groups(w.shape[1], group_size), dtype=w.dtype, device=w.device)
    return fake_quant(w, bits, group_size, ones, ones)


@torch.no_grad()
def _grid_error(
    wg: torch.Tensor, mx: torch.Tensor, mn: torch.Tensor, hi_f: torch.Tensor, lo_f: torch.Tensor,
    qmax: int, h: torch.Tensor | None, buf: torch.Tensor,
) -> torch.Tensor:
    """(Weighted) squared quantization error per group for clip factors ``hi_f``/``lo_f``
    (scalars or (out, G, 1)); the arithmetic of :func:`qparams`/:func:`fake_quant`, in place."""
    lo = lo_f * mn
    scale = (hi_f * mx - lo).div_(qmax).clamp_(min=1e-8)
    zero = torch.round(-lo / scale).clamp_(0, qmax)
    torch.div(wg, scale, out=buf)
    buf.round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale).sub_(wg).square_()
    if h is not None:
        buf.mul_(h)
    return buf.sum(-1, keepdim=True)


@torch.no_grad()
def search_clip(
    w: torch.Tensor, bits: int, group_size: int, grid: torch.Tensor,
    col_weight: torch.Tensor | None = None, refine: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clip factors from ``grid`` (1-D, values in (0, 1]) minimising the quantization
    error of ``w`` at ``bits``. ``col_weight`` (in,), e.g. the mean squared input per input
    channel, weights each column's squared error (activation-aware); None = plain MSE.

    First the same factor on max and min; then ``refine`` rounds of coordinate descent, the max
    factor with the min factor held and the reverse (each round can only lower the error).
    Returns (hi, lo), each (out, n_groups)."""
    qmax = 2**bits - 1
    wg = to_groups(w, group_size)
    h = None if col_weight is None else to_groups(col_weight.reshape(1, -1), group_size)
    mx, mn = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    buf = torch.empty_like(wg)
    best_err = torch.full(mx.shape, float("inf"), dtype=w.dtype, device=w.device)

    def improves(hi_f: float | torch.Tensor, lo_f: float | torch.Tensor) -> torch.Tensor:
        """Groups where (hi_f, lo_f) beats the best so far; records their error."""
        nonlocal best_err
        err = _grid_error(wg, mx, mn, hi_f, lo_f, qmax, h, buf)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        return better

    hi = torch.ones_like(best_err)
    for alpha in grid.tolist():
        hi = torch.where(improves(alpha, alpha), alpha, hi)
    lo = hi.clone()
    for _ in range(refine):
        for alpha in grid.tolist():  # the max factor, the min factor held
            hi = torch.where(improves(alpha, lo), alpha, hi)
        for alpha in grid.tolist():  # the min factor, the max factor held
            lo = torch.where(improves(hi, alpha), alpha, lo)
    return hi.squeeze(-1), lo.squeeze(-1)


def stored_bits_per_weight(bits: int, group_size: int, in_features: int,
                           out_features: int | None = None) -> float:
    """Bits a packed layer stores per weight (:mod:`quept.ops.pack`): the code, each row's
    codes padded to whole blocks of 64, plus an fp16 scale and a b-bit zero-point per group.
    With ``out_features`` the padding of the packed zero-points is counted too: the exact
    bytes `quept export` writes. Rows of a multiple of 64 weights (every LLM here) pad
    nothing: ``bits + (16 + bits) / group_size``."""
    gs = in_features if group_size == 0 else group_size
    codes = bits * padded(in_features) / in_features
    if out_features is None:
        return codes + (16 + bits) / gs
    groups = out_features * n_groups(in_features, group_size)
    zeros = 8 * packed_length(groups, bits) / (out_features * in_features)
    return codes + 16 / gs + zeros
