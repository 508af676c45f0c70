"""The launch config a default-config sweep records per point is the one decode_kivi's auto dispatch runs."""

import pytest

from kvq_kernels import benchmarking
from kvq_kernels.benchmarking import AUTO_CONFIG, config_name, resolved_config
from kvq_kernels.decode_kivi import (
    FRAG_CONFIG,
    FRAG_FEW_CONFIG,
    FRAG_FEW_MAX_TOKENS,
    FRAG_SHORT_CONFIG,
    FRAG_SHORT_TOKENS,
    FRAG_SMALL_CONFIG,
    FRAG_SMALL_TOKENS,
    SIMT_CONFIG,
    SLICE_MAX_TOKENS,
    WORDS_CONFIG,
    kernel_path,
    launch_config,
)


def test_auto_resolves_per_point():
    # few rows (batch 2 x 8 heads at most) of at most FRAG_FEW_MAX_TOKENS: the few-rows launch, short or not
    assert resolved_config(AUTO_CONFIG, 4, 1, 32, 8, 1024, 128) == ("frag", *FRAG_FEW_CONFIG[4], True)
    assert resolved_config(AUTO_CONFIG, 2, 2, 32, 8, FRAG_FEW_MAX_TOKENS, 128) == ("frag", *FRAG_FEW_CONFIG[2], True)
    # 3-bit: the short launch up to 8K, from there its FRAG_CONFIG
    assert resolved_config(AUTO_CONFIG, 3, 1, 32, 8, 1024, 128) == ("frag", *FRAG_SHORT_CONFIG[3], True)
    assert resolved_config(AUTO_CONFIG, 3, 1, 32, 8, 16384, 128) == ("frag", *FRAG_CONFIG[3], True)
    # one token more rounds the random cache up a whole 128-token block past the threshold; a third sequence is
    # past FRAG_FEW_ROWS (3 x 8 rows of 1K: a small launch)
    assert resolved_config(AUTO_CONFIG, 2, 2, 32, 8, FRAG_FEW_MAX_TOKENS + 1, 128) == ("frag", *FRAG_CONFIG[2], True)
    assert resolved_config(AUTO_CONFIG, 4, 3, 32, 8, 1024, 128) == ("frag", *FRAG_SMALL_CONFIG[4], True)
    assert resolved_config(AUTO_CONFIG, 4, 1, 32, 8, 131072, 128) == ("frag", 64, 1, 3, True)
    assert resolved_config(AUTO_CONFIG, 3, 256, 32, 8, 1024, 128) == ("frag", *FRAG_CONFIG[3], True)
    assert resolved_config(AUTO_CONFIG, 8, 1, 32, 8, 1024, 128) == ("frag", 64, 4, 3, True)  # 8-bit: one launch
    # value groups narrower than head_dim: no fragment kernel; slices for short 2/4-bit caches, else words
    assert resolved_config(AUTO_CONFIG, 4, 1, 32, 8, SLICE_MAX_TOKENS, 64) == ("slice", 64, 4, 2, True)
    assert resolved_config(AUTO_CONFIG, 4, 1, 32, 8, SLICE_MAX_TOKENS + 1, 64) == ("tc", 64, *WORDS_CONFIG[1:], True)
    assert resolved_config(AUTO_CONFIG, 3, 1, 32, 8, 1024, 64) == ("tc", 64, *WORDS_CONFIG[1:], True)
    assert resolved_config(AUTO_CONFIG, 8, 1, 32, 8, 1024, 64) == ("tc", 64, *WORDS_CONFIG[1:], True)
    assert config_name(resolved_config(AUTO_CONFIG, 4, 1, 32, 8, 131072, 128)) == "frag-bn64-w1-s3"


def test_mha_takes_the_fragment_kernel_where_it_applies():
    for bits in (2, 3, 4, 8):
        for batch, context in ((1, 131072), (8, 32768), (256, 1024)):
            assert resolved_config(AUTO_CONFIG, bits, batch, 32, 32, context, 128) == ("frag", *FRAG_CONFIG[bits], True)
        # 32 rows of 1K tokens: a small launch (8-bit has one launch)
        small = FRAG_SMALL_CONFIG.get(bits, FRAG_CONFIG[bits])
        assert resolved_config(AUTO_CONFIG, bits, 1, 32, 32, 1024, 128) == ("frag", *small, True)
    # where the fragment kernel does not apply (value groups narrower than head_dim, nuq codebooks): CUDA cores
    assert resolved_config(AUTO_CONFIG, 8, 1, 32, 32, 1024, 64) == ("simt", *SIMT_CONFIG[8], True)
    assert resolved_config(AUTO_CONFIG, 2, 1, 32, 32, 131072, 64)[0] == "simt"
    assert kernel_path("auto", 4, 32, 32, 128, True, 1024, 128) == "simt"
    assert config_name(resolved_config(AUTO_CONFIG, 4, 1, 32, 32, 16384, 64)) == "simt-bn32-w2-s1-pf"


