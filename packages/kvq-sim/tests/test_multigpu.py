"""Multi-GPU collective fits: recovered exactly from steps synthesized with known costs, read from a CSV with
every row checked, and applied by the planner only to the layout they were measured on."""

import csv
import dataclasses

import pytest

from kvq_sim import api
from kvq_sim.errors import SimInputError
from kvq_sim.hardware import CollectiveFit, load_hardware
from kvq_sim.latency import collective_seconds, collective_terms, decode_step
from kvq_sim.measurements import is_training
from kvq_sim.multigpu import COLUMNS, StepPoint, fit, held_out_errors, predict, read_steps, terms

NODE = "8x-h100"
TRUE = {"tp2": (1.10, 25.0, 120.0), "tp4": (1.25, 31.0, 90.0), "cp2": (1.05, 40.0, 60.0)}  # scale, us, GB/s


def _points():
    out = []
    for layout in TRUE:
        parallel, gpus = layout[:2], int(layout[2:])
        for model in ("llama-7b", "llama-2-70b"):
            for batch in (1, 8, 64):
                for context in (4096, 32768):
                    for kv in ("fp16", "kivi4", "kivi2"):
                        out.append(StepPoint(model, parallel, gpus, batch, context, kv, 0.0))
    return out


def _synthesized(hw):
    pts = []
    for p in _points():
        base, calls, nbytes = terms(hw, p)
        scale, lat, bw = TRUE[p.layout]
        pts.append(dataclasses.replace(p, step_us=scale * base + calls * lat + nbytes / (bw * 1e3)))
    return pts


def test_fit_recovers_known_costs():
    hw = load_hardware(NODE)
    fits = {f.layout: f for f in fit(hw, _synthesized(hw))}
    assert set(fits) == set(TRUE)
    for layout, (scale, lat, bw) in TRUE.items():
        f = fits[layout]
        assert (f.shard_scale, f.latency_us, f.bandwidth_gb_s) == pytest.approx((scale, lat, bw), rel=1e-6)
        assert f.mape_pct < 1e-6


def test_fitted_node_predicts_held_out_points_and_reports_the_prior_error():
    hw = dataclasses.replace(load_hardware(NODE), collectives=())
    pts = _synthesized(hw)
    fitted = dataclasses.replace(hw, collectives=fit(hw, pts))
    for row in held_out_errors(hw, fitted, pts):
        assert row.fitted_mape_pct < 1e-6 and row.fitted_worst_pct < 1e-6
        assert row.prior_mape_pct > 1.0  # the 10 us / datasheet-link priors differ from the synthesized costs
    p = pts[0]
    assert predict(fitted, p) == pytest.approx(p.step_us, rel=1e-9)


def test_fit_applies_only_to_its_layout():
    hw = dataclasses.replace(load_hardware(NODE), collectives=())
    tp2 = CollectiveFit("tp2", shard_scale=1.5, latency_us=100.0, bandwidth_gb_s=50.0)
    fitted = dataclasses.replace(hw, collectives=(tp2,))
    for gpus, parallel in ((4, "tp"), (2, "cp")):
        a = decode_step(api.deployment("llama-7b", hw, bits="16", gpus=gpus, parallel=parallel), 8, 4096)
        b = decode_step(api.deployment("llama-7b", fitted, bits="16", gpus=gpus, parallel=parallel), 8, 4096)
        assert a.step_s == b.step_s
    dep = api.deployment("llama-7b", fitted, bits="16", gpus=2, parallel="tp")
    calls, nbytes = collective_terms(dep, 8)
    assert calls == 64  # two all-reduces in each of 32 layers
    assert nbytes == 64 * 2 * (1 / 2) * 8 * 4096 * 2
    assert decode_step(dep, 8, 4096).interconnect_s == pytest.approx(calls * 100e-6 + nbytes / 50e9, rel=1e-12)


