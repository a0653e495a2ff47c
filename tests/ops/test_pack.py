import pytest
import torch

from quept.ops.pack import BLOCK, PLANES, PackError, pack, packed_length, unpack

WIDTHS = sorted(PLANES)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 63), (2, 64), (4, 65), (2, 3, 100), (2, 576)])
def test_round_trip_is_exact(bits, shape):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=gen).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_length(shape[-1], bits))
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", WIDTHS)
def test_true_width_storage(bits):
    # Whole blocks cost exactly `bits` bits per code; a partial block is padded to one block.
    assert packed_length(4 * BLOCK, bits) * 8 == 4 * BLOCK * bits
    assert packed_length(BLOCK + 1, bits) == packed_length(2 * BLOCK, bits)


@pytest.mark.parametrize("bits", WIDTHS)
def test_extreme_codes_survive(bits):
    codes = torch.tensor([[0, 2**bits - 1] * 40], dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, 80), codes)


def test_lane_layout_is_pinned():
    # The layout is a file format: byte i of a plane sub-block holds codes i + 8 j.
    codes = (torch.arange(64) % 16).to(torch.uint8).reshape(1, -1)
    packed = pack(codes, 4)[0]
    assert packed.shape == (32,)
    assert packed[0] == 0 | (8 << 4) and packed[1] == 1 | (9 << 4)
    # 3 bits: a 2-bit plane (low bits) then a 1-bit plane (high bit).
    c3 = torch.full((1, 64), 5, dtype=torch.uint8)  # 0b101
    p3 = pack(c3, 3)[0]
    assert torch.all(p3[:16] == 0b01010101) and torch.all(p3[16:] == 0xFF)


def test_errors():
    with pytest.raises(PackError, match="does not fit in 3 bits"):
        pack(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(PackError, match="uint8"):
        pack(torch.tensor([1, 2]), 4)
    with pytest.raises(PackError, match="no packed layout for 9 bits"):
        pack(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(PackError, match="cannot hold 100 codes"):
        unpack(torch.zeros(2, 10, dtype=torch.uint8), 4, 100)