def test_unknown_rows_or_length_count_as_many():
    assert launch_config("frag", 4, 128, None, 1024) == launch_config("frag", 4, 128, 17, 32768) == FRAG_CONFIG[4]
    assert launch_config("frag", 4, 128, 1, None) == FRAG_CONFIG[4]
    assert launch_config("frag", 4, 128) == FRAG_CONFIG[4]


def test_frag_launch_by_rows_and_length():
    assert launch_config("frag", 4, 128, 16, FRAG_FEW_MAX_TOKENS) == FRAG_FEW_CONFIG[4] == (128, 4, 2)
    assert launch_config("frag", 4, 128, 17, FRAG_FEW_MAX_TOKENS) == FRAG_CONFIG[4] == (64, 1, 3)
    assert launch_config("frag", 4, 128, 16, FRAG_FEW_MAX_TOKENS + 1) == FRAG_CONFIG[4]
    assert launch_config("frag", 3, 128, 1, 1024) == FRAG_SHORT_CONFIG[3]
    assert launch_config("frag", 3, 128, 1, 8193) == FRAG_CONFIG[3] == (64, 1, 2)
    assert launch_config("frag", 8, 128, 17, 1024) == FRAG_CONFIG[8]  # 8-bit: one launch
    assert launch_config("frag", 8, 128, 1, 1024) == FRAG_CONFIG[8]
    assert launch_config("frag", 2, 128, 16, 1024) == FRAG_FEW_CONFIG[2]
    assert launch_config("frag", 4, 256, 1, 1024)[0] == 128  # the few-rows launch's 128 within a group of 256
    assert launch_config("frag", 4, 32, 1) == (32, 1, 3)  # BLOCK_N halves to the group


def test_launches_of_few_tokens_in_all_that_are_not_few_rows_take_the_small_launch():
    assert FRAG_SMALL_TOKENS == 131072 and FRAG_SMALL_CONFIG[4] == (128, 2, 2)
    for bits in (2, 3, 4):
        assert launch_config("frag", bits, 128, 32, 4096) == FRAG_SMALL_CONFIG[bits]  # MHA 1 x 4K
        assert launch_config("frag", bits, 128, 32, 4097) == FRAG_CONFIG[bits]
        assert launch_config("frag", bits, 128, 17, 7710) == FRAG_SMALL_CONFIG[bits]
        assert launch_config("frag", bits, 128, 256, 4096) == FRAG_CONFIG[bits]  # GQA 32 x 4K
    assert launch_config("frag", 8, 128, 32, 4096) == FRAG_CONFIG[8]


def test_few_rows_of_a_short_cache_take_the_short_launch():
    lo, hi = FRAG_SHORT_TOKENS[4]
    assert FRAG_SHORT_CONFIG[4] == FRAG_SHORT_CONFIG[2] == (64, 4, 3) and lo < 4096 and hi == 16384
    assert FRAG_SHORT_TOKENS[2] == FRAG_SHORT_TOKENS[4]
    assert FRAG_SHORT_TOKENS.keys() == FRAG_SHORT_CONFIG.keys()
    for bits in (2, 4):
        assert launch_config("frag", bits, 128, 8, 4096) == FRAG_SHORT_CONFIG[bits]
        assert launch_config("frag", bits, 128, 16, hi) == FRAG_SHORT_CONFIG[bits]
        assert launch_config("frag", bits, 128, 1, lo + 1) == FRAG_SHORT_CONFIG[bits]
        assert launch_config("frag", bits, 128, 8, lo) == FRAG_FEW_CONFIG[bits]  # 1K: the few-rows launch
        assert launch_config("frag", bits, 128, 8, hi + 1) == FRAG_FEW_CONFIG[bits]
        assert launch_config("frag", bits, 128, 17, 4096) == FRAG_SMALL_CONFIG[bits]  # not few rows: small
        assert launch_config("frag", bits, 128, 64, 4096) == FRAG_CONFIG[bits]
    # 3-bit: the short launch over every few-rows cache up to 8K, no few-rows launch of its own
    assert FRAG_SHORT_TOKENS[3] == (0, 8192)
    for tokens in (1, 1024, 4096, 8192):
        assert launch_config("frag", 3, 128, 8, tokens) == FRAG_SHORT_CONFIG[3]
    assert launch_config("frag", 3, 128, 8, 8193) == launch_config("frag", 3, 128, 8, 32768) == FRAG_CONFIG[3]
    assert launch_config("frag", 8, 128, 8, 4096) == FRAG_CONFIG[8]
    assert launch_config("frag", 4, 32, 8, 4096) == (32, 4, 3)  # BLOCK_N halves to the group
    # the benchmark's random caches round up to 128-token blocks: 4K at batch 1 is short, 1K is not
    assert resolved_config(AUTO_CONFIG, 4, 1, 32, 8, 4096, 128) == ("frag", *FRAG_SHORT_CONFIG[4], True)
    assert resolved_config(AUTO_CONFIG, 2, 2, 32, 8, 16384, 128) == ("frag", *FRAG_SHORT_CONFIG[2], True)
    assert resolved_config(AUTO_CONFIG, 4, 1, 32, 8, 1024, 128) == ("frag", *FRAG_FEW_CONFIG[4], True)


