"""Fused CPU kernel for the weight fake quantization of calibration (:func:`quant.fake_quant`).

Calibration quantizes every weight at every training step, and composed PyTorch operations
make a dozen passes over the weight each way (half of them broadcasting a group's scale, which
is slow on a CPU). This kernel does the forward in one pass per group and the backward in two,
compiled on first use like :mod:`quept.ops.kernels`, from the C++ source ``csrc/fake_quant.cpp``
(``QUEPT_NO_KERNEL=1`` or no compiler: the PyTorch operations). Its forward equals the composed
operations bit for bit (floating-point contraction is off and every division is a division);
its gradients equal theirs up to the order of the sums over a group.

Maths per group of ``gs`` weights ``w`` with clip factors ``a`` (max) and ``b`` (min):
``hi = a max(w)``, ``lo = b min(w)``, ``s = max((hi - lo) / qmax, 1e-8)``, ``v = round(-lo / s)``,
``z = clamp(v, 0, qmax)``, ``t = round(w / s) + z``, ``out = (clamp(t, 0, qmax) - z) s``; the
backward passes straight through both roundings, through each clamp where it does not bind,
and gives ``max(w)`` and ``min(w)`` gradient shares to their tied elements evenly, as autograd
does through the composed operations.
"""

from __future__ import annotations

from types import ModuleType

import torch

from quept.ops.cpp import CppKernel

_KERNEL = CppKernel("quept_fake_quant", "fake_quant.cpp", ["fq_forward", "fq_backward"],
                    "fake-quantization kernel unavailable (%s); using PyTorch operations")


def load() -> ModuleType | None:
    """The compiled module (built once, about half a minute), or None without a compiler or
    with ``QUEPT_NO_KERNEL=1``."""
    return _KERNEL.load()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors (weights, clip factors): float32 on the CPU, and
    the kernel built."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and load() is not None)


def forward(wg: torch.Tensor, qmax: int, hi_f: torch.Tensor, lo_f: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped weights (out, G, gs) -> (fake-quantized weights (out, G, gs), per-group values
    (7, out * G) for :func:`backward`)."""
    r = wg.shape[0] * wg.shape[1]
    out, stats = _KERNEL.module.fq_forward(wg.reshape(r, -1).contiguous(),
                                    hi_f.reshape(r).contiguous(), lo_f.reshape(r).contiguous(),
                                    qmax)
    return out.view(wg.shape), stats


def backward(g: torch.Tensor, wg: torch.Tensor, hi_f: torch.Tensor, lo_f: torch.Tensor,
             stats: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``wg`` (out, G, gs), ``hi_f`` and ``lo_f`` (out, G) given the output's
    gradient ``g`` (out, G, gs)."""
    r = wg.shape[0] * wg.shape[1]
    gw, ga, gb = _KERNEL.module.fq_backward(g.reshape(r, -1).contiguous(), wg.reshape(r, -1).contiguous(),
                                     hi_f.reshape(r).contiguous(), lo_f.reshape(r).contiguous(),
                                     stats, qmax)
    return gw.view(wg.shape), ga.view(hi_f.shape), gb.view(lo_f.shape)
