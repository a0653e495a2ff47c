"""The fused CPU kernel (compiled on first use, about a minute, then cached)."""

import pytest
import torch

from quept.ops import kernels
from quept.ops.pack import pack
from quept.ops.quant import dequantize

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no C++ compiler for the kernel")


def layer(bits, n, k, gs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    scale = torch.rand(n, k // gs, generator=gen) * 0.01 + 1e-3
    zero = torch.randint(0, 2**bits, (n, k // gs), generator=gen).float()
    return codes, scale, zero


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n, k, gs", [(40, 128, 64), (16, 128, 32), (33, 96, 32), (8, 64, 8),
                                     (24, 576, 576)])
def test_gemv_and_dequant_match_dequantize(bits, n, k, gs):
    codes, scale, zero = layer(bits, n, k, gs)
    w = dequantize(codes, scale, zero, gs)
    packed, zs = pack(codes, bits), (-zero * scale).contiguous()
    for m in (1, 3, kernels.MAX_ROWS):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        ref = x @ w.T
        y = kernels.qgemv(x, packed, scale, zs, bits, gs)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item() * k)
    out = torch.empty(n, k)
    kernels.qdequant(packed, scale, zs, bits, k, gs, out)
    torch.testing.assert_close(out, w, rtol=0, atol=1e-6)


def test_kernel_rejects_bad_input():
    codes, scale, zero = layer(4, 8, 64, 32)
    packed, zs = pack(codes, 4), (-zero * scale).contiguous()
    with pytest.raises(RuntimeError, match="at most"):
        kernels.qgemv(torch.randn(kernels.MAX_ROWS + 1, 64), packed, scale, zs, 4, 32)
    with pytest.raises(RuntimeError, match="packed row length"):
        kernels.qgemv(torch.randn(1, 64), packed, scale, zs, 5, 32)