def test_named_configs_pass_through():
    cfg = ("tc", 64, 4, 1, True)
    assert resolved_config(cfg, 4, 1, 32, 8, 1024, 128) is cfg


def test_sdpa_fn_refuses_an_unknown_backend_before_allocating():
    with pytest.raises(ValueError, match="unknown SDPA backend 'flashinfer'; choose from flash, cudnn"):
        benchmarking.sdpa_fn(1, 32, 8, 4096, "flashinfer")


def test_parse_points_reads_batch_context_pairs_and_refuses_malformed_lists():
    import argparse

    assert benchmarking.parse_points("1:1024,32:4096") == [(1, 1024), (32, 4096)]
    for bad in ("1:x", "1024", "0:1024", "1:1024,", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected batch:context\[,\.\.\.\], got"):
            benchmarking.parse_points(bad)


@pytest.mark.parametrize(
    "n_regs,shared,warps,resident",
    [
        (255, 33792, 2, 4),  # registers: a warp holds 8,192 (255 * 32 rounded up to 256): 65,536 // 16,384
        (168, 61440, 4, 3),  # registers 65,536 // (4 * 5,376) = 3; shared memory 233,472 // 62,464 = 3
        (32, 100000, 4, 2),  # shared memory: 233,472 // 101,024
        (16, 0, 32, 2),  # threads: 2,048 // 1,024
        (16, 0, 1, 32),  # at most 32 blocks an SM
        (255, 0, 32, 1),  # more than the SM holds still counts as one
    ],
)
def test_occupancy_worked_cases(n_regs, shared, warps, resident):
    from kvq_kernels._launch import occupancy

    # H100 / H200 SM: 65,536 registers, 2,048 threads, 233,472 B of shared memory
    assert occupancy(n_regs, shared, warps, 65536, 2048, 233472) == resident


def test_launch_plan_covers_the_context_in_whole_tiles():
    torch = pytest.importorskip("torch")
    from kvq_kernels._launch import interpreting
    from kvq_kernels.decode_kivi import launch_plan
    from kvq_kernels.kivi_layout import allocate

    if not interpreting():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    c = allocate(2, 2, 64, 1000, 4, 32, 32, 0, device="cpu")
    q = torch.zeros(2, 4, 64)
    plan = launch_plan(q, c, validate_lens=False)
    assert plan.tokens_per_split % plan.block_n == 0
    assert (plan.splits - 1) * plan.tokens_per_split < c.quant_capacity <= plan.splits * plan.tokens_per_split
    assert plan.resident_programs == 1  # the interpreter: one program per SM
    assert launch_plan(q, c, splits=3, validate_lens=False).resident_programs == 0  # given splits: none computed


def test_plan_tag_names_resident_programs_and_splits():
    from kvq_kernels.benchmarking import plan_tag
    from kvq_kernels.decode_kivi import LaunchPlan

    assert plan_tag(LaunchPlan("frag", 128, 2, 2, 64, 2048, 4, 4)) == "-r4-sp64"
    assert plan_tag(LaunchPlan("simt", 32, 2, 1, 33, 3968, 4, 0)) == "-sp33"  # no resident count computed
