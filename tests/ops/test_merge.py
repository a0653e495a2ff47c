import math

import torch

from quept.ops import multibit_merge


def test_merge_keeps_top_p_most_similar_tokens_at_high_bit():
    g = torch.Generator().manual_seed(0)
    n, c = 10, 8
    high = torch.randn(2, n, c, generator=g)
    low = torch.randn(2, n, c, generator=g)
    mid = torch.randn(2, n, c, generator=g)
    # Make tokens 1, 4, 7, 8, 9 of sample 0 nearly identical between high and low.
    similar = [1, 4, 7, 8, 9]
    low[0, similar] = high[0, similar] + 1e-3
    weights = (0.3, 0.3, 0.4)
    out = multibit_merge([high, mid, low], weights, top_p=0.5)
    mixed = 0.3 * high + 0.3 * mid + 0.4 * low
    kept = [i for i in range(n) if torch.equal(out[0, i], high[0, i])]
    assert kept == similar
    others = [i for i in range(n) if i not in similar]
    assert torch.allclose(out[0, others], mixed[0, others])
    # Per sample: exactly floor(p * N) tokens keep the high-bit value.
    kept1 = sum(torch.equal(out[1, i], high[1, i]) for i in range(n))
    assert kept1 == math.floor(0.5 * n)


def test_merge_with_zero_top_p_is_weighted_mean():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.allclose(multibit_merge([a, b], (0.5, 0.5), 0.0), 0.5 * a + 0.5 * b)
