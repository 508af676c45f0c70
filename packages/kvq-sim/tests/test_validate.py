"""The CI gate (validate on the committed H100 measurements), fitting, the train/held-out split, bad input."""

import csv
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from kvq_sim import calibrate as cal
from kvq_sim import report_data
from kvq_sim.cli import main
from kvq_sim.configs import CONFIG_DIR
from kvq_sim.errors import SimInputError
from kvq_sim.files import backup_path
from kvq_sim.fitting import nnls
from kvq_sim.hardware import calibration_fit_path, load_hardware, transferred
from kvq_sim.latency import attention_kernel_us, decode_step, grid_terms
from kvq_sim.measurements import KernelPoint, is_training, read_kernel_csv, split

ROOT = Path(__file__).resolve().parents[3]
KERNEL_CSV = ROOT / "reports/measurements" / report_data.KERNEL_CSV
E2E_CSV = ROOT / "reports/measurements" / report_data.E2E_CSV
H100 = "NVIDIA H100 80GB HBM3"
# History of the kernel gate on the committed sweep: 7241230-dirty and ce78a59 failed (before the grid
# terms), 87d61aa passed MAPE (3.42%) but not the worst case (18.1% at batch 1, 64-256 MB). The sweep at
# 129c193 flushes L2 by reading (a write flush had added 4-9% to those launches, flush_effect_h100.csv)
# and measures three more contexts in the split-KV regime; on it the gate passes (docs/validation.md).


def _validate_args() -> list[str]:
    args = ["validate", "--gpu", "h100-80g", "--measurements", str(KERNEL_CSV)]
    return args + (["--e2e", str(E2E_CSV)] if E2E_CSV.is_file() else [])


def _kernel_commit() -> str:
    return read_kernel_csv(KERNEL_CSV, H100)[1].commit


def test_validate_passes_on_committed_measurements():
    """The CI gate: kernel, e2e and memory checks all pass on the committed H100 measurements."""
    r = CliRunner().invoke(main, _validate_args())
    assert r.exit_code == 0, r.output
    assert r.output.count("PASS ") == 3, r.output


def test_memory_validation_passes():
    """Predicted memory of every committed e2e step within 2% of max_memory_allocated (worst 0.78% when committed)."""
    r = CliRunner().invoke(main, _validate_args())
    assert "PASS memory" in r.output, r.output


def test_end_to_end_step_validation_passes():
    """The e2e decode-step check passes on the committed H100 steps (MAPE 6.16% <= 8% when committed)."""
    r = CliRunner().invoke(main, _validate_args())
    assert "PASS e2e" in r.output, r.output


def test_committed_calibration_comes_from_committed_measurements():
    """Replacing the CSV without re-running `kvq-sim calibrate` fails here, not silently."""
    hw = load_hardware("h100-80g")
    assert hw.calibration.calibrated
    assert f"(commit {_kernel_commit()}," in hw.calibration.source
    assert {p.family for p in read_kernel_csv(KERNEL_CSV, H100)[0]} == {
        k.family for k in hw.calibration.attention_kernels
    }


H200_KERNEL_CSV = ROOT / "reports/measurements/kernel_decode_h200_v16.csv"
H200_E2E_CSV = ROOT / "reports/measurements/e2e_decode_h200_v7.csv"
#: the same kernels at head layouts the main sweep lacks (32/4, 64/8, 28/4); make calibrate fits on both
H200_LAYOUTS_CSV = ROOT / "reports/measurements/kernel_decode_h200_new_heads.csv"
H200_KERNEL_ARGS = ["--measurements", str(H200_KERNEL_CSV), "--measurements", str(H200_LAYOUTS_CSV)]


def test_h200_is_calibrated_from_its_own_committed_measurements():
    """The H200 file is fitted on the H200's CSVs (not transferred), and the CSVs name the device it describes."""
    hw = load_hardware("h200")
    assert hw.calibration.calibrated and "transferred" not in hw.calibration.source
    commits = [read_kernel_csv(f, "NVIDIA H200")[1].commit for f in (H200_KERNEL_CSV, H200_LAYOUTS_CSV)]
    assert f"(commit {commits[0]} + {commits[1]}," in hw.calibration.source
    assert "e2e_decode_h200_v7.csv" in hw.calibration.source


def test_h200_held_out_gates():
    """On the H200's held-out points (both sweeps) every gate passes, with the numbers docs/validation.md reports.
    A change that moves them fails here and must update the docs."""
    r = CliRunner().invoke(main, ["validate", "--gpu", "h200", *H200_KERNEL_ARGS, "--e2e", str(H200_E2E_CSV)])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info  # a crash is not a FAIL line
    assert "PASS e2e: 14 held-out steps: MAPE 6.21% (max 8.0%), worst 10.48% at " in r.output, r.output
    assert "PASS memory" in r.output, r.output
    kernel = next(line for line in r.output.splitlines() if line.startswith(("PASS kernel", "FAIL kernel")))
    assert "PASS kernel: 213 held-out points >= 64 MiB: MAPE 2.47% (max 5.0%), worst 11.29% (max 15.0%) at " in kernel
    assert kernel.endswith("kvq_fp16|16|0|256|32|32|128|1024"), kernel
    assert "| sdpa_flash_fp16 | 41 | 4.11 | 10.29 |" in r.output, r.output
    assert r.exit_code == 0


