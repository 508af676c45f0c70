"""GPU-only checks of the packed decode kernels at the benchmark's shapes (head_dim 128), which the CPU
interpreter is too slow for; skipped without CUDA. `bench_decode.py` runs this file first.

Random caches (`fill_random`: random bytes, scales, zeros, fp16 tokens; never zeros), odd lengths with a
partial last key group and partial residual, every kernel path a shape admits. Pass: the kernel's error
against the fp64 reference is at most twice that of the same math in fp16 torch, plus 1e-3.
"""

import pytest
import torch

from kvq_kernels._launch import interpreting

pytestmark = pytest.mark.skipif(
    interpreting() or not torch.cuda.is_available(), reason="GPU-only: head_dim 128 shapes on a CUDA device"
)

# (name, bits, query heads, kv heads, group, sinks, lens)
CASES = [
    ("gqa-32/8-4bit-odd", 4, 32, 8, 128, 0, [97, 4099]),
    ("gqa-32/4-2bit-partial-group", 2, 32, 4, 128, 0, [1025, 333]),
    ("gqa-9/3-8bit-sinks", 8, 9, 3, 128, 4, [2051]),
    ("gqa-9/3-3bit", 3, 9, 3, 128, 0, [1537, 5]),
    ("gqa-32/4-4bit-group-32", 4, 32, 4, 32, 2, [777]),
    ("mha-32/32-4bit", 4, 32, 32, 128, 0, [3001]),
    ("mha-32/32-2bit-group-64", 2, 32, 32, 64, 0, [1153]),
    ("mha-32/32-3bit-sinks", 3, 32, 32, 128, 4, [1090, 4097]),
    ("mha-32/32-8bit-odd", 8, 32, 32, 128, 0, [2049]),
]
PATHS = {True: ("tc", "slice", "simt"), False: ("tc", "slice")}


def _cases():
    from kvq_kernels.decode_kivi import frag_applies

    for c in CASES:
        frag = ("frag",) if frag_applies(c[1], 128, c[4], False) else ()
        for path in PATHS[c[2] == c[3]] + frag:
            yield pytest.param(*c, path, id=f"{c[0]}-{path}")


@pytest.mark.parametrize("name,bits,hq,hkv,group,sinks,lens,path", list(_cases()))
def test_kernel_matches_fp64_reference(name, bits, hq, hkv, group, sinks, lens, path):
    _check(name, bits, hq, hkv, group, sinks, lens, path)


@pytest.mark.parametrize("name,bits,hq,hkv,group,sinks,lens", [c for c in CASES if c[1] != 3 and c[4] >= 128])
def test_fragment_kernel_at_the_other_container_width(name, bits, hq, hkv, group, sinks, lens, monkeypatch):
    """The fragment kernel with the FRAG_CONTAINER_BITS width its default does not use (8 <-> 16): the same check."""
    from kvq_kernels import decode_kivi as dk

    monkeypatch.setitem(dk.FRAG_CONTAINER_BITS, bits, 24 - dk.FRAG_CONTAINER_BITS[bits])
    _check(name, bits, hq, hkv, group, sinks, lens, "frag")


def _check(name, bits, hq, hkv, group, sinks, lens, path):
    from kvq_kernels.benchmarking import fill_random
    from kvq_kernels.decode_kivi import decode_kivi, decode_kivi_reference
    from kvq_kernels.kivi_layout import allocate

    g = torch.Generator(device="cuda").manual_seed(len(name))
    c = allocate(len(lens), hkv, 128, max(lens) + 64, bits, group, 128, sinks, device="cuda")
    fill_random(c, generator=g)
    c.lens.copy_(torch.tensor(lens, dtype=torch.int32))
    q = torch.randn(len(lens), hq, 128, device="cuda", dtype=torch.float16, generator=g)
    ref = decode_kivi_reference(q, c)
    same_math = decode_kivi_reference(q, c, dtype=torch.float16)
    out = decode_kivi(q, c, path=path)
    err = (out.double() - ref).abs().max().item()
    base = (same_math.double() - ref).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * base + 1e-3, (err, base)
