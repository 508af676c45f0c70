"""The fragment kernel's inline PTX (`decode_kivi_frag.unpack_ptx`), which the CPU interpreter never runs:
each block is parsed and its instructions emulated bit for bit (fp16 arithmetic in numpy), on every code value
of every slice, in both halves of the 32-bit register. Exact: each comes back as the code plus its slice's
offset (`code_offset`, a power of two), both small integers."""

import re

import numpy as np
import pytest

from kvq_kernels.decode_kivi_frag import code_offset, unpack_ptx, unpack_ptx3, unpack_ptx8

OPS = re.compile(r"(shr\.b32|shl\.b32|lop3\.b32|mov\.b32|prmt\.b32|sub\.f16x2|fma\.rn\.f16x2) ([^;]+);")


def _plain(f):
    return getattr(f, "fn", f)  # triton.constexpr_function wraps the plain function


def _ptx(bits: int, j: int, container: int = 16) -> str:
    if bits == 3:
        return _plain(unpack_ptx3)(j)
    return _plain(unpack_ptx if container == 16 else unpack_ptx8)(bits, j)


def _halves(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)


def _from_halves(h: np.ndarray) -> int:
    lo, hi = (int(x) for x in h.astype(np.float16).view(np.uint16))
    return lo | hi << 16