def test_h200_gqa_families_hold_at_head_layouts_they_were_trained_on_beside_32_8():
    """Predicted before the layout sweep was measured, the GQA KIVI families missed its points by 7-16% (MAPE; the
    fit had seen groups of 4 only); fitted on both sweeps' training halves they take a cost per query element, and
    the layout sweep's held-out GQA KIVI points come within 5%."""
    from kvq_sim.measurements import split
    from kvq_sim.validate import predict_kernel

    hw = load_hardware("h200")
    held = [p for p in split(read_kernel_csv(H200_LAYOUTS_CSV, "NVIDIA H200")[0])[1] if p.bytes_read >= 64 * 2**20]
    gqa = [p for p in held if p.impl == "kvq_kivi" and p.q_heads > p.kv_heads]
    errs = [abs(predict_kernel(hw, p) / p.time_us - 1) * 100 for p in gqa]
    assert len(errs) == 27 and sum(errs) / len(errs) == pytest.approx(1.75, abs=0.005) and max(errs) < 5.0
    assert all(hw.calibration.kernel(f"kvq_kivi_{b}b_gqa").dot_ps_per_q_element > 0 for b in (2, 4, 8))


def test_validate_runs_and_reports_every_family():
    r = CliRunner().invoke(main, _validate_args())
    assert r.exit_code in (0, 1), r.output
    for family in {p.family for p in read_kernel_csv(KERNEL_CSV, H100)[0]}:
        assert f"| {family} |" in r.output
    assert "kernel:" in r.output and ("e2e:" in r.output)


# --- fitting: synthetic points with known parameters come back --------------------------------------


def _points(impl, bits, t_us) -> list[KernelPoint]:
    """A sweep shaped like the real one (MHA and GQA, batch 1-64, 1K-1M tokens) timed by `t_us`."""
    pts = []
    for hq, hkv in ((32, 32), (32, 8)):
        for b in (1, 8, 64):
            for ctx in (1024, 16384, 131072, 1048576):
                kv = 2 * b * hkv * ctx * 128
                nbytes = kv * bits // 8 + (0 if bits == 16 else kv // 128 * 4)
                p = KernelPoint(impl, bits, 0 if bits == 16 else 128, b, hq, hkv, 128, ctx, nbytes, 1.0)
                pts.append(replace(p, time_us=t_us(p)))
    return pts


def test_fit_recovers_a_bandwidth_bound_family():
    pts = _points("kvq_fp16", 16, lambda p: 7.0 + p.bytes_read / (0.9 * 3350e3))
    fit, stats = cal.fit_kernel_family(pts, 3350)
    assert fit.bound == "bandwidth"
    assert fit.overhead_us == pytest.approx(7.0, rel=1e-6) and fit.bandwidth_efficiency == pytest.approx(0.9, rel=1e-6)
    assert stats.worst_pct < 1e-6


def test_fit_recovers_flash_split_and_nosplit_costs():
    """SDPA flash's family on its grid: a fixed cost for every launch, one more for launches that split and one per
    split (the combine kernel, whose programs loop over the splits), per-program time, and an efficiency each for
    split and non-split launches come back from exact times."""
    from kvq_sim.grids import launch

    def t_us(p):
        g = launch("flash", p.batch, p.q_heads, p.kv_heads, p.context, p.head_dim, 132)
        eff = 0.85 if g.split else 0.6
        return 4.0 + (6.0 + 0.25 * g.splits) * g.split + 0.5 * g.programs / 132 + p.bytes_read / (eff * 3350e3)

    pts = _points("sdpa_flash_fp16", 16, t_us)
    fit, stats = cal.fit_kernel_family(pts, 3350, sms=132)
    assert fit.grid == "flash" and fit.bound == "bandwidth"
    assert fit.overhead_us == pytest.approx(4.0, rel=1e-5) and fit.split_overhead_us == pytest.approx(6.0, rel=1e-5)
    assert fit.program_us == pytest.approx(0.5, rel=1e-5) and fit.split_us_per_split == pytest.approx(0.25, rel=1e-5)
    assert fit.bandwidth_efficiency == pytest.approx(0.85, rel=1e-5)
    assert fit.nosplit_bandwidth_efficiency == pytest.approx(0.6, rel=1e-5)
    assert stats.worst_pct < 1e-4
    # a launch in 20 splits costs split_overhead_us + 20 split_us_per_split more than the same launch predicted as
    # not split (a launch that does not split pays no per-split time, whatever its splits field says)
    from kvq_sim.latency import GridTerms, attention_kernel_us

    split, whole = (attention_kernel_us(fit, 3350, 1e9, 0, 0, GridTerms(1.0, 1.0, s, 20)) for s in (True, False))
    assert split - whole == pytest.approx(6.0 + 0.25 * 20 + 1e9 / 3350e3 * (1 / 0.85 - 1 / 0.6), rel=1e-6)


def test_fit_recovers_a_compute_bound_family():
    pts = _points(
        "kvq_kivi", 2, lambda p: 11.0 + max(p.bytes_read / 3350e3, (0.8 * p.kv_elements + 0.05 * p.q_elements) * 1e-6)
    )
    fit, _ = cal.fit_kernel_family(pts, 3350, bandwidth_floor=0.9)
    assert fit.bound == "compute" and fit.bandwidth_efficiency == 0.9
    assert fit.overhead_us == pytest.approx(11.0, rel=1e-6)
    assert fit.unpack_ps_per_kv_element == pytest.approx(0.8, rel=1e-6)
    assert fit.dot_ps_per_q_element == pytest.approx(0.05, rel=1e-6)


