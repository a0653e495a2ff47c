import pytest
import torch

from quept.ops import GroupSizeError, dequantize, fake_quant, quantize, rtn, stored_bits_per_weight


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum())).item()


@pytest.mark.parametrize("group_size", [0, 32])
def test_error_falls_as_bits_rise(group_size):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    snrs = [sqnr(w, rtn(w, b, group_size)) for b in range(2, 9)]
    assert all(hi > lo + 3.0 for lo, hi in zip(snrs, snrs[1:])), snrs
    assert snrs[-1] > 40  # 8-bit is close to lossless


def test_fake_quant_equals_dequant_of_codes():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    hi = torch.rand(16, 2, generator=g) * 0.5 + 0.5
    lo = torch.rand(16, 2, generator=g) * 0.5 + 0.5
    for b in range(2, 9):
        codes, scale, zero = quantize(w, b, 32, hi, lo)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**b - 1
        assert torch.equal(dequantize(codes, scale, zero, 32), fake_quant(w, b, 32, hi, lo))


def test_ste_gradient_reaches_clip_logits_and_weight():
    w = torch.randn(8, 32, requires_grad=True)
    a = torch.full((8, 1), 4.0, requires_grad=True)
    c = torch.full((8, 1), 4.0, requires_grad=True)
    out = fake_quant(w, 3, 32, torch.sigmoid(a), torch.sigmoid(c))
    (out - w.detach() * 0.9).pow(2).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert c.grad is not None and c.grad.abs().sum() > 0
    assert w.grad.abs().sum() > 0


def test_clipping_can_beat_minmax_at_low_bits():
    # Gaussian rows at 2 bits: shrinking the min/max range lowers the error.
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    ones = torch.ones(32, 1)
    full = (fake_quant(w, 2, 0, ones, ones) - w).pow(2).mean()
    clipped = (fake_quant(w, 2, 0, ones * 0.6, ones * 0.6) - w).pow(2).mean()
    assert clipped < full


def test_group_size_must_divide():
    with pytest.raises(GroupSizeError, match="does not divide in_features=576"):
        rtn(torch.randn(4, 576), 4, 128)


def test_stored_bits_counts_overhead():
    assert stored_bits_per_weight(4, 64, 576) == pytest.approx(4 + 20 / 64)
    assert stored_bits_per_weight(8, 0, 576) == pytest.approx(8 + 24 / 576)


def test_search_clip_picks_the_grid_factor_with_least_error():
    from quept.ops import search_clip

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    grid = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    best, lo = search_clip(w, 2, 32, grid)
    assert best.shape == (8, 2) and torch.equal(best, lo)  # no refinement: one tied factor
    errs = torch.stack([
        (fake_quant(w, 2, 32, torch.full((8, 2), a), torch.full((8, 2), a)) - w)
        .pow(2).reshape(8, 2, 32).sum(-1)
        for a in grid.tolist()
    ])
    assert torch.allclose(best, grid[errs.argmin(0)])
    assert best.mean() < 1.0  # 2-bit Gaussian groups want clipping


def test_search_clip_refinement_unties_max_and_min_and_never_raises_the_error():
    from quept.ops import search_clip

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 128, generator=gen)
    w[:, ::32] += 4 * torch.rand(16, 4, generator=gen)  # one-sided outliers: max wants a clip
    col = torch.rand(128, generator=gen) + 0.1
    grid = torch.tensor([0.999, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5])

    def err(hi, lo):
        return ((fake_quant(w, 3, 32, hi, lo) - w).pow(2) * col).reshape(16, 4, 32).sum(-1)

    tied = err(*search_clip(w, 3, 32, grid, col))
    hi, lo = search_clip(w, 3, 32, grid, col, refine=2)
    refined = err(hi, lo)
    assert (refined <= tied * (1 + 1e-5)).all()  # per group, coordinate descent only descends
    assert refined.sum() < 0.99 * tied.sum()
    assert (hi != lo).any()
    assert set(hi.unique().tolist()) | set(lo.unique().tolist()) <= set(grid.tolist())
