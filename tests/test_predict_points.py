"""scripts/predict_points.py compare: errors of committed predictions against a measured sweep, per family."""

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import predict_points  # noqa: E402

from kvq_sim.hardware import load_hardware  # noqa: E402
from kvq_sim.measurements import read_e2e_csv, read_kernel_csv  # noqa: E402
from kvq_sim.multigpu import predict, read_steps  # noqa: E402

KERNEL = ROOT / "reports/measurements/kernel_decode_h200.csv"
E2E = ROOT / "reports/measurements/e2e_decode_h200.csv"


def _predictions(tmp_path, kernel_factor, e2e_factor, skip_family=None):
    rows = [
        dict(kind="kernel", point_id=p.point_id, family=p.family, predicted_us=p.time_us * kernel_factor)
        for p in read_kernel_csv(KERNEL, "NVIDIA H200")[0]
        if p.family != skip_family
    ]
    rows += [
        dict(kind="e2e", point_id=p.point_id, family="e2e", predicted_us=p.step_us * e2e_factor)
        for p in read_e2e_csv(E2E, "NVIDIA H200")[0]
    ]
    path = tmp_path / "pred.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_compare_reports_signed_mape_and_median_per_family_and_steps(tmp_path):
    out = predict_points.compare(str(_predictions(tmp_path, 1.1, 0.8)), str(KERNEL), {"kvq_kivi_3b_mha"}, str(E2E))
    assert "kvq_kivi_2b_gqa" in out and "e2e " in out
    assert "unchanged kernels: " in out and "MAPE 10.00%, signed +10.00%, median |error| 10.00%, worst 10.00%" in out
    assert "decode steps: 30 points, MAPE 20.00%, signed -20.00%, median |error| 20.00%, worst 20.00%" in out


def test_compare_counts_only_points_that_were_predicted(tmp_path):
    out = predict_points.compare(str(_predictions(tmp_path, 1.0, 1.0, "sdpa_flash_fp16")), str(KERNEL), set())
    n = sum(1 for p in read_kernel_csv(KERNEL, "NVIDIA H200")[0] if p.family != "sdpa_flash_fp16")
    assert out.splitlines()[0] == f"{n} measured points with a prediction (NVIDIA H200)"
    assert "sdpa_flash_fp16" not in out and "decode steps" not in out


MULTIGPU = ROOT / "reports/measurements/multigpu_decode_h100.csv"


def test_multigpu_grid_names_the_benchmarks_points_and_costs_them_as_validate_does():
    rows = pd.DataFrame(predict_points.multigpu_rows("8x-h100")).set_index("point_id")
    assert len(rows) == 2 * 5 * 3 * 3 * 3 and rows.index.is_unique
    hw = load_hardware("8x-h100")
    measured = read_steps(MULTIGPU)[0]
    for p in measured[::20]:
        assert rows.loc[p.point_id, "bench_step_us"] == round(predict(hw, p), 2)
    # another node: its 1-GPU points are costed on its single GPU (the node's base), its TP points with collectives
    h200 = pd.DataFrame(predict_points.multigpu_rows("8x-h200")).set_index("point_id")
    assert h200.loc["multigpu|llama-7b|tp1|fp16|1|4096", "interconnect_us"] == 0
    assert h200.loc["multigpu|llama-7b|tp2|fp16|1|4096", "interconnect_us"] > 0
    assert (h200.calibration == "calibrated").all()


def test_compare_multigpu_reports_error_per_layout_and_model(tmp_path):
    points = read_steps(MULTIGPU)[0]
    path = tmp_path / "pred.csv"
    pd.DataFrame(
        [dict(point_id=p.point_id, bench_step_us=p.step_us * (1.2 if p.parallel == "cp" else 1.0)) for p in points]
    ).to_csv(path, index=False)
    out = predict_points.compare_multigpu(str(path), str(MULTIGPU))
    assert out.splitlines()[0] == f"{len(points)} measured steps with a prediction (NVIDIA H100 80GB HBM3)"
    cp = [line for line in out.splitlines() if line.startswith("cp")]
    tp = [line for line in out.splitlines() if line.startswith("tp")]
    assert cp and all(line.split()[-2:] == ["20.00", "+20.00"] for line in cp)
    assert tp and all(line.split()[-2:] == ["0.00", "+0.00"] for line in tp)