def test_nnls_picks_the_earlier_of_two_collinear_columns():
    """A family's key/value and query element counts are proportional (one head layout): either column fits
    equally, and the fit must not depend on rounding. The earlier column takes the whole coefficient, also when
    the later one is off by a few ulps in either direction."""
    base = np.array([1.0, 2.0, 3.0, 5.0])
    for y in (0.7 * base, 0.7 * base + np.array([0.02, -0.01, 0.03, -0.02])):  # an exact fit, and a noisy one
        for eps in (0.0, 1e-15, -1e-15):
            a = np.column_stack([np.full(4, 0.2), base, 4 * base * (1 + eps)])
            x = nnls(a, y)
            assert x[2] == 0.0 and x[1] == pytest.approx(0.7, abs=0.02), (y, eps, x)


def test_nnls_never_returns_a_negative_coefficient():
    import numpy as np

    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    x = nnls(a, np.array([3.0, 2.0, 1.0]))  # unconstrained slope would be -1
    assert (x >= 0).all() and x[1] == 0 and x[0] == pytest.approx(2.0)


# --- the split ------------------------------------------------------------------------------------


def test_split_is_disjoint_complete_deterministic_and_balanced():
    pts = read_kernel_csv(KERNEL_CSV, H100)[0]
    train, held = split(pts)
    ids_t, ids_h = {p.point_id for p in train}, {p.point_id for p in held}
    assert not ids_t & ids_h and len(train) + len(held) == len(pts) == len(ids_t | ids_h)
    assert split(pts) == (train, held) and split(list(reversed(pts)))[0] == list(reversed(train))
    assert 0.4 < len(train) / len(pts) < 0.6
    # membership is a property of the point alone: dropping other rows does not move it
    assert split(pts[:17])[0] == [p for p in pts[:17] if p in train]
    # pinned: sha256 prefixes 0x40fd0263 (odd: held out) and 0xb1b43088 (even: training)
    assert is_training("kvq_fp16|16|0|1|32|32|128|1024") is False
    assert is_training("kvq_fp16|16|0|1|32|32|128|4096") is True


def test_calibration_never_reads_held_out_points():
    pts = read_kernel_csv(KERNEL_CSV, H100)[0]
    train, held = split(pts)
    hw = load_hardware("h100-80g")
    wild = [replace(p, time_us=p.time_us * 100) for p in held]  # garbage in the held-out half
    a, b = cal.calibrate(hw, train + held, None), cal.calibrate(hw, train + wild, None)
    assert a.kernels == b.kernels


# --- the latency model uses the fit; transfer rules ------------------------------------------------


def test_a_family_is_fitted_on_the_points_its_most_common_launch_ran():
    """A few shapes run by another kernel (MHA short caches on the fragment kernel) or by another launch of the same
    kernel (4 warps a program instead of 1) leave the main launch's fit alone: with them the fit would be bent
    towards a launch twice as fast; without them it comes back exact. What the plan derives per shape (resident
    programs, splits) does not make another launch."""
    simt = _points("kvq_kivi", 4, lambda p: 9.0 + p.bytes_read / (0.6 * 3350e3))
    simt = [
        replace(p, config=f"simt-bn32-w2-s1-pf-sp{i % 3 + 1}") for i, p in enumerate(simt) if p.q_heads == p.kv_heads
    ]
    frag = [replace(p, config="frag-bn64-w4-s3-r3-sp8", time_us=p.time_us / 2) for p in simt[:2]]
    kept, notes = cal.one_launch(simt + frag)
    assert kept == simt
    assert notes == [
        "kernel kvq_kivi_4b_mha: 2 training point(s) ran another launch (frag-bn64-w4-s3), not the simt-bn32-w2-s1-pf "
        "launch the family models; not fitted"
    ]
    fit, stats = cal.fit_kernel_family(kept, 3350)
    assert fit.bandwidth_efficiency == pytest.approx(0.6, rel=1e-6) and stats.worst_pct < 1e-6
    bent, bent_stats = cal.fit_kernel_family(simt + frag, 3350)
    assert bent_stats.worst_pct > 10
    # the same kernel at another launch is left out too
    wide = [replace(p, config="simt-bn64-w4-s1-pf-sp4", time_us=p.time_us / 2) for p in simt[:3]]
    assert cal.one_launch(simt + wide)[0] == simt
    # untagged points (the fp16 kernels, or a CSV without the config column) are one launch
    plain = _points("kvq_fp16", 16, lambda p: 7.0 + p.bytes_read / (0.9 * 3350e3))
    assert cal.one_launch(plain) == (plain, [])
    # a tie between two launches keeps the one first in sorted order
    tie = [simt[0], frag[0]]
    assert cal.one_launch(tie)[0] == [frag[0]]
    assert cal.launch_of("frag-bn64-w1-s3-r8-sp128") == "frag-bn64-w1-s3" and cal.launch_of("") == ""


