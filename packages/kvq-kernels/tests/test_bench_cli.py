"""kvq-bench on CPU: the no-GPU refusal, the drafted YAML and both CSVs as kvq-sim reads them, output checks, and
the printed kvq-sim commands run on a quick run's files."""

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kvq_kernels import bench_cli
from kvq_kernels.bench_cli import QUICK, GpuInfo, Phases, check_outputs, draft_yaml, next_commands, output_paths
from kvq_sim.hardware import load_hardware
from kvq_sim.measurements import E2EPoint, KernelPoint, is_training, read_e2e_csv, read_kernel_csv

FAKE = GpuInfo(
    name="NVIDIA Fake 48GB",
    memory_bytes=50_657_755_136,
    sm_count=142,
    l2_bytes=96 * 2**20,
    max_sm_clock_mhz=2520.0,
    max_memory_clock_mhz=9001.0,
    driver="999.1",
    read_gb_s=801.37,
    copy_gb_s=760.2,
    matmul_tflops=301.77,
)


def test_refuses_without_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(
        [sys.executable, "-m", "kvq_kernels.bench_cli", "--quick"], env=env, capture_output=True, text=True
    )
    assert p.returncode == 2
    assert p.stderr.splitlines() == [bench_cli.NO_GPU]
    assert "triton" not in p.stdout


