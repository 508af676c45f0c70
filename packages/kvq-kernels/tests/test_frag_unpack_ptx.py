"""The fragment kernel's inline PTX (`decode_kivi_frag.unpack_ptx`), which the CPU interpreter never runs:
each block is parsed and its instructions emulated bit for bit (fp16 arithmetic in numpy), on every code value
of every slice, in both halves of the 32-bit register. Exact: the codes are small integers."""

import re

import numpy as np
import pytest

from kvq_kernels.decode_kivi_frag import unpack_ptx

OPS = re.compile(r"(shr\.b32|lop3\.b32|mov\.b32|sub\.f16x2|fma\.rn\.f16x2) ([^;]+);")


def _ptx(bits: int, j: int) -> str:
    fn = getattr(unpack_ptx, "fn", unpack_ptx)  # triton.constexpr_function wraps the plain function
    return fn(bits, j)


def _halves(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)


def _from_halves(h: np.ndarray) -> int:
    lo, hi = (int(x) for x in h.astype(np.float16).view(np.uint16))
    return lo | hi << 16


def _emulate(ptx: str, x: int) -> np.ndarray:
    """Run the block on input register $1 = x; returns $0 as two fp16."""
    reg = {"$1": x}

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
        elif op == "lop3.b32":
            assert a[4] == "0xEA"  # (a & b) | c
            reg[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "sub.f16x2":
            reg[a[0]] = _from_halves(_halves(val(a[1])) - _halves(val(a[2])))
        else:  # fma.rn.f16x2: one rounding of the exact product-sum
            prod = _halves(val(a[1])).astype(np.float64) * _halves(val(a[2])) + _halves(val(a[3]))
            reg[a[0]] = _from_halves(prod.astype(np.float16))
    return _halves(reg["$0"])


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
            out = _emulate(ptx, lo | hi << 16)
            assert out.tolist() == [float(c), float(other)], (bits, j, c, ptx)


def test_blocks_use_only_the_emulated_instructions():
    for bits in (2, 4, 8):
        for j in range(16 // bits):
            body = _ptx(bits, j).strip("{} ")
            stmts = [s.strip() for s in body.split(";") if s.strip() and not s.strip().startswith(".reg")]
            assert len(stmts) == len(OPS.findall(_ptx(bits, j))), _ptx(bits, j)
