"""Bit packing: exact round trips and the documented byte layout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq_core.formats import SUPPORTED_BITS, packed_row_bytes
from kvq_core.packing import pack, unpack
from kvq_core.quant import num_levels


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), n=st.integers(1, 70), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_round_trip_any_width_and_length(bits, n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, num_levels(bits), (rows, n), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_row_bytes(bits, n))
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


def test_documented_layouts():
    # 2-bit: code 0 in the low bits of byte 0.
    assert pack(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4, 3]
    # 4-bit: low nibble first.
    assert pack(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    # 3-bit bit planes: a 2-bit plane (bits 0-1) then a 1-bit plane (bit 2); 8 codes in 3 bytes.
    codes = torch.tensor([7, 0, 5, 2, 1, 6, 3, 4])
    low = codes & 3
    high = codes >> 2
    expect = [int(sum(int(low[i + j]) << (2 * j) for j in range(4))) for i in (0, 4)]
    expect.append(int(sum(int(high[j]) << j for j in range(8))))  # 8 codes: h = 4, so bit j is code j
    assert pack(codes, 3).tolist() == expect
    # the 1-bit plane pairs nibbles in blocks of 32 codes: byte b of a block holds codes 4b .. 4b + 3 in bits 0-3
    # and 16 + 4b .. 16 + 4b + 3 in bits 4-7 (here codes 16, 5 and 63 of 64: byte 0 bit 4, byte 1 bit 1 and
    # byte 7 bit 7)
    hi64 = torch.zeros(64, dtype=torch.long)
    hi64[[16, 5, 63]] = 4
    assert pack(hi64, 3).tolist()[-8:] == [16, 2, 0, 0, 0, 0, 0, 128]
    # a last block of m < 32 codes pairs at h = 4 * ceil(m / 8) (16 codes: byte 0 = codes 0-3 and 8-11, byte 1 =
    # 4-7 and 12-15)
    hi16 = [1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 1, 1]
    assert pack(torch.tensor(hi16) * 4, 3).tolist()[-2:] == [0b0011_1001, 0b1100_0110]
    # 12 codes: h = 8; byte 1's high nibble is padding; 44 codes = a block of 32, then 12 as above
    hi12 = [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1]
    assert pack(torch.tensor(hi12) * 4, 3).tolist()[-2:] == [0b1101_0000, 0]
    assert pack(torch.tensor([0] * 32 + hi12) * 4, 3).tolist()[-6:] == [0, 0, 0, 0, 0b1101_0000, 0]
    # ternary: 5 codes per byte, base 3.
    assert pack(torch.tensor([2, 1, 0, 0, 1, 2]), 1.5).tolist() == [2 + 1 * 3 + 81, 2]


@pytest.mark.parametrize(
    "bits,n,expect", [(2, 128, 32), (3, 128, 48), (4, 64, 32), (1.5, 128, 26), (3, 97, 38), (8, 1, 1)]
)
def test_packed_row_bytes(bits, n, expect):
    assert packed_row_bytes(bits, n) == expect


def test_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.tensor([1.0]), 2)
    with pytest.raises(ValueError, match="unsupported bit width"):
        packed_row_bytes(9, 4)
    with pytest.raises(ValueError, match="need 48"):
        unpack(torch.zeros(47, dtype=torch.uint8), 3, 128)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_empty_rows_round_trip(bits):
    codes = torch.zeros(0, 3, 128, dtype=torch.uint8)  # a cache with no quantized tokens yet
    packed = pack(codes, bits)
    assert packed.shape == (0, 3, packed_row_bytes(bits, 128))
    assert unpack(packed, bits, 128).shape == (0, 3, 128)
    none = torch.zeros(2, 0, dtype=torch.uint8)  # rows of no codes
    assert pack(none, bits).shape == (2, 0) and unpack(pack(none, bits), bits, 0).shape == (2, 0)