def test_decode_step_attention_comes_from_the_fitted_family():
    from kvq_sim.api import deployment

    dep = deployment("llama-7b", "h100-80g", 2, "kivi")
    fit = dep.hardware.calibration.kernel("kvq_kivi_2b_mha")
    assert fit is not None
    step = decode_step(dep, 8, 32768)
    key_value = 2 * 8 * 32 * 32768 * 128
    g = grid_terms(fit, 132, 8, 32, 32, 32768, 128)
    assert g is not None and g.programs_per_sm > 0  # the fitted family carries its launch grid
    per_layer = attention_kernel_us(fit, 3350, step.kv_read_bytes / 32, key_value, key_value, g)
    assert step.kv_s == pytest.approx(32 * float(per_layer) * 1e-6, rel=1e-9)
    without = attention_kernel_us(fit, 3350, step.kv_read_bytes / 32, key_value, key_value)
    assert float(per_layer) > float(without)  # per-program time is charged


def test_transfer_scales_per_element_costs_by_sms_times_clock():
    h100, a100 = load_hardware("h100-80g"), load_hardware("a100-80g")
    t = transferred(h100, a100)
    assert not t.calibrated and "transferred from h100-80g" in t.source
    for k in h100.calibration.attention_kernels:
        moved = t.kernel(k.family)
        assert moved.bandwidth_efficiency == k.bandwidth_efficiency and moved.overhead_us == k.overhead_us
        assert moved.unpack_ps_per_kv_element == pytest.approx(k.unpack_ps_per_kv_element * 132 * 1980 / (108 * 1410))
        # one SM's serial work, per program and per split of the merge: by clock alone
        assert moved.program_us == pytest.approx(k.program_us * 1980 / 1410)
        assert moved.split_us_per_split == pytest.approx(k.split_us_per_split * 1980 / 1410)
    assert h100.calibration.kernel("sdpa_flash_fp16").split_us_per_split > 0


def test_fit_file_is_yaml_the_loader_reads_back(tmp_path):
    """A fit file is written by a YAML library: provenance that looks like a number or holds a quote stays
    text, and the GPU file loads with it as the fitted values to 4 significant digits."""
    hw = load_hardware("h100-80g")
    kpts, kprov = read_kernel_csv(KERNEL_CSV, H100)
    odd = replace(kprov, path='my "sweep": 2.csv', commit="1234567")
    text = cal.calibration_yaml(hw, cal.calibrate(hw, kpts, None), odd, None)
    doc = yaml.safe_load(text)
    assert doc["measurements"] == {"kernel": {"file": 'my "sweep": 2.csv', "commit": "1234567", "date": kprov.date}}
    assert doc["calibrated"] is True and "e2e_fit" not in doc
    fit = tmp_path / "fit.yaml"
    fit.write_text(text)
    again = load_hardware("h100-80g", calibration_fit=fit)
    assert again.calibration.source == doc["source"] and not again.calibration.e2e_measured
    for a, b in zip(again.calibration.attention_kernels, hw.calibration.attention_kernels, strict=True):
        assert (a.family, a.bound) == (b.family, b.bound)
        assert a.overhead_us == pytest.approx(b.overhead_us, rel=1e-3)
        assert a.unpack_ps_per_kv_element == pytest.approx(b.unpack_ps_per_kv_element, rel=1e-3)
        assert a.split_us_per_split == pytest.approx(b.split_us_per_split, rel=1e-3)
    # fields the fit does not set are the GPU file's priors
    assert again.calibration.tensor_core_efficiency == hw.calibration.tensor_core_efficiency == 0.69


# --- bad input: one line on stderr, exit 2 ----------------------------------------------------------


def _run(args):
    r = CliRunner().invoke(main, args)
    return r.exit_code, r.output.strip().splitlines()


@pytest.mark.parametrize("command", ["calibrate", "validate"])
def test_missing_file_is_a_one_line_error(command, tmp_path):
    code, lines = _run([command, "--gpu", "h100-80g", "--measurements", str(tmp_path / "nope.csv")])
    assert code == 2 and len(lines) == 1 and "does not exist" in lines[0]


def test_wrong_columns_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("device,impl,time_us\nNVIDIA H100 80GB HBM3,kvq_fp16,3.0\n")
    code, lines = _run(["validate", "--gpu", "h100-80g", "--measurements", str(bad)])
    assert code == 2 and len(lines) == 1 and "missing column(s)" in lines[0] and "bytes_read" in lines[0]


def test_csv_from_another_device_is_a_one_line_error(tmp_path):
    other = tmp_path / "a100.csv"
    with KERNEL_CSV.open() as f, other.open("w", newline="") as g:
        rows = list(csv.DictReader(f))
        w = csv.DictWriter(g, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "device": "NVIDIA A100-SXM4-80GB"} for r in rows)
    code, lines = _run(["calibrate", "--gpu", "h100-80g", "--measurements", str(other), "--dry-run"])
    assert code == 2 and len(lines) == 1 and "NVIDIA A100-SXM4-80GB" in lines[0]


def test_gpu_without_measurements_cannot_be_calibrated_from_a_csv():
    code, lines = _run(["calibrate", "--gpu", "l40s", "--measurements", str(KERNEL_CSV), "--dry-run"])
    assert code == 2 and len(lines) == 1 and "torch_device_name" in lines[0]


def test_e2e_cache_bytes_equal_the_benchmark_caches_measured_bytes():
    """The memory check's cache term is exact: it equals the cache_bytes column (tensor bytes the benchmark held)."""
    from kvq_sim.calibrate import e2e_cache_bytes
    from kvq_sim.measurements import read_e2e_csv

    pts, _ = read_e2e_csv(E2E_CSV, H100)
    assert pts
    for p in pts:
        assert e2e_cache_bytes(p.backend, p.bits, p.batch, p.context + 1, 32, 128, 32) == p.cache_bytes, p.point_id