def test_fit_records_its_largest_call_and_extrapolates_its_rate_beyond_it():
    hw = load_hardware(NODE)
    pts = _synthesized(hw)
    fits = {f.layout: f for f in fit(hw, pts)}
    calls_bytes = [terms(hw, p)[1:] for p in pts if p.layout == "tp2" and is_training(p.point_id)]
    assert fits["tp2"].max_call_bytes == max(b / c for c, b in calls_bytes)
    f = CollectiveFit("tp2", shard_scale=1.0, latency_us=20.0, bandwidth_gb_s=50.0, max_call_bytes=2**18)
    for per_call in (2**17, 2**20):  # within and 4x beyond the fitted calls: the fit's rate for every byte
        assert collective_seconds(f, 64, 64 * per_call) == pytest.approx(64 * (20e-6 + per_call / 50e9), rel=1e-12)
    # a fit without a per-byte cost charges its latency only
    assert collective_seconds(dataclasses.replace(f, bandwidth_gb_s=0.0), 64, 64 * 2**20) == pytest.approx(64 * 20e-6)


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)


GOOD = dict(model="llama-7b", parallel="tp", gpus=2, batch=1, context=4096, kv="fp16", mode="graph",
            step_us=5000.0, device="NVIDIA H100 80GB HBM3", commit="abc", date="2026-11-27T00:00:00Z")  # fmt: skip


def test_reads_graph_rows(tmp_path):
    p = tmp_path / "m.csv"
    _write(p, [GOOD, {**GOOD, "mode": "eager", "step_us": 9000.0}])
    pts, prov = read_steps(p)
    assert [x.step_us for x in pts] == [5000.0] and prov["device"] == "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"step_us": "nan"}, "row 2.*step_us"),
        ({"step_us": "inf"}, "row 2.*step_us"),
        ({"step_us": "-3"}, "row 2.*step_us"),
        ({"step_us": "fast"}, "row 2"),
        ({"kv": "kivi3"}, "row 2.*'kv'"),
        ({"parallel": "pp"}, "row 2.*'parallel'"),
        ({"gpus": "0"}, "row 2.*column 'gpus'"),
        ({"batch": "1.5"}, "row 2.*column 'batch'"),
        ({"context": ""}, "row 2.*column 'context'"),
        ({"mode": "eager"}, "no measured rows"),
        ({"mode": "graf"}, "row 2.*column 'mode'"),
    ],
    ids=["nan", "inf", "negative", "text", "unknown-kv", "unknown-parallel", "zero-gpus", "fractional-batch",
         "blank-context", "no-graph-rows", "unknown-mode"],
)  # fmt: skip
def test_bad_rows_are_refused_with_file_and_row(tmp_path, bad, match):
    p = tmp_path / "m.csv"
    _write(p, [{**GOOD, **bad}])
    with pytest.raises(SimInputError, match=match):
        read_steps(p)


def _write_with(path, rows, extra: tuple[str, ...]):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra])
        w.writeheader()
        w.writerows(rows)


def test_status_and_scaled_time_are_checked(tmp_path):
    p = tmp_path / "m.csv"
    _write_with(p, [{**GOOD, "status": "okay"}], ("status",))
    with pytest.raises(SimInputError, match="row 2: column 'status' must be one of ok, skipped, failed, not_run"):
        read_steps(p)
    _write_with(p, [{**GOOD, "status": "skipped", "step_us": ""}, GOOD], ("status",))
    assert len(read_steps(p)[0]) == 1  # a skipped row carries no time and is left out
    # a step over fewer layers: step_us_scaled is the model's time, and step_us must be a time too
    _write_with(p, [{**GOOD, "step_us": "nan", "step_us_scaled": "9000"}], ("step_us_scaled",))
    with pytest.raises(SimInputError, match="row 2: column 'step_us' must be a positive finite time"):
        read_steps(p)
    _write_with(p, [{**GOOD, "step_us": "4000", "step_us_scaled": "-1"}], ("step_us_scaled",))
    with pytest.raises(SimInputError, match="row 2: column 'step_us_scaled'"):
        read_steps(p)
    _write_with(p, [{**GOOD, "step_us": "4000", "step_us_scaled": "9000"}], ("step_us_scaled",))
    assert [x.step_us for x in read_steps(p)[0]] == [9000.0]


