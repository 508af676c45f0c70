"""The split-KV rule (kvq_core.splits.split_count) on cases worked by hand, and that it imports without torch."""

import subprocess
import sys

import pytest

from kvq_core.splits import split_count

# (programs_per_split, tiles, sms, waves, fill, splits); each worked in the comment beside it
CASES = [
    # GQA 32/8 at batch 8 on an H100: 64 programs per split, want = ceil(4 * 132 / 64) = 9 (last of 4.36
    # waves 36% busy); 10, 12, .., 18 all fill the last wave to 0.97 (10: 4.85 waves): the smallest wins
    pytest.param(64, 1024, 132, 4, True, 10, id="gqa-batch8-h100-fills-whole-waves"),
    pytest.param(64, 1024, 132, 4, False, 9, id="gqa-batch8-h100-nofill"),
    # CUDA-core MHA at batch 1, 16K tokens of BLOCK_N 32 (512 tiles), 8 waves: want = ceil(8 * 132 / 32) = 33,
    # what the kernel launches (no fill). With fill only whole-tile split sizes count: 32, 35, 37, .., 64
    # splits (16, 15, 14, .., 8 tiles each); 37 (8.97 waves, fullness 0.997) is the fullest
    pytest.param(32, 512, 132, 8, False, 33, id="mha-batch1-16k-nofill"),
    pytest.param(32, 512, 132, 8, True, 37, id="mha-batch1-16k-fill"),
    # more programs per split than waves * SMs: one split
    pytest.param(2048, 1024, 132, 4, True, 1, id="one-split-when-rows-fill-the-gpu"),
    # at most one split per tile
    pytest.param(64, 8, 132, 4, True, 8, id="capped-by-tiles"),
    pytest.param(7, 1, 132, 4, True, 1, id="one-tile"),
    # 9 tiles, want 4: a split size of ceil(9 / 4) = 3 tiles gives 3 splits of work (fullness 0.75), the
    # only other kept count, 5 (split size 2), fills its last wave to 0.625: 3
    pytest.param(1, 9, 4, 1, True, 3, id="whole-tile-split-sizes"),
    pytest.param(1, 9, 4, 1, False, 4, id="whole-tile-split-sizes-nofill"),
    # 100 tiles on 4 SMs, want 16: kept counts 15, 17, 20, 25 (split sizes 7, 6, 5, 4 tiles); 20 fills 5 waves
    pytest.param(1, 100, 4, 4, True, 20, id="kept-count-above-want"),
    # 0 programs per split counts as 1
    pytest.param(0, 100, 4, 4, True, 20, id="zero-programs-as-one"),
    # waves 0: want 0, still one split
    pytest.param(64, 1024, 132, 0, True, 1, id="zero-waves"),
    # 3 programs per split on 4 SMs, want 2: 2 and 3 splits leave the last wave 0.75 busy, 4 fill 3 waves
    pytest.param(3, 1000, 4, 1, True, 4, id="up-to-twice-want"),
]


@pytest.mark.parametrize("programs_per_split,tiles,sms,waves,fill,splits", CASES)
def test_split_count_worked_cases(programs_per_split, tiles, sms, waves, fill, splits):
    assert split_count(programs_per_split, tiles, sms, waves, fill) == splits


def test_resident_programs_fill_one_wave_first():
    # GQA 32/8 at batch 1 (8 programs per split) on 132 SMs, 2047 tiles (256K tokens of BLOCK_N 128), 4 waves:
    # want 66. Counting one program per SM, 82 splits (656 programs, 4.97 waves) fill best; with 4 resident per SM
    # (528 slots) 656 programs are 1.24 waves, and one wave comes first: at most 66 splits, whole tiles give 64
    # (512 programs, 0.97 of the slots)
    assert split_count(8, 2047, 132, 4) == 82
    assert split_count(8, 2047, 132, 4, resident=4) == 64
    assert split_count(8, 2047, 132, 4, resident=0) == 82  # resident 0 counts as 1
    # the docstring's batch-8 example with 3 resident (396 slots): at most 6 splits, 384 programs
    assert split_count(64, 1024, 132, 4, resident=3) == 6
    # 256 programs a split fill 0.65 of 396 slots in one wave: the waves rule instead (3 splits, 1.94 waves, 0.97)
    assert split_count(256, 256, 132, 4, resident=3) == 3
    # 128 tiles (8K tokens of BLOCK_N 64): one wave of whole tiles is 43 splits (344 of 396 slots, 0.87), fuller
    # than the waves rule's 128 splits (2.59 waves, last 0.86 full): 43
    assert split_count(8, 128, 132, 4, resident=3) == 43
    # more programs a split than slots: the waves rule (one split)
    assert split_count(2048, 1024, 132, 4, resident=2) == 1
    # without fill the resident count changes nothing
    assert split_count(8, 2047, 132, 4, fill=False, resident=4) == split_count(8, 2047, 132, 4, fill=False)


def test_split_count_bounds():
    for pps in (1, 3, 32, 64, 96, 1024):
        for tiles in (1, 2, 7, 97, 1024):
            for sms, waves in ((132, 4), (108, 8), (4, 4)):
                want = -(-waves * sms // pps)
                nofill = split_count(pps, tiles, sms, waves, fill=False)
                assert nofill == max(1, min(tiles, want))
                assert 1 <= split_count(pps, tiles, sms, waves) <= max(1, min(tiles, 2 * want))


def test_splits_import_without_torch():
    code = "import sys, kvq_core.splits; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]