@pytest.mark.parametrize(
    "args,match",
    [
        (["--group", "0"], "--group: invalid choice: 0"),
        (["--group", "7"], "--group: invalid choice: 7"),
        (["--group", "256"], "--group: invalid choice: 256"),
        (["--budget-s", "0"], "--budget-s: expected a positive number of seconds, got '0'"),
        (["--budget-s", "-1"], "--budget-s: expected a positive number of seconds, got '-1'"),
        (["--budget-s", "nan"], "--budget-s: expected a positive number of seconds, got 'nan'"),
        (["--budget-s", "inf"], "--budget-s: expected a positive number of seconds, got 'inf'"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_anything_runs(args, match, capsys):
    with pytest.raises(SystemExit) as e:
        bench_cli.parse_args(args)
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert bench_cli.parse_args(["--group", "32", "--budget-s", "1.5"]).budget_s == 1.5


def test_help_states_the_whole_first_sentence(capsys):
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--help"])
    assert "and draft its kvq-sim hardware YAML." in " ".join(capsys.readouterr().out.split())


def test_draft_yaml_loads_with_measured_numbers(tmp_path):
    path = tmp_path / f"{FAKE.slug}.yaml"
    path.write_text(draft_yaml(FAKE))
    hw = load_hardware(str(path))  # rejects any field outside kvq_sim.hardware's schema
    assert FAKE.slug == "nvidia-fake-48gb"
    assert hw.torch_device_name == FAKE.name
    assert (hw.hbm_bandwidth_gb_s, hw.fp16_dense_tflops, hw.int8_dense_tops) == (801.4, 301.8, 603.5)
    assert (hw.usable_memory_bytes, hw.nominal_memory_gib, hw.sm_count, hw.l2_mib) == (50_657_755_136, 48, 142, 96)
    assert hw.boost_clock_mhz == 2520.0
    assert hw.calibration.status == "uncalibrated priors"
    text = path.read_text()
    for field in ("hbm_bandwidth_gb_s", "fp16_dense_tflops"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{field}:"))
        assert line.endswith(f"# {bench_cli.MEASURED}")


def test_draft_yaml_without_nvidia_smi_clock(tmp_path):
    info = GpuInfo(**{**FAKE.__dict__, "max_sm_clock_mhz": None, "max_memory_clock_mhz": None})
    path = tmp_path / "g.yaml"
    path.write_text(draft_yaml(info))
    assert load_hardware(str(path)).boost_clock_mhz is None


def _fake_rows():
    """Rows as kvq_kernels.benchmarking.sweep writes them, for one fp16 and one 4-bit point."""
    from kvq_kernels.benchmarking import KERNEL_FIELDS, kernel_row, kv_bytes

    prov = dict(device=FAKE.name, driver="999.1", torch="t", triton="x", commit="abc1234", date="2026-01-01T00:00:00Z")
    rows = []
    for batch, t in ((1, 4096), (8, 131072)):
        fp16 = kv_bytes(16, batch, 8, t, 128)
        sdpa_us = fp16 / 700e3 + 9
        point = dict(bits=16, group=128, batch=batch, q_heads=32, kv_heads=8, context=t, hbm=0.8)
        rows.append(kernel_row(prov, impl="sdpa_flash_fp16", kv_bytes_read=fp16, time_us=sdpa_us,
                               sdpa_us=sdpa_us, config="", **point))  # fmt: skip
        rows.append(kernel_row(prov, impl="kvq_fp16", kv_bytes_read=fp16, time_us=sdpa_us * 0.9,
                               sdpa_us=sdpa_us, config="bn64-w4-s3", **point))  # fmt: skip
        q4 = kv_bytes(4, batch, 8, t, 128)
        rows.append(kernel_row(prov, impl="kvq_kivi", kv_bytes_read=q4, time_us=q4 / 500e3 + 7, sdpa_us=sdpa_us,
                               config="tc-bn128-w4-s1", **{**point, "bits": 4}))  # fmt: skip
    return [*prov, *KERNEL_FIELDS], rows


def _write_csv(path, fields, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_csv_rows_read_back_by_kvq_sim(tmp_path):
    fields, rows = _fake_rows()
    path = tmp_path / "kernel_decode_fake.csv"
    _write_csv(path, fields, rows)
    points, prov = read_kernel_csv(path, FAKE.name)
    assert [p.impl for p in points] == ["sdpa_flash_fp16", "kvq_fp16", "kvq_kivi"] * 2
    assert points[2] == KernelPoint(
        impl="kvq_kivi", bits=4, group_size=128, batch=1, q_heads=32, kv_heads=8, head_dim=128, context=4096,
        bytes_read=int(rows[2]["bytes_read"]), time_us=float(rows[2]["time_us"]), config="tc-bn128-w4-s1",
    )  # fmt: skip
    assert points[0].group_size == 0 and points[0].family == "sdpa_flash_fp16"
    assert points[5].family == "kvq_kivi_4b_gqa"
    assert (prov.device, prov.commit) == (FAKE.name, "abc1234")


def test_quick_grid_trains_every_family():
    """`kvq-sim calibrate` fits each kernel family from at least 3 training points of the fixed split."""
    from kvq_kernels.benchmarking import decode_grid

    train, held = Counter(), Counter()
    for hq, hkv, batch, t in decode_grid(QUICK.heads, QUICK.batches, QUICK.contexts, QUICK.split_contexts):
        for bits in QUICK.bits:
            for impl in ("sdpa_flash_fp16", "kvq_fp16") if bits == 16 else ("kvq_kivi",):
                p = KernelPoint(impl, bits, 0 if bits == 16 else 128, batch, hq, hkv, 128, t, 1, 1.0)
                (train if is_training(p.point_id) else held)[p.family] += 1
    assert len(train) == 6
    assert min(train.values()) >= 4 and min(held[f] for f in train) >= 2, (train, held)


def test_quick_correctness_covers_the_gqa_launches_the_sweep_runs():
    """decode_kivi's auto path runs 32/8 GQA on the fragment kernel's few-rows launch over at most FRAG_FEW_ROWS
    rows (batch x kv heads) of at most FRAG_FEW_MAX_TOKENS tokens of quantized capacity (its default max_len), on
    its many-rows launch otherwise: the quick sweep's points reach both, and so do the quick correctness shapes."""
    from kvq_kernels.decode_kivi import FRAG_FEW_MAX_TOKENS, FRAG_FEW_ROWS

    def few(batch, tokens):  # allocate(): whole 128-token flush blocks
        return batch * 8 <= FRAG_FEW_ROWS and -(-tokens // 128) * 128 <= FRAG_FEW_MAX_TOKENS

    gqa = [h for h in QUICK.heads if h[0] != h[1]]
    swept = {few(b, t) for b in QUICK.batches for t in QUICK.contexts}
    checked = {few(len(lens), cap) for hq, hkv, lens, cap in QUICK.check_shapes if (hq, hkv) in gqa}
    assert swept == checked == {True, False}
    assert {(hq, hkv) for hq, hkv, _, _ in QUICK.check_shapes} == set(QUICK.heads)
    assert QUICK.check_variants == ((128, 0, False),)  # the sweep's group, no sinks, uniform codes


def test_output_checks(tmp_path):
    paths = output_paths(tmp_path / "new", "g")
    assert [p.name for p in paths] == ["kernel_decode_g.csv", "e2e_decode_g.csv", "g.yaml"]
    check_outputs(paths, force=False)  # creates the directory
    assert Path(paths[0]).parent.is_dir()
    paths[2].write_text("x")
    with pytest.raises(ValueError, match=r"refusing to overwrite .*g\.yaml \(pass --force"):
        check_outputs(paths, force=False)
    check_outputs(paths, force=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_outputs(output_paths(tmp_path / "file", "g"), force=False)
    with pytest.raises(ValueError, match=r"--out /proc/kvq-bench-x: cannot write there"):
        check_outputs(output_paths("/proc/kvq-bench-x", "g"), force=False)  # mkdir there: FileNotFoundError


def _quick_kernel_rows(prov):
    """A quick-grid kernel CSV's rows, times from a bandwidth model."""
    from kvq_kernels.benchmarking import config_name, decode_grid, default_configs, kernel_row, kv_bytes

    configs = default_configs(QUICK.bits, 128, QUICK.heads)
    rows = []
    for hq, hkv, batch, t in decode_grid(QUICK.heads, QUICK.batches, QUICK.contexts, QUICK.split_contexts):
        for bits in QUICK.bits:
            nbytes = kv_bytes(bits, batch, hkv, t, 128)
            point = dict(bits=bits, group=128, batch=batch, q_heads=hq, kv_heads=hkv, context=t, kv_bytes_read=nbytes,
                         hbm=0.8, sdpa_us=None)  # fmt: skip
            if bits == 16:
                rows.append(kernel_row(prov, impl="sdpa_flash_fp16", time_us=9 + nbytes / 680e3, config="", **point))
                rows.append(kernel_row(prov, impl="kvq_fp16", time_us=5 + nbytes / 720e3, config="bn64-w4-s3", **point))
            else:
                cfg = config_name(configs[(bits, hq, hkv)])
                rows.append(kernel_row(prov, impl="kvq_kivi", time_us=6 + nbytes / 400e3, config=cfg, **point))
    return rows


def _quick_step_rows(prov, hw):
    """The rows kvq-bench --quick writes for the whole step on `hw` (a 48 GB GPU: the points that fit), with
    times and memory as kvq-sim predicts them from the kernel fit and its launch-overhead prior, plus a 3%
    batch-dependent term it does not model."""
    from kvq_kernels import bench_cli
    from kvq_kernels import decode_step as ds
    from kvq_sim.calibrate import e2e_cache_bytes
    from kvq_sim.validate import predict_e2e

    s, group, residual = bench_cli.step_model()
    weights = ds.Weights.bytes_of(s)
    rows = []
    for p in ds.plan(("sdpa", "kvq"), QUICK.step_bits, QUICK.step_batches, QUICK.step_contexts):
        if not ds.fits(s, weights, p.bits, p.batch, p.context, FAKE.memory_bytes):
            continue
        cache = e2e_cache_bytes(p.backend, p.bits, p.batch, p.context + 1, s.kv_heads, s.head_dim, s.layers)
        e = E2EPoint(p.backend, p.bits, p.batch, p.context, 1.0, weights, cache, 1)
        us, mem = predict_e2e(hw, e)
        us *= 1 + 0.03 * (p.batch > 1)
        rows.append(dict(backend=p.backend, bits=p.bits, batch=p.batch, context=p.context, step_us=round(us, 2),
                         tokens_per_s=round(p.batch / us * 1e6, 1), weights_bytes=weights, cache_bytes=cache,
                         max_allocated_bytes=mem, **prov))  # fmt: skip
    assert list(rows[0]) == [*ds.E2E_FIELDS, *prov]
    return rows


def test_quick_outputs_calibrate_and_validate(tmp_path):
    """The drafted YAML, a quick-grid kernel CSV and the quick whole-step CSV (both written by the writers kvq-bench
    uses, times from models) go through the `kvq-sim calibrate` and `validate` commands kvq-bench prints."""
    import shlex

    from click.testing import CliRunner

    from kvq_kernels import decode_step as ds
    from kvq_kernels.benchmarking import KERNEL_FIELDS
    from kvq_sim.cli import main as kvq_sim

    csv_path, e2e_path, yaml_path = output_paths(tmp_path, FAKE.slug)
    yaml_path.write_text(draft_yaml(FAKE))
    prov = dict(device=FAKE.name, driver="1", torch="t", triton="x", commit="c", date="2026-01-01T00:00:00Z")
    _write_csv(csv_path, [*prov, *KERNEL_FIELDS], _quick_kernel_rows(prov))
    kernel_only = [shlex.split(c)[1:] for c in next_commands(yaml_path, csv_path)]
    cal = CliRunner().invoke(kvq_sim, kernel_only[0])
    assert cal.exit_code == 0, cal.output
    hw = load_hardware(str(yaml_path))
    assert hw.calibration.calibrated and hw.torch_device_name == FAKE.name
    assert len(hw.calibration.attention_kernels) == 6
    val = CliRunner().invoke(kvq_sim, kernel_only[1])
    assert val.exit_code == 0, val.output
    assert "PASS kernel" in val.output and "SKIP e2e" in val.output

    rows = _quick_step_rows(prov, hw)
    ds.write_rows(e2e_path, rows)
    points, eprov = read_e2e_csv(e2e_path, FAKE.name)
    assert [(p.backend, p.bits, p.batch, p.context) for p in points] == [
        (r["backend"], r["bits"], r["batch"], r["context"]) for r in rows
    ]
    assert {p.backend for p in points if is_training(p.point_id)} == {"sdpa", "kvq"}
    assert any(not is_training(p.point_id) for p in points)
    commands = next_commands(yaml_path, csv_path, e2e_path)
    assert commands[0] == f"kvq-sim calibrate --gpu {yaml_path} --measurements {csv_path} --e2e {e2e_path}"
    cal = CliRunner().invoke(kvq_sim, shlex.split(commands[0])[1:])
    assert cal.exit_code == 0, cal.output
    assert "e2e step: weight_gemv efficiency" in cal.output
    val = CliRunner().invoke(kvq_sim, shlex.split(commands[1])[1:])
    assert val.exit_code == 0, val.output
    for check in ("PASS kernel", "PASS e2e", "PASS memory"):
        assert check in val.output


def test_step_phase_writes_the_points_that_fit(tmp_path, monkeypatch):
    """kvq-bench's step phase on a fake 48 GB GPU (the GPU parts stubbed: weights, the timed step, device
    memory): it times the quick plan's points that fit, each with the sweep's launch config for LLaMA-7B's
    32/32 heads, and writes rows kvq-sim reads; with no point fitting it writes nothing and says so."""
    import types

    import torch

    from kvq_kernels import bench_cli
    from kvq_kernels import decode_step as ds
    from kvq_kernels.benchmarking import default_configs

    timed = []

    def fake_time_step(s, W, p, group, residual, launch, warmup_ms, rep_ms):
        timed.append((p, launch, group, residual, warmup_ms, rep_ms))
        return dict(backend=p.backend, bits=p.bits, batch=p.batch, context=p.context, step_us=1000.0 + p.context / 8,
                    tokens_per_s=1.0, weights_bytes=1, cache_bytes=1, max_allocated_bytes=1)  # fmt: skip

    memory = types.SimpleNamespace(total_memory=FAKE.memory_bytes)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: memory)
    monkeypatch.setattr(ds.Weights, "__init__", lambda self, s, device: None)
    monkeypatch.setattr(ds, "time_step", fake_time_step)
    prov = dict(device=FAKE.name, driver="1", torch="t", triton="x", commit="c", date="2026-01-01T00:00:00Z")
    configs = default_configs(QUICK.bits, 128, QUICK.heads)
    path = tmp_path / "e2e.csv"
    assert bench_cli._measure_step(QUICK, configs, prov, path) == "ok"
    s, _, _ = bench_cli.step_model()
    fit = [p for p in ds.plan(("sdpa", "kvq"), (4, 2), (1, 16), (4096, 32768))
           if ds.fits(s, ds.Weights.bytes_of(s), p.bits, p.batch, p.context, FAKE.memory_bytes)]  # fmt: skip
    assert [t[0] for t in timed] == fit and len(fit) < 12
    assert {t[1]["path"] for t in timed if t[0].bits < 16} == {configs[(4, 32, 32)][0]}
    assert {t[2:] for t in timed} == {(128, 128, QUICK.step_warmup_ms, QUICK.step_rep_ms)}
    points, _ = read_e2e_csv(path, FAKE.name)
    assert [(p.backend, p.bits, p.batch, p.context) for p in points] == [
        (p.backend, p.bits, p.batch, p.context) for p in fit
    ]
    memory.total_memory = 8 * 2**30  # LLaMA-7B's 13 GB of weights do not fit
    assert bench_cli._measure_step(QUICK, configs, prov, path) == "skipped"
    assert not path.exists()


@pytest.mark.parametrize(("backend", "bits"), [("sdpa", 16), ("kvq", 16), ("kvq", 4), ("kvq", 2)])
def test_step_caches_hold_the_bytes_kvq_sim_counts(backend, bits):
    """kvq-sim's e2e memory model (calibrate.e2e_cache_bytes) counts exactly the tensors the step's caches
    allocate, at kvq-sim's packed format (group and residual 128) on a small shape."""
    from kvq_kernels import decode_step as ds
    from kvq_sim.calibrate import E2E_KIVI_GROUP, E2E_KIVI_RESIDUAL, e2e_cache_bytes

    s = ds.Shape("small", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32, ffn=96, vocab=128)
    for context in (300, 383, 384):
        c = ds.random_cache(backend, bits, s, 2, context, "cpu", E2E_KIVI_GROUP, E2E_KIVI_RESIDUAL)
        want = e2e_cache_bytes(backend, bits, 2, context + 1, s.kv_heads, s.head_dim, s.layers)
        assert c.nbytes == want, context


def test_step_model_is_kvq_sims_e2e_model():
    from kvq_kernels import bench_cli
    from kvq_kernels.decode_step import Shape

    assert bench_cli.step_model() == (Shape("llama-7b", 32, 4096, 32, 32, 128, 11008, 32000), 128, 128)


def test_phases_and_their_yaml_line(tmp_path):
    phases = Phases(start=100.0)
    with phases("detect"):
        pass
    assert list(phases.seconds) == ["detect"]
    phases.seconds.update(detect=2.04, sweep=30.0)
    assert phases.summary(now=145.25) == "detect 2.0, sweep 30.0, total 45.2"
    path = tmp_path / "g.yaml"
    path.write_text(draft_yaml(FAKE, phases.summary(now=145.25)))
    assert "# kvq-bench phases, wall seconds: detect 2.0, sweep 30.0, total 45.2." in path.read_text().splitlines()
    assert load_hardware(str(path)).torch_device_name == FAKE.name


def test_fill_random_is_seeded_and_in_range():
    """The benchmarks' random KIVI caches: the same generator seed gives the same cache, scales lie in
    [span/2, span] for span = 2 / (2^bits - 1), and the fp16 window is filled (never left at zeros)."""
    import torch

    from kvq_kernels.benchmarking import fill_random
    from kvq_kernels.kivi_layout import allocate

    def make(seed):
        c = allocate(2, 3, 64, 300, 4, 32, 128, 0, device="cpu")
        return fill_random(c, torch.Generator().manual_seed(seed))

    a, b, other = make(1), make(1), make(2)
    assert torch.equal(a.k_codes, b.k_codes) and torch.equal(a.v_win, b.v_win)
    assert not torch.equal(a.k_codes, other.k_codes)
    span = 2.0 / 15
    fp16_step = 1e-3  # the scales are stored in fp16: 2^-11 relative rounding, with margin
    assert 0.5 * span * (1 - fp16_step) <= a.k_scale.float().min()
    assert a.k_scale.float().max() <= span * (1 + fp16_step)
    assert a.v_win.abs().sum() > 0 and a.k_codes.float().std() > 50
