import pytest
import torch

from kvq_kernels.decode_kivi import decode_kivi, decode_kivi_reference
from kvq_kernels.kivi_layout import allocate


def random_cache(b, h, d, cap, bits, group, residual, sinks, lens, device, nuq=False, seed=0):
    """Random codes, scales, zeros and fp16 parts (never zeros): every stored value is exercised."""
    g = torch.Generator().manual_seed(seed)
    cb = torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values.half().to(device) if nuq else None
    c = allocate(b, h, d, cap, bits, group, residual, sinks, device=device, codebook=cb)
    span = 1.0 if nuq else 2.0 / (2**bits - 1)  # dequantized values of order 1
    for t in (c.k_codes, c.v_codes):
        t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
    for t in (c.k_scale, c.v_scale):
        t.copy_(torch.rand(t.shape, generator=g) * span / 2 + span / 2)
    for t in (c.k_zero, c.v_zero, c.k_res, c.v_win, c.k_sink, c.v_sink):
        t.copy_(torch.randn(t.shape, generator=g))
    c.lens.copy_(torch.tensor(lens, dtype=torch.int32))
    return c


# (name, bits, batch, query heads, kv heads, head_dim, group, residual, sinks, lens)
CASES = [
    ("context-1", 4, 1, 4, 4, 32, 16, 32, 0, [1]),
    ("odd-97-partial-residual", 2, 1, 4, 4, 32, 16, 32, 0, [97]),
    ("smollm2-gqa-9/3-3bit", 3, 2, 9, 3, 64, 32, 64, 4, [3, 300]),
    ("mha-8bit-sinks", 8, 2, 2, 2, 32, 16, 32, 2, [70, 161]),
    ("gqa-4bit-group-ge-headdim", 4, 1, 8, 2, 32, 32, 64, 0, [231]),
    ("nuq-3bit", 3, 1, 6, 3, 32, 16, 32, 1, [150]),
    ("nuq-2bit", 2, 1, 4, 2, 32, 16, 32, 0, [99]),
    # head_dim 128: channel slices wide enough for tl.dot (W = 128 / 4 and 128 / 8)
    ("2bit-d128-value-groups", 2, 1, 4, 4, 128, 32, 64, 0, [300]),
    ("3bit-d128-gqa", 3, 1, 4, 2, 128, 128, 128, 1, [400]),
    # 3-bit head_dim 256: eight 32-channel blocks of the 1-bit plane (value groups of 64: the word kernel on "tc")
    ("3bit-d256-gqa-group-64", 3, 1, 4, 2, 256, 64, 64, 0, [150]),
]


# "tc" runs the word-unpack tensor-core kernel (decode_kivi_words) for uniform 2/4/8-bit and the channel-slice
# kernel otherwise; "slice" always the channel-slice kernel; MHA cases also run the CUDA-core kernel (decode_kivi_simt)
MHA_CASES = [c for c in CASES if c[3] == c[4]] + [
    ("mha-3bit-d64-sinks", 3, 2, 3, 3, 64, 16, 32, 3, [45, 190]),
    ("mha-nuq-4bit-value-groups", 4, 1, 2, 2, 64, 16, 32, 0, [133]),
    ("mha-2bit-d32-two-words", 2, 1, 2, 2, 32, 32, 32, 1, [129]),
    # 3-bit: one 1-bit-plane word a row (head_dim 32) and four (head_dim 128, value groups)
    ("mha-3bit-d32-one-plane-word", 3, 1, 2, 2, 32, 16, 32, 0, [77]),
    ("mha-3bit-d128-value-groups", 3, 1, 2, 2, 128, 32, 64, 1, [201]),
    # nuq 3-bit codes index a codebook: assembled as integers from both planes (not each plane in place)
    ("mha-nuq-3bit-d64", 3, 2, 2, 2, 64, 16, 32, 1, [33, 170]),
    ("mha-3bit-d256", 3, 1, 2, 2, 256, 64, 64, 0, [140]),
]
# "frag" (decode_kivi_frag): uniform 2/3/4/8-bit, channel slices of >= 16 channels, group_size >= head_dim
FRAG_CASES = [
    ("frag-gqa-4bit-d64-sinks", 4, 2, 8, 2, 64, 64, 64, 2, [5, 300]),
    ("frag-gqa-9/3-4bit-d64-odd", 4, 1, 9, 3, 64, 64, 64, 3, [201]),
    ("frag-gqa-2bit-d128", 2, 1, 4, 2, 128, 128, 128, 0, [333]),
    ("frag-mha-8bit-d32-partial", 8, 2, 2, 2, 32, 32, 32, 1, [70, 161]),
    ("frag-gqa-8bit-d128-group256", 8, 1, 8, 1, 128, 256, 256, 0, [517]),
    # 3-bit: the 2-bit plane's bytes and the 1-bit plane's nibbles (slices of 16, 32 and 64 channels)
    ("frag-gqa-3bit-d64", 3, 1, 4, 1, 64, 64, 64, 0, [259]),
    ("frag-gqa-3bit-d128-sinks", 3, 2, 8, 2, 128, 128, 128, 2, [5, 333]),
    ("frag-gqa-9/3-3bit-d256-odd", 3, 1, 9, 3, 256, 256, 256, 0, [389]),
    # a group of 8 at 3-bit sums the score's constant a slice at a time (`decode_kivi_frag.reduce_once`)
    ("frag-gqa-8/1-3bit-d128", 3, 1, 8, 1, 128, 128, 128, 0, [291]),
]


