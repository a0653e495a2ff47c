"""fake_quant's written-out gradient (the fused CPU kernel and the PyTorch fallback) against
autograd through the composed operations it replaces."""

import pytest
import torch

from quept.ops import fq_kernel, quant
from quept.ops.quant import fake_quant, qparams, round_ste, to_groups


def composed(w, bits, gs, hi_f, lo_f):
    """The operations fake_quant stands for, differentiated by autograd."""
    wg = to_groups(w, gs)
    scale, zero = qparams(wg, bits, hi_f, lo_f)
    q = torch.clamp(round_ste(wg / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape_as(w)


def awkward(gs: int, seed: int = 0):
    """Weights on a coarse grid (many tied maxima and minima, as in the Q4_1 default model),
    groups of one sign, an all-zero group, and clip factors with a zero range."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.round(torch.randn(24, 128, generator=gen) * 4) / 4
    w[0, :64] = w[0, :64].abs() + 0.1  # zero-point clamped at 0
    w[1, :64] = -w[1, :64].abs() - 0.1  # at 2^b - 1
    w[2, :64] = 0.0  # the scale's floor
    groups = 1 if gs == 0 else 128 // gs
    hi = torch.rand(24, groups, generator=gen) * 0.6 + 0.5
    lo = torch.rand(24, groups, generator=gen) * 0.6 + 0.5
    lo[3, 0] = hi[3, 0]
    w[3, : gs or 128] = 0.75  # one value: a zero range
    return w, hi, lo


def grads(fn, w, bits, gs, hi, lo, g):
    w, hi, lo = (t.clone().requires_grad_(True) for t in (w, hi, lo))
    out = fn(w, bits, gs, hi, lo)
    out.backward(g)
    return out.detach(), w.grad, hi.grad, lo.grad


def close(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() < 1e-5


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("gs", [32, 64, 0])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_values_equal_and_gradients_match_the_composed_operations(kernel, gs, bits,
                                                                   monkeypatch):
    if kernel and fq_kernel.load() is None:
        pytest.skip("no C++ compiler for the kernel")
    monkeypatch.setattr(fq_kernel, "usable", lambda *t: kernel)
    w, hi, lo = awkward(gs, seed=bits)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(bits))
    want = grads(composed, w, bits, gs, hi, lo, g)
    got = grads(fake_quant, w, bits, gs, hi, lo, g)
    assert torch.equal(got[0], want[0])  # the same values, to the bit
    for a, b in zip(got[1:], want[1:]):
        assert close(a, b)
    with torch.no_grad():  # the path without a graph gives them too
        assert torch.equal(fake_quant(w, bits, gs, hi, lo), want[0])


def test_the_kernel_path_is_taken_and_only_needed_gradients_are_given(monkeypatch):
    if fq_kernel.load() is None:
        pytest.skip("no C++ compiler for the kernel")
    calls = []
    real = fq_kernel.backward
    monkeypatch.setattr(fq_kernel, "backward", lambda *a: calls.append(1) or real(*a))
    w, hi, lo = awkward(32)
    w.requires_grad_(True)  # fixed clips: no gradient asked for them
    fake_quant(w, 3, 32, hi, lo).sum().backward()
    assert calls and w.grad is not None and hi.grad is None
    assert fq_kernel.usable(w) and not fq_kernel.usable(w.double())


def test_the_kernel_refuses_bad_input():
    if fq_kernel.load() is None:
        pytest.skip("no C++ compiler for the kernel")
    mod = fq_kernel.load()
    with pytest.raises(RuntimeError, match="contiguous float32"):
        mod.fq_forward(torch.zeros(4, 8).t(), torch.ones(8), torch.ones(8), 7)
    with pytest.raises(RuntimeError, match="one clip factor per group"):
        mod.fq_forward(torch.zeros(4, 8), torch.ones(3), torch.ones(4), 7)


def test_the_pytorch_fallback_keeps_no_graph_of_its_own():
    w, hi, lo = awkward(32)
    w.requires_grad_(True)
    out = quant._FakeQuant.apply(to_groups(w, 32), 4, hi, lo)
    assert type(out.grad_fn).__name__ == "_FakeQuantBackward"
