"""The fragment kernel's inline PTX (`decode_kivi_frag.unpack_ptx`), which the CPU interpreter never runs:
each block is parsed and its instructions emulated bit for bit (fp16 arithmetic in numpy), on every code value
of every slice, in both halves of the 32-bit register. Exact: the codes are small integers."""

import re

import numpy as np
import pytest

from kvq_kernels.decode_kivi_frag import unpack_ptx, unpack_ptx3, unpack_ptx8

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
            assert out.tolist() == [float(c), float(other)], (bits, j, c, ptx)


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
            assert out.tolist() == [float(x) for x in codes], (bits, j, codes, ptx)


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
                assert out.tolist() == [float(x) for x in codes], (j, codes, ptx)


BLOCKS = [(bits, j, 16) for bits in (2, 4, 8) for j in range(16 // bits)]
BLOCKS += [(bits, j, 8) for bits in (2, 4, 8) for j in range(8 // bits)] + [(3, j, 16) for j in range(4)]


@pytest.mark.parametrize("bits,j,container", BLOCKS)
def test_blocks_use_only_the_emulated_instructions(bits, j, container):
    ptx = _ptx(bits, j, container)
    stmts = [s.strip() for s in ptx.strip("{} ").split(";") if s.strip() and not s.strip().startswith(".reg")]
    assert len(stmts) == len(OPS.findall(ptx)), ptx