def _same_math_dtype(path: str, dtype: torch.dtype) -> torch.dtype:
    """The precision of the reference a kernel's error is held to (twice that reference's own error against
    fp64): the kernel's input dtype, except the fragment kernel's, which is held to fp16 math everywhere. Its
    codes come out of the unpack with a power-of-two offset of up to 1024 (`decode_kivi_frag.code_offset`) that
    the scores and accumulators subtract once per group and per program: in fp32 that cancellation leaves about
    2**-14 of the query-scale sum (10 of fp32's 24 bits), fp16-class accuracy, which is what the kernel computes
    at on a GPU (fp16 operands)."""
    return torch.float16 if path == "frag" or dtype != torch.float32 else torch.float32


@pytest.mark.parametrize("container", [8, 16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_frag_at_either_container_width(bits, container, device, dtype, monkeypatch):
    """FRAG_CONTAINER_BITS 8 or 16 (the default is one of them per width): the same attention as the fp64
    reference."""
    from kvq_kernels import decode_kivi as dk

    monkeypatch.setitem(dk.FRAG_CONTAINER_BITS, bits, container)
    d = 128 if (bits, container) == (2, 16) else 64  # 2-bit in 16-bit containers: slices of head_dim / 8
    c = random_cache(2, 2, d, 400, bits, d, d, 2, [7, 301], device, seed=5)
    q = torch.randn(2, 8, d, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    ref = decode_kivi_reference(q, c)
    same_math = decode_kivi_reference(q, c, dtype=_same_math_dtype("frag", dtype))
    out = decode_kivi(q, c, splits=2, block_n=16, path="frag")
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * (same_math.double() - ref).abs().max().item() + 1e-6, err


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_frag_prefetch_changes_no_bit(bits, device, dtype):
    """prefetch=True loads each tile's value scales and zeros a tile ahead: the same values into the same
    arithmetic, so the output is bit-identical to prefetch=False (several tiles a split, a partial last tile)."""
    d = 128 if bits == 3 else 64
    c = random_cache(2, 2, d, 400, bits, d, d, 2, [7, 301], device, seed=8)
    q = torch.randn(2, 8, d, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    on = decode_kivi(q, c, splits=2, block_n=16, num_warps=4, path="frag", prefetch=True)
    off = decode_kivi(q, c, splits=2, block_n=16, num_warps=4, path="frag", prefetch=False)
    assert torch.isfinite(on).all() and torch.equal(on, off)


@pytest.mark.parametrize(
    "warps,prefetch,expected", [(4, True, True), (8, True, True), (2, True, False), (4, False, False)]
)
def test_frag_prefetches_on_launches_of_four_warps_or_more(warps, prefetch, expected):
    """The fragment kernel prefetches only where it was measured faster (FRAG_PREFETCH_MIN_WARPS)."""
    from kvq_kernels.combine import alloc_partials
    from kvq_kernels.decode_kivi import LaunchPlan, kernel_call

    c = random_cache(1, 2, 64, 64, 4, 64, 64, 0, [40], "cpu")
    plan = LaunchPlan("frag", 64, warps, 2, 1, 64, 1, 0)
    _, _, kw = kernel_call(plan, torch.zeros(1, 8, 64), c, 1.0, alloc_partials(8, 2, 64, "cpu"), prefetch, True)
    assert kw["PREFETCH"] is expected


PATH_CASES = (
    [(*c, p) for c in CASES for p in ("tc", "slice")]
    + [(*c, "simt") for c in MHA_CASES]
    + [(*c, "frag") for c in FRAG_CASES]
)


@pytest.mark.parametrize(
    "name,bits,b,hq,hkv,d,group,res,sinks,lens,path", PATH_CASES, ids=[f"{c[0]}-{c[-1]}" for c in PATH_CASES]
)
def test_equals_attention_over_kvq_core_dequantized_cache(
    name, bits, b, hq, hkv, d, group, res, sinks, lens, path, device, dtype
):
    nuq = name.startswith("nuq") or "nuq" in name
    c = random_cache(b, hkv, d, 2 * max(lens) + 64, bits, group, res, sinks, lens, device, nuq=nuq)
    q = torch.randn(b, hq, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ref = decode_kivi_reference(q, c)  # fp64 over kvq_core.quant.dequantize(unpack(codes))
    same_math = decode_kivi_reference(q, c, dtype=_same_math_dtype(path, dtype))
    out = decode_kivi(q, c, splits=2, block_n=16, path=path)
    err = (out.double() - ref).abs().max().item()
    base = (same_math.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-6, (err, base)  # atol 1e-6: ~8 fp32 ulps of outputs of order 1
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("path", ["tc", "slice"])
def test_three_bit_at_head_dim_16(path, device):
    """The 1-bit plane of a 16-channel row pairs nibbles 8 channels apart (`packed.pair_span`); fp32 q, which
    head_dim 16 needs on the tensor-core paths."""
    c = random_cache(2, 2, 16, 200, 3, 16, 32, 1, [9, 140], device)
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2)).to(device, torch.float32)
    ref = decode_kivi_reference(q, c)
    out = decode_kivi(q, c, splits=2, block_n=16, path=path)
    assert (out.double() - ref).abs().max().item() <= 1e-4


def test_bad_inputs_raise_before_launch(device, dtype):
    c = random_cache(1, 2, 32, 64, 4, 16, 32, 0, [40], device)
    q = torch.randn(1, 3, 32, device=device, dtype=dtype)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_kivi(q, c)
    q = torch.randn(1, 4, 32, device=device, dtype=dtype)
    c.lens.fill_(c.capacity + 1)
    with pytest.raises(ValueError, match="capacity"):
        decode_kivi(q, c)
    c.lens.fill_(40)
    c.k_scale = c.k_scale.float()
    with pytest.raises(ValueError, match="k_scale"):
        decode_kivi(q, c)
    c.k_scale = c.k_scale.half()
    c.v_codes = c.v_codes[:, :, :, :-1]
    with pytest.raises(ValueError, match="v_codes"):
        decode_kivi(q, c)
    q = torch.randn(1, 4, 32, device=device, dtype=dtype)
    with pytest.raises(ValueError, match="one query head per KV head"):
        decode_kivi(q, random_cache(1, 2, 32, 64, 4, 16, 32, 0, [40], device), path="simt")
    with pytest.raises(ValueError, match="path must be"):
        decode_kivi(q, random_cache(1, 2, 32, 64, 4, 16, 32, 0, [40], device), path="fast")
    with pytest.raises(ValueError, match=r"path='frag' needs .* group_size >= head_dim"):
        decode_kivi(q, random_cache(1, 2, 32, 64, 4, 16, 32, 0, [40], device), path="frag")  # group 16 < 32
    with pytest.raises(ValueError, match=r"path='frag' needs uniform 2/3/4/8-bit .* >= 16 channels"):
        decode_kivi(q, random_cache(1, 2, 32, 64, 3, 32, 32, 0, [40], device), path="frag")  # 3-bit: 4 channels
    with pytest.raises(ValueError, match=r"path='frag' needs uniform"):
        decode_kivi(q, random_cache(1, 2, 32, 64, 4, 32, 32, 0, [40], device, nuq=True), path="frag")


# 3-bit (two planes a row, the slowest under the interpreter) runs these non-default variants under `make test-slow`;
# its default loop is checked in `make test` by test_equals_attention_over_kvq_core_dequantized_cache (simt cases)
@pytest.mark.parametrize("prefetch,defer", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("bits,group", [(4, 16), pytest.param(3, 32, marks=pytest.mark.slow), (2, 64)])
def test_simt_variants_agree_with_reference(prefetch, defer, bits, group, device, dtype):
    """The CUDA-core kernel's loop variants (register prefetch, deferred token sums) compute the same attention."""
    c = random_cache(2, 2, 64, 400, bits, group, 64, 1, [5, 333], device, seed=3)
    q = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    ref = decode_kivi_reference(q, c)
    same_math = decode_kivi_reference(q, c, dtype=torch.float32 if dtype == torch.float32 else torch.float16)
    out = decode_kivi(q, c, splits=3, block_n=16, path="simt", prefetch=prefetch, defer=defer)
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * (same_math.double() - ref).abs().max().item() + 1e-6


def test_launch_config_defaults():
    """The channel-slice defaults are the tuned table (decode_kivi.TC_BLOCK_N / TC_WARPS_STAGES), the word kernel's
    WORDS_CONFIG, the CUDA-core ones SIMT_CONFIG's per bit width; BLOCK_N halves until it divides the group."""
    from kvq_kernels.decode_kivi import WORDS_CONFIG, launch_config

    assert [launch_config("slice", b, 128) for b in (2, 3, 4, 8)] == [(128, 4, 1), (32, 2, 2), (128, 4, 1), (128, 4, 1)]
    assert launch_config("slice", 4, 64) == (64, 4, 2)
    assert launch_config("slice", 2, 32) == (32, 2, 2)  # KIVI's default group of 32
    assert launch_config("slice", 4, 96) == (32, 2, 2)  # 128 and 64 do not divide 96
    assert [launch_config("simt", b, 128) for b in (2, 3, 4, 8)] == [(64, 4, 1), (32, 2, 1), (32, 2, 1), (32, 4, 1)]
    assert launch_config("simt", 2, 32) == (32, 4, 1)  # BLOCK_N halves to the group
    assert [launch_config("tc", b, 128) for b in (2, 3, 4, 8)] == [WORDS_CONFIG] * 4
    assert launch_config("tc", 2, 16)[0] == 16
    assert launch_config("tc", 4, 64)[0] == 64


def test_default_launch_matches_explicit_config(device, dtype):
    """Leaving block_n / num_warps / num_stages to the defaults gives the same output as passing them."""
    from kvq_kernels.decode_kivi import launch_config

    c = random_cache(2, 2, 64, 128, 2, 32, 32, 0, [70, 100], device)
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    bn, warps, stages = launch_config("slice", 2, 32)  # a short cache: `auto` takes the slice kernel
    out = decode_kivi(q, c, splits=2)
    ref = decode_kivi(q, c, splits=2, block_n=bn, num_warps=warps, num_stages=stages, path="slice")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_auto_path_by_cache_length(device, dtype, bits, monkeypatch):
    """GQA with uniform codes: `auto` runs the slice kernel for 2/4-bit up to SLICE_MAX_TOKENS tokens of max_len
    and the word kernel beyond it; 3/8-bit always the word kernel. Same output bit for bit as the named path."""
    from kvq_kernels import decode_kivi as dk

    monkeypatch.setattr(dk, "SLICE_MAX_TOKENS", 64)
    c = random_cache(2, 2, 64, 128, bits, 32, 32, 0, [45, 64], device)
    assert c.quant_capacity > 64
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    for max_len in (64, None):  # None: the quantized capacity
        out = decode_kivi(q, c, splits=2, max_len=max_len)
        named = "slice" if max_len is not None and bits in (2, 4) else "tc"
        bn, warps, stages = dk.launch_config(named, bits, 32)
        ref = decode_kivi(q, c, splits=2, max_len=max_len, path=named, block_n=bn, num_warps=warps, num_stages=stages)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_frag_reduces_the_score_constant_once_where_that_was_measured_faster():
    """GQA sums the slices' shares of the score's constant before one reduction; MHA and 3-bit at groups above 4
    reduce a slice at a time (reduce_once's measurements); the cases above run both kinds."""
    from kvq_kernels.decode_kivi_frag import reduce_once

    assert [reduce_once(b, g) for b in (2, 4, 8) for g in (1, 2, 4, 7, 8)] == [False, True, True, True, True] * 3
    assert [reduce_once(3, g) for g in (1, 2, 3, 4, 5, 8)] == [False, True, True, True, False, False]
    kinds = {reduce_once(c[1], c[3] // c[4]) for c in FRAG_CASES}
    assert kinds == {True, False}