def test_e2e_cache_bytes_match_kvq_kernels_allocate():
    torch = pytest.importorskip("torch")
    from kvq_kernels.kivi_layout import allocate
    from kvq_sim.calibrate import e2e_cache_bytes

    for bits, batch, tokens in ((4, 2, 300), (2, 1, 129), (8, 3, 128)):
        c = allocate(batch, 3, 64, tokens, bits, 128, 128, 0)
        parts = (c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero, c.k_res, c.v_win, c.lens)
        assert e2e_cache_bytes("kvq", bits, batch, tokens, 3, 64, 1) == sum(t.nbytes for t in parts)
    assert torch is not None


def test_transferred_calibrations_are_named_as_such():
    from kvq_sim.api import assumptions, deployment

    assert load_hardware("h100-80g").calibration.status == "calibrated"
    assert load_hardware("h200").calibration.status == "calibrated"
    for gpu in ("a100-80g", "a100-40g", "l40s"):
        assert load_hardware(gpu).calibration.status == "transferred from h100-80g"
        text = " ".join(assumptions(deployment("llama-7b", gpu, 2, "kivi")))
        assert "transferred from h100-80g" in text and "UNCALIBRATED" not in text


# --- writing the GPU file: atomic, checked, previous text kept ------------------------------------------------------


def _h100_copy(tmp_path) -> Path:
    """The H100's GPU file as tmp_path/h100-copy.yaml, with the fit file it names at the same relative path."""
    src = CONFIG_DIR / "hardware" / "h100-80g.yaml"
    copy = tmp_path / "h100-copy.yaml"
    shutil.copy(src, copy)
    (tmp_path / "fits").mkdir()
    shutil.copy(calibration_fit_path(src), tmp_path / "fits" / "h100-80g-calibration.yaml")
    return copy


