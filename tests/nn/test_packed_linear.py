import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from quept.nn.packed_linear import PackedLinear
from quept.ops import kernels
from quept.ops.pack import packed_length
from quept.ops.quant import dequantize

KERNEL = kernels.load() is not None


def make(bits=4, n=48, k=128, gs=32, bias=False, scale_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    scale = torch.rand(n, k // gs, generator=gen) * 0.02 + 1e-3
    zero = torch.randint(0, 2**bits, (n, k // gs), generator=gen).float()
    b = torch.randn(n, generator=gen) if bias else None
    m = PackedLinear.from_codes(codes, scale, zero, bits, gs, b, scale_dtype)
    return m, dequantize(codes, scale.to(scale_dtype).float(), zero, gs), b


@pytest.mark.parametrize("bits", range(2, 9))
def test_buffers_have_packed_shapes_and_dequantize_exactly(bits):
    m, w, _ = make(bits)
    assert m.qweight.shape == (48, 128 * bits // 8) and m.qweight.dtype == torch.uint8
    assert m.qzero.shape == (packed_length(48 * 4, bits),)
    assert torch.equal(m.dequantized(), w)
    assert m.stored_bytes() * 8 == 48 * 128 * bits + 48 * 4 * (32 + bits)


CASES = [(backend, bits) for backend in ("dequant", *(["kernel"] if KERNEL else []), "aten-int4")
         for bits in (2, 3, 4, 5, 8) if backend != "aten-int4" or bits <= 4]


@pytest.mark.parametrize("backend, bits", CASES)
@pytest.mark.parametrize("rows", [1, 5, 40])  # decode steps and a prefill
def test_forward_matches_the_float_weight(backend, bits, rows):
    m, w, b = make(bits, bias=True)
    m.set_backend(backend)
    x = torch.randn(2, rows, 128)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)


def test_meta_build_then_assign_load(tmp_path):
    src, w, _ = make(3, scale_dtype=torch.float16)
    save_file(src.state_dict(), str(tmp_path / "l.safetensors"))
    dst = PackedLinear(128, 48, 3, 32, scale_dtype=torch.float16, device="meta")
    assert all(t.is_meta for t in dst.buffers())
    dst.load_state_dict(load_file(str(tmp_path / "l.safetensors")), assign=True)
    x = torch.randn(3, 128)
    torch.testing.assert_close(dst(x), F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_wrong_shapes_and_backends_are_refused():
    src, _, _ = make(4)
    dst = PackedLinear(128, 48, 3, 32, scale_dtype=torch.float32, device="meta")
    with pytest.raises(RuntimeError, match="size mismatch"):
        dst.load_state_dict(src.state_dict(), assign=True)
    with pytest.raises(ValueError, match="unknown backend"):
        src.set_backend("cuda-magic")
    m5, _, _ = make(5)
    m5.set_backend("aten-int4")
    with pytest.raises(RuntimeError, match="aten-int4 needs"):
        m5(torch.randn(1, 128))