def _emulate(ptx: str, x: int, inp: str = "$1", **more: int) -> dict:
    """Run the block on input register `inp` = x (and registers named "$k" = value as r<k>=value); returns the
    registers."""
    reg = {inp: x} | {"$" + k[1:]: v for k, v in more.items()}

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in reg:
            return reg[tok]
        return int(tok, 16) if tok.startswith("0x") else int(tok)

    for op, args in OPS.findall(ptx):
        a = [t.strip() for t in args.split(",")]
        if op == "mov.b32":
            reg[a[0]] = val(a[1])
        elif op == "shr.b32":
            reg[a[0]] = val(a[1]) >> val(a[2])
        elif op == "shl.b32":
            reg[a[0]] = (val(a[1]) << val(a[2])) & 0xFFFFFFFF
        elif op == "prmt.b32":  # byte k of the result: byte (selector nibble k) of {b, a}
            src = val(a[1]) | val(a[2]) << 32
            reg[a[0]] = sum(((src >> 8 * ((val(a[3]) >> 4 * k) & 7)) & 0xFF) << 8 * k for k in range(4))
        elif op == "lop3.b32":
            assert a[4] == "0xEA"  # (a & b) | c
            reg[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "sub.f16x2":
            reg[a[0]] = _from_halves(_halves(val(a[1])) - _halves(val(a[2])))
        else:  # fma.rn.f16x2: one rounding of the exact product-sum
            prod = _halves(val(a[1])).astype(np.float64) * _halves(val(a[2])) + _halves(val(a[3]))
            reg[a[0]] = _from_halves(prod.astype(np.float16))
    return reg


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_code_of_every_slice_comes_back_exact(bits):
    per, m = 16 // bits, (1 << bits) - 1
    rng = np.random.default_rng(bits)
    for j in range(per):
        ptx = _ptx(bits, j)
        for c in range(1 << bits):
            # two containers: code c at slot j of the low one, another code at slot j of the high one, random
            # codes in every other slot (they must not leak into the result)
            other = int(rng.integers(0, 1 << bits))
            lo = int(rng.integers(0, 1 << 16)) & ~(m << bits * j) | c << bits * j
            hi = int(rng.integers(0, 1 << 16)) & ~(m << bits * j) | other << bits * j
            out = _halves(_emulate(ptx, lo | hi << 16)["$0"])
            k = _plain(code_offset)(bits, j)
            assert out.tolist() == [c + k, other + k], (bits, j, c, ptx)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_eight_bit_containers_come_back_exact_and_in_order(bits):
    """Four 8-bit containers a register: container k's code j lands in output element k ($0 low, $0 high, $1 low,
    $1 high), whatever the other slots hold."""
    per, m = 8 // bits, (1 << bits) - 1
    rng = np.random.default_rng(10 + bits)
    for j in range(per):
        ptx = _ptx(bits, j, 8)
        for c in range(1 << bits):
            codes = [c] + [int(x) for x in rng.integers(0, 1 << bits, 3)]
            word = 0
            for k, code in enumerate(codes):
                byte = int(rng.integers(0, 256)) & ~(m << bits * j) | code << bits * j
                word |= byte << 8 * k
            reg = _emulate(ptx, word, "$2")
            out = np.concatenate([_halves(reg["$0"]), _halves(reg["$1"])])
            assert out.tolist() == [x + _plain(code_offset)(bits, j) for x in codes], (bits, j, codes, ptx)


def test_three_bit_codes_come_back_exact_and_in_order():
    """3-bit slice j: two 16-bit containers a register ($1), each with code j's low bits at bits 2j, 2j + 1 and its
    high bit at bit 8 + j (`decode_kivi_frag._merge3`); both come back exact, whatever the container's other
    bits hold (bits 12-15 included: the lower half's containers carry the upper half's high bits there). Every
    code value at every slot of both containers."""
    rng = np.random.default_rng(3)
    for j in range(4):
        ptx = _ptx(3, j)
        for c in range(8):
            for pos in range(2):
                codes = [int(x) for x in rng.integers(0, 8, 2)]
                codes[pos] = c
                keep = ~((3 << 2 * j) | (1 << 8 + j)) & 0xFFFF
                cont = [int(rng.integers(0, 1 << 16)) & keep | (x & 3) << 2 * j | (x >> 2) << 8 + j for x in codes]
                out = _halves(_emulate(ptx, cont[0] | cont[1] << 16)["$0"])
                assert out.tolist() == [x + _plain(code_offset)(3, j) for x in codes], (j, codes, ptx)


BLOCKS = [(bits, j, 16) for bits in (2, 4, 8) for j in range(16 // bits)]
BLOCKS += [(bits, j, 8) for bits in (2, 4, 8) for j in range(8 // bits)] + [(3, j, 16) for j in range(4)]


@pytest.mark.parametrize("bits,j,container", BLOCKS)
def test_blocks_use_only_the_emulated_instructions(bits, j, container):
    ptx = _ptx(bits, j, container)
    stmts = [s.strip() for s in ptx.strip("{} ").split(";") if s.strip() and not s.strip().startswith(".reg")]
    assert len(stmts) == len(OPS.findall(ptx)), ptx


@pytest.mark.parametrize("bits,j,container", BLOCKS)
def test_one_lop3_a_pair_of_codes(bits, j, container):
    """The unpack is one LOP3 a pair of codes (3-bit: two, merging the high bit), after at most one shift or, for
    8-bit containers, the two PRMTs that spread four bytes; fp16 arithmetic only for 8-bit codes, whose offset is
    0 (a `sub.f16x2` of 1024 a pair); the others' offsets are subtracted once per key group and per program."""
    ops = [op for op, _ in OPS.findall(_ptx(bits, j, container))]
    pairs = 2 if container == 8 else 1
    assert ops.count("lop3.b32") == (2 if bits == 3 else pairs), ops
    assert ops.count("sub.f16x2") == (pairs if bits == 8 else 0) and "fma.rn.f16x2" not in ops, ops
    assert ops.count("shr.b32") + ops.count("prmt.b32") <= 2, ops


def test_offsets_are_powers_of_two_that_keep_every_code_exact():
    """code + offset is an integer below 2048 (exact in fp16) for every code of every slice; 8-bit codes come
    back as themselves."""
    for bits, j, _ in BLOCKS:
        k = _plain(code_offset)(bits, j)
        assert (k == 0.0) == (bits == 8) and k in (0.0, 4.0, 16.0, 64.0, 256.0, 1024.0), (bits, j, k)
        assert k + (1 << bits) - 1 < 2048, (bits, j, k)