def test_a_step_measured_twice_counts_once_at_its_median(tmp_path):
    p = tmp_path / "m.csv"
    other = {**GOOD, "batch": 8, "step_us": 7000.0}
    _write(p, [GOOD, other, {**GOOD, "step_us": 5100.0}, {**GOOD, "step_us": 5300.0}])
    pts = read_steps(p)[0]
    assert [(x.batch, x.step_us) for x in pts] == [(1, 5100.0), (8, 7000.0)]
    _write(p, [GOOD, other] * 2)  # the same rows twice: the same points as once
    assert [(x.batch, x.step_us) for x in read_steps(p)[0]] == [(1, 5000.0), (8, 7000.0)]


def test_missing_column_and_bad_bytes(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("model,parallel\nllama-7b,tp\n")
    with pytest.raises(SimInputError, match="missing column"):
        read_steps(p)
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SimInputError, match="UTF-8"):
        read_steps(p)


def test_calibrate_then_validate_through_the_cli(tmp_path):
    """calibrate --multigpu writes the fit file (YAML library, beside the node YAML), the node names it, validate
    passes on the held-out half; the shipped configs are untouched (KVQ_CONFIG_DIR points at a copy)."""
    import shutil
    import subprocess
    import sys

    from kvq_sim.configs import CONFIG_DIR

    cfg = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, cfg)
    (cfg / "hardware" / "fits" / f"{NODE}-collectives.yaml").unlink()  # start from a node without a fit
    node = cfg / "hardware" / f"{NODE}.yaml"
    node.write_text("".join(ln for ln in node.read_text().splitlines(True) if not ln.startswith("collectives_fit")))
    hw = load_hardware(NODE)
    pts = _synthesized(hw)
    csv_path = tmp_path / "steps.csv"
    _write(csv_path, [{**GOOD, **dataclasses.asdict(p), "mode": "graph"} for p in pts])
    env = {**__import__("os").environ, "KVQ_CONFIG_DIR": str(cfg)}

    def sim(*args):
        return subprocess.run([sys.executable, "-m", "kvq_sim.cli", *args], env=env, capture_output=True, text=True)

    r = sim("calibrate", "--gpu", NODE, "--multigpu", str(csv_path))
    assert r.returncode == 0, r.stderr
    fit_file = cfg / "hardware" / "fits" / f"{NODE}-collectives.yaml"
    assert fit_file.is_file() and "collectives_fit" in r.stderr
    assert sim("validate", "--gpu", NODE, "--multigpu", str(csv_path)).returncode == 1  # not named yet: no fits
    node.write_text(node.read_text() + f"collectives_fit: fits/{NODE}-collectives.yaml\n")
    r = sim("validate", "--gpu", NODE, "--multigpu", str(csv_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "tp4" in r.stdout
    r = sim("calibrate", "--gpu", "h100-80g", "--multigpu", str(csv_path))
    assert r.returncode == 2 and "single GPU" in r.stderr


def test_benchmark_kivi_caches_are_costed_in_the_format_they_store():
    """The benchmark stores KIVI in groups of 128 with a 128-token fp16 window (as the single-GPU step benchmark),
    so its steps are costed with that format, not KIVI's default group of 32 (5.17 bits at 4K tokens). Hand count
    at 4,096 tokens, 4-bit: keys per channel in groups of 128 tokens, all 32 blocks quantized: 4 + 2 x 16 / 128 =
    4.25 bits; values per token, the last 128 tokens fp16: (3968 x 4.25 + 128 x 16) / 4096; K and V averaged."""
    from kvq_sim.multigpu import _deployment

    p = StepPoint("llama-7b", "tp", 1, 1, 4096, "kivi4", 1.0)
    fmt = _deployment(load_hardware(NODE), p).kv_format
    assert fmt.avg_bits(4096, 32, 128) == pytest.approx((4.25 + (3968 * 4.25 + 128 * 16) / 4096) / 2, rel=1e-12)