def _files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_fit_the_loader_refuses_leaves_the_files_untouched(tmp_path):
    copy = _h100_copy(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(
        SimInputError, match=r"fits/h100-80g-calibration\.yaml: the new calibration does not load, file left as it was"
    ):
        cal.write_calibration(copy, "calibrated: maybe\n")
    assert _files(tmp_path) == before  # no .bak, no temporary file


def test_write_calibration_writes_the_fit_file_only_and_keeps_its_previous_bytes(tmp_path):
    copy = _h100_copy(tmp_path)
    gpu_file, fit = copy.read_bytes(), tmp_path / "fits" / "h100-80g-calibration.yaml"
    old = fit.read_bytes()
    text = cal.transferred_yaml(load_hardware("h100-80g"), load_hardware(str(copy)))
    assert cal.write_calibration(copy, text) is True
    assert copy.read_bytes() == gpu_file  # the hand-written GPU file is never rewritten
    assert fit.read_text() == text and backup_path(fit).read_bytes() == old
    assert yaml.safe_load(text)["transferred_from"] == "h100-80g"
    assert load_hardware(str(copy)).calibration.status == "transferred from h100-80g"
    backup_path(fit).unlink()
    assert cal.write_calibration(copy, text) is False
    assert not backup_path(fit).exists()


def test_a_gpu_file_naming_no_fit_file_gets_one_beside_it_and_a_note(tmp_path):
    gpu = tmp_path / "mine.yaml"
    gpu.write_text("base: h100-80g\ndescription: mine\n")
    text = cal.transferred_yaml(load_hardware("h100-80g"), load_hardware(str(gpu)))
    assert cal.write_calibration(gpu, text) is True
    assert (tmp_path / "fits" / "mine-calibration.yaml").read_text() == text
    note = cal.written(gpu, True).splitlines()[-1]
    assert note.startswith("note: add 'calibration_fit: fits/mine-calibration.yaml' to ")
    assert load_hardware(str(gpu)).calibration.status == "calibrated"  # not named yet: the base's fit
    gpu.write_text(gpu.read_text() + "calibration_fit: fits/mine-calibration.yaml\n")
    assert load_hardware(str(gpu)).calibration.status == "transferred from h100-80g"


def test_a_fit_file_not_written_yet_leaves_the_priors(tmp_path):
    gpu = tmp_path / "mine.yaml"
    gpu.write_text((CONFIG_DIR / "hardware" / "l40s.yaml").read_text())  # names fits/l40s-calibration.yaml
    hw = load_hardware(str(gpu))
    assert hw.calibration.status == "uncalibrated priors" and hw.calibration.attention_kernels == ()
    assert hw.calibration.weight_bandwidth_efficiency == 0.85  # the GPU file's prior
    (tmp_path / "fits" / "l40s-calibration.yaml").mkdir(parents=True)
    with pytest.raises(SimInputError, match=r"l40s-calibration\.yaml: cannot read"):
        load_hardware(str(gpu))  # a fit file that exists but cannot be read is an error


def test_committed_fit_is_not_worse_than_the_file_and_a_worse_one_is_named():
    hw = load_hardware("h100-80g")
    kpts, _ = read_kernel_csv(KERNEL_CSV, H100)
    r = cal.calibrate(hw, kpts, None)
    path = CONFIG_DIR / "hardware" / "h100-80g.yaml"
    assert cal.fit_regressions(path, r) == []
    stats = tuple(replace(s, mape_pct=s.mape_pct + 1.5) if s.name == "kvq_fp16" else s for s in r.kernel_stats)
    fp16 = next(s.mape_pct for s in r.kernel_stats if s.name == "kvq_fp16")  # the file's: it holds this fit
    assert cal.fit_regressions(path, replace(r, kernel_stats=stats)) == [
        f"kvq_fp16: training MAPE {fp16 + 1.5:.2f}%, the file's {fp16:.2f}%"
    ]
    fewer = replace(
        r,
        kernels=tuple(k for k in r.kernels if k.family != "kvq_fp16"),
        kernel_stats=tuple(s for s in r.kernel_stats if s.name != "kvq_fp16"),
    )
    assert cal.fit_regressions(path, fewer) == ["kvq_fp16: fitted in the file, missing from these measurements"]


def test_constant_times_and_held_out_only_points_are_not_fitted():
    hw = load_hardware("h100-80g")
    train, held = split(read_kernel_csv(KERNEL_CSV, H100)[0])
    flat = [replace(p, time_us=10.0) for p in train if p.family == "kvq_fp16"]
    with pytest.raises(SimInputError, match=r"kernel family kvq_fp16: all 31 training times are 10 us"):
        cal.fit_kernel_family(flat, hw.hbm_bandwidth_gb_s)
    with pytest.raises(SimInputError, match=rf"^k\.csv: all {len(held)} points are held out for validation"):
        cal.calibrate(hw, held, None, source="k.csv")


# The multi-GPU gate on the committed 4x H100 sweep (reports/measurements/multigpu_decode_h100.csv).
MULTIGPU_CSV = ROOT / "reports" / "measurements" / "multigpu_decode_h100.csv"


def _multigpu_held_out():
    from kvq_sim.hardware import load_hardware
    from kvq_sim.multigpu import fitted_errors_pct, read_steps

    return fitted_errors_pct(load_hardware("8x-h100"), read_steps(MULTIGPU_CSV)[0])


def test_multigpu_held_out_mape_within_target():
    from kvq_sim.multigpu import MULTIGPU_MAPE_MAX_PCT

    errs = _multigpu_held_out()
    assert len(errs) >= 60
    assert errs.mean() <= MULTIGPU_MAPE_MAX_PCT


def test_multigpu_held_out_worst_within_target():
    from kvq_sim.multigpu import MULTIGPU_WORST_MAX_PCT

    assert _multigpu_held_out().max() <= MULTIGPU_WORST_MAX_PCT


# The same gate on the 4x H200 sweep (reports/measurements/multigpu_decode_h200.csv): the MAPE passes and the worst
# point fails, the TP 4 fit extrapolating its per-byte cost to llama-2-70b at batch 64 (docs/validation.md). Its
# KIVI steps ran the kernels of their time, before the fragment kernel took the codes as the M side of its products
# (kernel_decode_h200_v11.csv): the fit describes faster attention than they ran.
MULTIGPU_H200_CSV = ROOT / "reports" / "measurements" / "multigpu_decode_h200.csv"


def test_multigpu_h200_held_out_mape_passes_and_the_extrapolated_tp4_point_fails():
    from kvq_sim.hardware import load_hardware
    from kvq_sim.multigpu import MULTIGPU_MAPE_MAX_PCT, MULTIGPU_WORST_MAX_PCT, fitted_errors_pct, read_steps

    points = read_steps(MULTIGPU_H200_CSV)[0]
    errs = fitted_errors_pct(load_hardware("8x-h200"), points)
    assert len(errs) == 56
    assert errs.mean() == pytest.approx(6.54, abs=0.005) and errs.mean() <= MULTIGPU_MAPE_MAX_PCT
    assert errs.max() == pytest.approx(40.747, abs=0.005) and errs.max() > MULTIGPU_WORST_MAX_PCT


@pytest.mark.parametrize(
    "run,slug,kernel",
    [
        (
            "kvq_bench_h100_quick_7564859",
            "nvidia-h100-80gb-hbm3",
            "MAPE 4.70% (max 5.0%), worst 16.11% (max 15.0%) at sdpa_flash_fp16|16|0|1|32|8|128|16384",
        ),
        (
            "kvq_bench_h200_quick_8a55093",
            "nvidia-h200",
            "MAPE 6.68% (max 5.0%), worst 19.33% (max 15.0%) at sdpa_flash_fp16|16|0|1|32|8|128|16384",
        ),
    ],
)
def test_committed_kvq_bench_quick_runs_validate_as_the_kernels_readme_says(run, slug, kernel):
    """Each committed `kvq-bench --quick` run, validated on its own fit: step and memory gates pass, the kernel gate
    fails at SDPA's split transition (packages/kvq-kernels/README.md shows the output)."""
    d = ROOT / "reports" / "measurements" / run
    args = ["validate", "--gpu", str(d / f"{slug}.yaml"), "--measurements", str(d / f"kernel_decode_{slug}.csv")]
    r = CliRunner().invoke(main, [*args, "--e2e", str(d / f"e2e_decode_{slug}.csv")])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    assert "PASS e2e" in r.output and "PASS memory" in r.output, r.output
    assert f"FAIL kernel: 20 held-out points >= 64 MiB: {kernel}" in r.output, r.output
    assert r.exit_code == 1


# Llama-3-8B on one H200 (reports/measurements/multigpu_decode_llama3_8b_h200_tp1.csv): a model and head layout (GQA)
# no decode-step fit has seen, predicted before it was measured (docs/validation.md). The first three runs ran the
# fragment kernel with the query group as 16 padded rows; the H200 fit describes the kernel with the codes as the M
# side of both products (0.6-0.75x the time of GQA 2/4-bit attention), so kvq-sim predicts the KIVI steps of those
# runs fast (up to 39% in the third one-GPU run, 52% over all runs) and their fp16 steps within both gates. The
# fourth run measured the M-side kernel with the fp16 kernel's earlier split rule (4 waves of one program an SM).
LLAMA3_H200_CSV = ROOT / "reports" / "measurements" / "multigpu_decode_llama3_8b_h200_tp1.csv"
LLAMA3_H200_V2 = [
    ROOT / "reports/measurements" / f"multigpu_decode_llama3_8b_h200_{n}.csv" for n in ("v2_tp1", "v2_2gpu", "4gpu")
]
LLAMA3_H200_V3 = ROOT / "reports/measurements/multigpu_decode_llama3_8b_h200_v3_tp1.csv"
LLAMA3_H200_V4 = ROOT / "reports/measurements/multigpu_decode_llama3_8b_h200_v4_tp1.csv"
LLAMA3_H200_V5 = ROOT / "reports/measurements/multigpu_decode_llama3_8b_h200_v5_tp1.csv"
LLAMA3_H200_V6 = ROOT / "reports/measurements/multigpu_decode_llama3_8b_h200_v6_tp1.csv"
LLAMA3_H200_V7 = ROOT / "reports/measurements/multigpu_decode_llama3_8b_h200_v7_tp1.csv"


def _signed_errors_pct(csv_path) -> tuple[dict, dict]:
    """({step: predicted / measured - 1 in %} under the 8x-h200 fit, the file's provenance) of a one-GPU run."""
    from kvq_sim.hardware import load_hardware
    from kvq_sim.multigpu import predict, read_steps

    points, prov = read_steps(csv_path)
    hw = load_hardware("8x-h200")
    return {p: (predict(hw, p) / p.step_us - 1) * 100 for p in points}, prov


@pytest.mark.parametrize(
    "csv_path,commit,mape_pct,worst_pct",
    [
        (LLAMA3_H200_V7, "dd72e24", 4.68, 8.78),
        (LLAMA3_H200_V6, "177f4f8", 4.47, 9.11),
        (LLAMA3_H200_V5, "3522a02", 6.54, 17.415),
        (LLAMA3_H200_V4, "b51b21b", 7.67, 17.81),
    ],
    ids=["v7", "v6", "v5", "v4"],
)
def test_the_gqa_model_holds_both_multigpu_gates_on_the_runs_of_the_fragment_kernel_with_the_codes_as_m(
    csv_path, commit, mape_pct, worst_pct
):
    """The one-H200 Llama-3-8B runs since the fragment kernel took the codes as the M side, each predicted before
    it was measured (reports/predictions/llama3_8b_h200_v{4,5,6,7}.csv, docs/validation.md shows the comparisons):
    the seventh (dd72e24) ran the kernels of the fifteenth sweep (predicted then with MAPE 3.49%, worst 9.36%; the
    H200 is now fitted on the sixteenth, whose fragment kernel is 2-4% faster at 4-bit); the sixth (177f4f8) those
    of the fourteenth (the same launches, a slower split merge); the fifth (3522a02) those of the twelfth (predicted
    then with MAPE 3.34%, worst 8.50%) and the fourth (b51b21b) those of the eleventh, with the fp16 kernel's splits
    for 4 waves of one program an SM (4.18%, 10.64%). The current fit predicts the older runs' steps up to 14% fast
    (its KIVI launches are faster than theirs) and holds every step of every run, fp16 and KIVI, inside both
    gates."""
    from kvq_sim.multigpu import MULTIGPU_MAPE_MAX_PCT, MULTIGPU_WORST_MAX_PCT

    signed, prov = _signed_errors_pct(csv_path)
    assert len(signed) == 27 and {(p.model, p.gpus, p.kv) for p in signed} == {
        ("llama-3-8b", 1, kv) for kv in ("fp16", "kivi4", "kivi2")
    }
    assert prov["commit"] == commit
    errs = [abs(e) for e in signed.values()]
    mape = sum(errs) / len(errs)
    assert mape == pytest.approx(mape_pct, abs=0.005) and mape <= MULTIGPU_MAPE_MAX_PCT
    assert max(errs) == pytest.approx(worst_pct, abs=0.005) and max(errs) <= MULTIGPU_WORST_MAX_PCT


def test_the_gqa_model_holds_both_multigpu_gates_where_its_kernels_did_not_change():
    """The last one-H200 Llama-3-8B run (da6940d): its fp16 steps inside both gates; its KIVI steps, which ran the
    padded-rows fragment kernel, predicted fast (at most 5.60% slow)."""
    from kvq_sim.multigpu import MULTIGPU_MAPE_MAX_PCT, MULTIGPU_WORST_MAX_PCT

    signed = _signed_errors_pct(LLAMA3_H200_V3)[0]
    assert len(signed) == 27 and {(p.model, p.gpus) for p in signed} == {("llama-3-8b", 1)}
    fp16 = [abs(e) for p, e in signed.items() if p.kv == "fp16"]
    assert len(fp16) == 9 and sum(fp16) / len(fp16) <= MULTIGPU_MAPE_MAX_PCT and max(fp16) <= MULTIGPU_WORST_MAX_PCT
    kivi = [e for p, e in signed.items() if p.kv != "fp16"]
    assert max(kivi) == pytest.approx(5.60, abs=0.005) and min(kivi) == pytest.approx(-44.86, abs=0.005)
    errs = [abs(e) for e in signed.values()]
    assert sum(errs) / len(errs) == pytest.approx(15.565, abs=0.005)


def test_an_unfitted_gqa_model_measured_with_older_kernels_is_predicted_fast():
    from kvq_sim.hardware import load_hardware
    from kvq_sim.multigpu import MULTIGPU_MAPE_MAX_PCT, predict, read_steps

    points = read_steps(LLAMA3_H200_CSV)[0]
    assert len(points) == 27 and {p.model for p in points} == {"llama-3-8b"} and {p.gpus for p in points} == {1}
    # the second run: the kernels with splits for their resident programs, on 1, 2 and 4 GPUs
    again = [p for f in LLAMA3_H200_V2 for p in read_steps(f)[0]]
    layouts = {("tp", 1), ("tp", 2), ("cp", 2), ("tp", 4), ("cp", 4)}
    assert len(again) == 135 and {(p.parallel, p.gpus) for p in again} == layouts
    points += again
    hw = load_hardware("8x-h200")
    errs = [abs(predict(hw, p) / p.step_us - 1) * 100 for p in points]
    mape, worst = sum(errs) / len(errs), max(errs)
    assert mape == pytest.approx(13.71, abs=0.005) and mape > MULTIGPU_MAPE_MAX_PCT, mape
    assert worst == pytest.approx(56.50, abs=0.005), worst


@pytest.mark.parametrize(
    "change,message",
    [
        ({"bits": "99"}, "column 'bits': kvq_kivi stores 2, 3, 4 or 8 bits, got 99"),
        ({"bits": "16"}, "column 'bits': kvq_kivi stores 2, 3, 4 or 8 bits, got 16"),
        ({"group_size": "0"}, "column 'group_size': kvq_kivi groups are powers of two >= 16, got 0"),
        ({"group_size": "7"}, "column 'group_size': kvq_kivi groups are powers of two >= 16, got 7"),
        ({"batch": "100000000000000"}, "column 'bytes_read': "),
        ({"context": "99999999"}, "column 'bytes_read': "),
    ],
)
def test_kernel_rows_whose_layout_cannot_be_are_refused(tmp_path, change, message):
    """A packed row's bit width and group must be ones kvq_kivi stores, and its bytes must hold its codes."""
    with open(KERNEL_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    p = tmp_path / "k.csv"

    def write(row):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerow(row)

    write({**next(r for r in rows if r["impl"] == "kvq_kivi"), **change})
    with pytest.raises(SimInputError, match=re.escape(message)):
        read_kernel_csv(p, H100)
    write({**next(r for r in rows if r["impl"] == "kvq_fp16"), "bits": "4"})
    with pytest.raises(SimInputError, match=r"an fp16 kernel \(kvq_fp16\) reads 16-bit K/V"):
        read_kernel_csv(p, H100)


def test_several_kernel_files_are_read_as_one_sweep_and_a_point_in_two_is_refused(tmp_path):
    """read_kernel_csvs: the points of every file, one provenance naming them all; a point measured in two files
    would be fitted twice, so it is refused with both files named (calibrate and validate take --measurements
    more than once)."""
    from kvq_sim.measurements import read_kernel_csvs

    pts, prov = read_kernel_csvs([H200_KERNEL_CSV, H200_LAYOUTS_CSV], "NVIDIA H200")
    a, b = (read_kernel_csv(f, "NVIDIA H200")[0] for f in (H200_KERNEL_CSV, H200_LAYOUTS_CSV))
    assert pts == a + b and prov.path == f"{H200_KERNEL_CSV} + {H200_LAYOUTS_CSV}"
    dates = [read_kernel_csv(f, "NVIDIA H200")[1].date for f in (H200_KERNEL_CSV, H200_LAYOUTS_CSV)]
    assert prov.commit == "698ee5b + cbea632" and prov.date == max(dates) and dates[0] != dates[1]
    assert read_kernel_csvs(str(H200_KERNEL_CSV), "NVIDIA H200")[0] == a  # one file: as read_kernel_csv
    copy = tmp_path / "again.csv"
    lines = H200_LAYOUTS_CSV.read_text().splitlines()
    copy.write_text("\n".join(lines[:1] + lines[5:6]) + "\n")
    with pytest.raises(SimInputError, match=r"again\.csv: point .* is also in .*kernel_decode_h200_new_heads\.csv"):
        read_kernel_csvs([H200_LAYOUTS_CSV, copy], "NVIDIA H200")
    r = CliRunner().invoke(main, ["validate", "--gpu", "h200", *H200_KERNEL_ARGS, "--measurements", str(copy)])
    assert r.exit_code == 2 and "is also in" in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, ["calibrate", "--gpu", "h200", "--dry-run", *H200_KERNEL_ARGS])
    assert r.exit_code == 0, r.output
    assert "kernel_decode_h200_v16.csv + " in r.output and "(commit 698ee5b + cbea632," in r.output
