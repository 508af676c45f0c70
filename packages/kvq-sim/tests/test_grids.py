"""Launch grids the kernel cost model uses: the kvq grid runs the kernels' own split rule, FlashAttention's
heuristic on cases worked by hand, the wave-tail factor, and the YAML fields that carry them."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from kvq_core import splits
from kvq_sim import grids
from kvq_sim.configs import CONFIG_DIR
from kvq_sim.errors import SimInputError
from kvq_sim.grids import flash_split_count, launch, wave_factor
from kvq_sim.hardware import calibration_fit_path, load_hardware, read_calibration_fit


def test_kvq_grid_and_the_kernels_run_one_split_rule():
    """The cost model and the kernels' launchers call the same function (its cases: kvq-core test_splits)."""
    assert grids.split_count is splits.split_count
    pytest.importorskip("torch")
    from kvq_kernels import _launch

    assert _launch.split_count is splits.split_count


def test_kvq_grid_splits_by_the_rule():
    # GQA 32/8 at batch 8, 16K tokens of BLOCK_N 64 on 132 SMs: 64 rows, 10 splits (kvq_core.splits example)
    gqa = launch("kvq", 8, 32, 8, 16384, 128, 132, block_tokens=64, split_waves=4, tail_programs_per_row=1)
    assert (gqa.programs, gqa.tail_programs, gqa.split) == (64 * 10, 64, True)
    one = launch("kvq", 66, 32, 8, 16384, 128, 132, block_tokens=64, split_waves=4)  # 528 rows: 4 waves
    assert (one.programs, one.split) == (528, False)


def test_flash_heuristic_by_hand():
    # rows >= 0.8 * slots: no split
    assert flash_split_count(256, 264, 128) == 1
    # 8 rows, 128 blocks: fill 8s/264; s = 26..31 are not eligible or < 0.85 of the best (s = 33: 1.0);
    # s = 32 (ceil(128/32) = 4 != ceil(128/31) = 5) fills 256/264 = 0.97
    assert flash_split_count(8, 264, 128) == 32
    # 32 rows: the best eligible fill is 0.97 (s = 8, 16, 32), so anything >= 0.824 qualifies:
    # s = 6 fills 192/264 = 0.727, s = 7 fills 224/264 = 0.848
    assert flash_split_count(32, 264, 128) == 7
    assert flash_split_count(32, 264, 3) == 3  # never more splits than blocks


def test_launch_and_wave_factor():
    mha = launch("kvq-nofill", 1, 32, 32, 131072, 128, 132, block_tokens=64, split_waves=8, tail_programs_per_row=4)
    s = splits.split_count(32, 131072 // 64, 132, 8, fill=False)
    assert s == 33  # ceil(8 * 132 / 32)
    assert (mha.programs, mha.tail_programs, mha.split) == (32 * s, 32 * 4, True)
    fl = launch("flash", 8, 32, 8, 16384, 128, 132)  # q heads of a KV head packed into one M block
    assert (fl.programs, fl.split) == (64 * flash_split_count(64, 264, 128), True)
    assert launch("", 2, 32, 8, 100, 128, 132).programs == 16
    assert wave_factor(576, 132, 1) == pytest.approx(5 / (576 / 132))
    assert wave_factor(264, 132, 2) == 1.0 and wave_factor(577, 132, 0) == 1.0
    assert math.isclose(wave_factor(1, 132, 1), 132.0)


def _h100_fit_with(tmp_path, family_fields: dict, drop: str = "") -> Path:
    """The H100's fit file with the first kernel family's fields changed, written to tmp_path."""
    fit = read_calibration_fit(calibration_fit_path(CONFIG_DIR / "hardware" / "h100-80g.yaml"))
    family = next(iter(fit["attention_kernels"].values()))
    family.update(family_fields)
    family.pop(drop, None)
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(fit))
    return path


def test_yaml_grid_fields_are_checked(tmp_path):
    with pytest.raises(SimInputError, match=r"'calibration.attention_kernels.kvq_fp16.grid' must be one of"):
        load_hardware("h100-80g", calibration_fit=_h100_fit_with(tmp_path, {"grid": "bogus"}))
    with pytest.raises(SimInputError, match=r"missing field 'calibration.attention_kernels.kvq_fp16.block_tokens'"):
        load_hardware("h100-80g", calibration_fit=_h100_fit_with(tmp_path, {"grid": "kvq"}, drop="block_tokens"))
    with pytest.raises(SimInputError, match=r"nosplit_bandwidth_efficiency' must be a number"):
        load_hardware("h100-80g", calibration_fit=_h100_fit_with(tmp_path, {"nosplit_bandwidth_efficiency": 1.5}))
    for bad in (-1.0, float("nan"), "x"):
        for key in ("split_overhead_us", "split_us_per_split"):
            with pytest.raises(SimInputError, match=rf"{key}' must be a number"):
                load_hardware("h100-80g", calibration_fit=_h100_fit_with(tmp_path, {key: bad}))
    with pytest.raises(SimInputError, match=r"h100-80g\.yaml \(calibration from .*fit\.yaml\): field 'calibration\."):
        load_hardware("h100-80g", calibration_fit=_h100_fit_with(tmp_path, {"bandwidth_efficiency": 1.5}))
    hw = load_hardware(
        "h100-80g", calibration_fit=_h100_fit_with(tmp_path, {"split_overhead_us": 3.5, "split_us_per_split": 0.25})
    )
    k = hw.calibration.attention_kernels[0]
    assert (k.split_overhead_us, k.split_us_per_split) == (3.5, 0.25)


def test_kvq_grid_gives_the_splits_every_tensor_core_launch_of_the_h200_sweep_ran():
    """Each packed tensor-core row of the H200 sweep (GQA, and MHA on the fragment kernel) and each kvq fp16 row
    records its launch (BLOCK_N, resident programs per SM, splits: e.g. frag-bn128-w2-s2-r4-sp64,
    bn64-w4-s3-r2-sp33); the cost model's grid, given the tag's BLOCK_N and resident count, runs as many."""
    import pandas as pd

    csv = Path(__file__).resolve().parents[3] / "reports/measurements/kernel_decode_h200_v12.csv"
    rows = pd.read_csv(csv, comment="#")
    rows = rows[rows.config.fillna("").str.contains(r"-r\d+-sp\d+")]
    assert len(rows) >= 150 and (rows.impl == "kvq_fp16").sum() == 66
    for r in rows.itertuples():
        bn, resident, sp = (int(x) for x in re.search(r"bn(\d+).*-r(\d+)-sp(\d+)", r.config).groups())
        lg = launch("kvq", r.batch, r.q_heads, r.kv_heads, r.context, r.head_dim, 132, bn, 4, 4, resident)
        assert lg.programs == r.batch * r.kv_heads * sp, (r.config, r.batch, r.context)