def test_multigpu_plan_takes_models_and_layouts_and_refuses_unknown_ones(tmp_path, capsys):
    out = tmp_path / "pred.csv"
    args = ["multigpu", "--node", "8x-h200", "--models", "llama-3-8b", "--layouts", "tp1", "-o", str(out)]
    assert predict_points.main(args) == 0
    rows = pd.read_csv(out)
    assert len(rows) == 3 * 3 * 3 and set(rows.model) == {"llama-3-8b"} and set(rows.gpus) == {1}
    assert predict_points.main(args) == 2  # written once: an existing file is never overwritten
    for flag, value, message in (
        ("--models", "llama-9b", "unknown model 'llama-9b'"),
        ("--layouts", "tp3", "unknown layout(s) tp3; valid: tp1, tp2, tp4, cp2, cp4"),
    ):
        bad = [a if a != {"--models": "llama-3-8b", "--layouts": "tp1"}[flag] else value for a in args]
        bad[-1] = str(tmp_path / "other.csv")
        assert predict_points.main(bad) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "other.csv").exists()


H200_V16 = ROOT / "reports/measurements/kernel_decode_h200_v16.csv"


def test_kernel_grid_names_a_sweeps_points_with_its_bytes_and_costs_them_as_validate_does():
    """Every point of the kernels plan is one bench_decode.py records, under the same id and with the same bytes
    (a byte count off by one changes the predicted time, so equality with validate's prediction checks both)."""
    import pytest

    from kvq_sim.validate import predict_kernel

    rows = predict_points.kernel_grid_rows("h200", [(32, 8), (32, 32)], [1, 8], [4096, 131072], [16, 4, 3], 128)
    assert len(rows) == 2 * 2 * 2 * (2 + 1 + 1)
    measured = {p.point_id: p for p in read_kernel_csv(H200_V16, "NVIDIA H200")[0]}
    hw = load_hardware("h200")
    for r in rows:
        p = measured[r["point_id"]]
        assert r["family"] == p.family and r["predicted_us"] == pytest.approx(predict_kernel(hw, p), rel=1e-12)


def test_kernels_plan_refuses_bad_grids_in_one_line(tmp_path, capsys):
    out = tmp_path / "pred.csv"
    args = ["kernels", "--gpu", "h200", "--heads", "28/4", "--batches", "2", "--contexts", "5000", "-o", str(out)]
    assert predict_points.main(args) == 0
    rows = pd.read_csv(out)
    assert len(rows) == 6 and set(rows.family) == {
        "sdpa_flash_fp16", "kvq_fp16", "kvq_kivi_8b_gqa", "kvq_kivi_4b_gqa", "kvq_kivi_3b_gqa", "kvq_kivi_2b_gqa"
    }  # fmt: skip
    assert (rows.predicted_us > 0).all() and rows.point_id.str.endswith("|2|28|4|128|5000").all()
    for flag, value, message in (
        ("--heads", "32/5", "query heads a multiple of kv heads, got '32/5'"),
        ("--heads", "x/4", "got 'x/4'"),
        ("--batches", "0", "--batches must be comma-separated integers >= 1"),
        ("--contexts", "4k", "--contexts must be comma-separated integers >= 1"),
        ("--gpu", "h999", "unknown GPU 'h999'"),
    ):
        bad = list(args)
        bad[bad.index(flag) + 1], bad[-1] = value, str(tmp_path / "other.csv")
        assert predict_points.main(bad) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "other.csv").exists()
    assert predict_points.main([*args[:-1], str(out)]) == 2  # an existing file is never overwritten
