"""Bad-input corpus for the files `kvq-sim` reads and writes: measurement CSVs (calibrate, validate), the GPU
YAML that `calibrate` rewrites, and the PDF `report -o` writes.

Every case runs the CLI in a subprocess (tests/corpus/conftest.py) on copies made in tmp_path: configs/ through
KVQ_CONFIG_DIR, and the committed measurement CSVs, so nothing in the repository can be written. A bad case
must exit 2 with one stderr line naming the problem (file, row and column for a CSV cell), print no traceback,
and leave every copied config and CSV byte for byte as it was. Ids that name a reported bad input carry its
words (`transfer-from-h100-80g-to-itself`, `all-equal-times-written-into-configs-hardware`, ...). Positive
controls at the end prove the same runs succeed, write atomically and keep the replaced file as `.bak`.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import pytest

from kvq_sim import report_data
from kvq_sim.measurements import is_training

ROOT = Path(__file__).resolve().parents[2]
MEASURED = ROOT / "reports" / "measurements"
SIM = "kvq_sim.cli"
GPU = "h100-80g"
FIT = f"configs/hardware/fits/{GPU}-calibration.yaml"  # what calibrate writes (the GPU file names it)
K = f"reports/measurements/{report_data.KERNEL_CSV}"  # copies in tmp_path, at the paths the H100 file cites
E = f"reports/measurements/{report_data.E2E_CSV}"
CAL = ["calibrate", "--gpu", GPU, "--measurements"]
VAL = ["validate", "--gpu", GPU, "--measurements"]


@pytest.fixture
def world(tmp_path):
    """tmp_path holding configs/{hardware,models} and the committed kernel and e2e CSVs; env pointing at it."""
    for kind in ("hardware", "models"):
        shutil.copytree(ROOT / "configs" / kind, tmp_path / "configs" / kind)
    (tmp_path / K).parent.mkdir(parents=True)
    shutil.copy(ROOT / K, tmp_path / K)
    shutil.copy(ROOT / E, tmp_path / E)
    return tmp_path


def _env(root: Path) -> dict:
    return {"KVQ_CONFIG_DIR": str(root / "configs")}


def _protected(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- CSV edits: each takes the text of a committed CSV and returns the bad text -----------------------------------


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], rows[1:]


def _text(header: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([header, *rows])
    return out.getvalue()


def cell(column: str, value: str, row: int = 4):
    """Set `column` of file row `row` (header: row 1) to `value`."""

    def edit(text):
        header, rows = _table(text)
        rows[row - 2][header.index(column)] = value
        return _text(header, rows)

    return edit


def every(column: str, value: str):
    def edit(text):
        header, rows = _table(text)
        for r in rows:
            r[header.index(column)] = value
        return _text(header, rows)

    return edit


def drop_column(column: str):
    def edit(text):
        header, rows = _table(text)
        i = header.index(column)
        return _text(
            [h for j, h in enumerate(header) if j != i], [[v for j, v in enumerate(r) if j != i] for r in rows]
        )

    return edit


def keep_rows(keep):
    """Only the data rows for which keep(dict of the row) is true."""

    def edit(text):
        header, rows = _table(text)
        return _text(header, [r for r in rows if keep(dict(zip(header, r)))])

    return edit


def _kernel_id(r: dict) -> str:
    group = r["group_size"] or "0"
    keys = ("impl", "bits", "batch", "q_heads", "kv_heads", "head_dim", "context")
    return "|".join([r["impl"], r["bits"], group, *(r[k] for k in keys[2:])])


def fp16_training(n: int):
    """n training rows of the kvq_fp16 family and nothing else."""
    seen = []

    def keep(r):
        if r["impl"] == "kvq_fp16" and is_training(_kernel_id(r)) and len(seen) < n:
            seen.append(r)
            return True
        return False

    return keep_rows(keep)


def scale_family(impl: str, factors: tuple[float, ...]):
    """Times of one kernel implementation multiplied by factors in turn: a family whose fit is poor."""

    def edit(text):
        header, rows = _table(text)
        i, t = header.index("impl"), header.index("time_us")
        picked = [r for r in rows if r[i] == impl]
        for n, r in enumerate(picked):
            r[t] = f"{float(r[t]) * factors[n % len(factors)]:.2f}"
        return _text(header, rows)

    return edit


def raw(fn):
    """An edit of the file's bytes (not its CSV cells)."""
    fn.raw = True
    return fn


@raw
def non_utf8(data: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[4] = lines[4].replace(b"NVIDIA", b"NVID\xffA", 1)  # row 5
    return b"\n".join(lines)


@raw
def truncated(data: bytes) -> bytes:
    return data[: data.rindex(b",", 0, len(data) - 40)]  # the last row cut after a comma


@raw
def open_quote(data: bytes) -> bytes:
    return data + b'NVIDIA H100 80GB HBM3,"580.159\n'


@raw
def empty(data: bytes) -> bytes:
    return b""


@raw
def header_only(data: bytes) -> bytes:
    return data.split(b"\n", 1)[0] + b"\n"


@raw
def duplicated_row(data: bytes) -> bytes:
    return data + data.split(b"\n")[1] + b"\n"


# --- kernel CSV: (id, edit, message regex); each runs through calibrate and validate ---------------------------------
KERNEL = [
    ("non-utf8-UnicodeDecodeError", non_utf8, r"bad\.csv, row 5: not UTF-8 text \(byte \d+\)"),
    ("truncated-last-row", truncated, r"bad\.csv, row 423: \d+ fields, the header has 23 \(truncated"),
    ("truncated-inside-quotes", open_quote, r"bad\.csv, row 42\d: malformed CSV"),
    ("empty-file", empty, r"bad\.csv: empty file; expected a header with device, "),
    ("header-only", header_only, r"bad\.csv: no data rows"),
    ("missing-column-time_us", drop_column("time_us"), r"bad\.csv: missing column\(s\) time_us; expected at least"),
    ("missing-column-device", drop_column("device"), r"bad\.csv: missing column\(s\) device"),
    (
        "time_us-text-TypeError",
        cell("time_us", "fast"),
        r"bad\.csv, row 4, column 'time_us': expected a number, got 'fast'",
    ),
    (
        "time_us-nan",
        cell("time_us", "nan"),
        r"bad\.csv, row 4, column 'time_us': must be a finite number above 0, got 'nan'",
    ),
    ("time_us-inf", cell("time_us", "inf"), r"row 4, column 'time_us': must be a finite number above 0, got 'inf'"),
    ("time_us-minus-inf", cell("time_us", "-inf"), r"row 4, column 'time_us': must be a finite number above 0"),
    (
        "time_us-zero-ZeroDivisionError",
        cell("time_us", "0"),
        r"row 4, column 'time_us': must be a finite number above 0, got '0'",
    ),
    ("time_us-negative", cell("time_us", "-3.5"), r"row 4, column 'time_us': must be a finite number above 0"),
    ("time_us-empty", cell("time_us", ""), r"row 4, column 'time_us': expected a number, got ''"),
    ("time_us-underscore", cell("time_us", "1_0"), r"row 4, column 'time_us': expected a number, got '1_0'"),
    ("bytes_read-zero", cell("bytes_read", "0"), r"row 4, column 'bytes_read': must be at least 1, got 0"),
    ("bits-fraction", cell("bits", "2.5", 200), r"row 200, column 'bits': expected a whole number, got '2.5'"),
    ("batch-1.5-was-truncated", cell("batch", "1.5"), r"row 4, column 'batch': expected a whole number, got '1.5'"),
    ("context-5000-digits", cell("context", "9" * 5000), r"row 4, column 'context': expected a whole number"),
    ("kv_heads-zero", cell("kv_heads", "0"), r"row 4, column 'kv_heads': must be at least 1, got 0"),
    ("kv_heads-not-dividing-q_heads", cell("kv_heads", "5"), r"row 4, column 'kv_heads': 5 does not divide q_heads 32"),
    ("impl-empty", cell("impl", ""), r"row 4, column 'impl': empty kernel name"),
    (
        "device-other-gpu",
        cell("device", "NVIDIA A100-SXM4-80GB", 9),
        r"row 9, column 'device': measured on 'NVIDIA A100-SXM4-80GB'",
    ),
    (
        "point-measured-twice",
        duplicated_row,
        r"bad\.csv, row 424: point sdpa_flash_fp16\|16\|0\|1\|32\|32\|128\|1024 repeats row 2",
    ),
]


def _write_bad(root: Path, source: str, edit) -> Path:
    data = (root / source).read_bytes()
    bad = root / "bad.csv"
    bad.write_bytes(edit(data) if getattr(edit, "raw", False) else edit(data.decode()).encode())
    return bad


@pytest.mark.parametrize("command", ["calibrate", "validate"])
@pytest.mark.parametrize("edit,message", [c[1:] for c in KERNEL], ids=[c[0] for c in KERNEL])
def test_bad_kernel_csv(cli, world, command, edit, message):
    _write_bad(world, K, edit)
    before = cli.snapshot(_protected(world))
    r = cli.run(SIM, [command, "--gpu", GPU, "--measurements", "bad.csv", "--e2e", E], cwd=world, env=_env(world))
    cli.fails(r, message, before=before, code=2)


# --- kernel CSVs that read cleanly but cannot be fitted: calibrate only ---------------------------------------------
UNFITTABLE = [
    (
        "all-equal-times-written-into-configs-hardware",
        every("time_us", "10.0"),
        r"bad\.csv: kernel family \w+: all \d+ training times are 10 us",
    ),
    (
        "nan-times-fitted-into-configs-hardware",
        every("time_us", "nan"),
        r"bad\.csv, row 2, column 'time_us': must be a finite number",
    ),
    (
        "too-few-training-points",
        fp16_training(2),
        r"bad\.csv: kernel family kvq_fp16: 2 training point\(s\), at least 3 needed",
    ),
    (
        "no-training-point",
        keep_rows(lambda r: not is_training(_kernel_id(r))),
        r"bad\.csv: all \d+ points are held out for validation; no training point",
    ),
    (
        "worse-fit-than-the-file",
        scale_family("kvq_fp16", (0.6, 1.4, 1.0)),
        r"h100-80g\.yaml not written: the new fit is worse \(kvq_fp16: training MAPE [\d.]+% \(above 20%\).*--accept-worse-fit",
    ),
    (
        "fit-drops-families-of-the-file",
        keep_rows(lambda r: r["impl"] == "kvq_fp16"),
        r"not written: the new fit is worse \(kvq_kivi_2b_gqa: fitted in the file, missing from these measurements",
    ),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in UNFITTABLE], ids=[c[0] for c in UNFITTABLE])
def test_unfittable_kernel_csv_is_not_written(cli, world, edit, message):
    _write_bad(world, K, edit)
    before = cli.snapshot(_protected(world))
    r = cli.run(SIM, [*CAL, "bad.csv"], cwd=world, env=_env(world))
    cli.fails(r, message, before=before, code=2)
    assert not (world / f"{FIT}.bak").exists()


# --- e2e CSV: (id, edit, message regex); each runs through calibrate and validate ------------------------------------
E2E = [
    ("e2e-non-utf8", non_utf8, r"bad\.csv, row 5: not UTF-8 text"),
    (
        "e2e-missing-max_allocated_bytes",
        drop_column("max_allocated_bytes"),
        r"bad\.csv: missing column\(s\) max_allocated_bytes",
    ),
    (
        "e2e-step_us-nan",
        cell("step_us", "NaN", 3),
        r"bad\.csv, row 3, column 'step_us': must be a finite number above 0, got 'NaN'",
    ),
    ("e2e-step_us-zero", cell("step_us", "0", 3), r"row 3, column 'step_us': must be a finite number above 0"),
    (
        "e2e-cache_bytes-text",
        cell("cache_bytes", "2GB", 3),
        r"row 3, column 'cache_bytes': expected a whole number, got '2GB'",
    ),
    (
        "e2e-backend-unknown",
        cell("backend", "vllm", 3),
        r"row 3, column 'backend': unknown backend 'vllm'; valid: sdpa, kvq",
    ),
    ("e2e-sdpa-with-4-bits", cell("bits", "4", 3), r"row 3, column 'bits': sdpa steps store 16 bits, got 4"),
    (
        "e2e-kvq-5-bits-KeyError",
        cell("bits", "5", 10),
        r"row 10, column 'bits': kvq steps store 16, 8, 4, 3, 2 bits, got 5",
    ),
]


@pytest.mark.parametrize("command", ["calibrate", "validate"])
@pytest.mark.parametrize("edit,message", [c[1:] for c in E2E], ids=[c[0] for c in E2E])
def test_bad_e2e_csv(cli, world, command, edit, message):
    _write_bad(world, E, edit)
    before = cli.snapshot(_protected(world))
    r = cli.run(SIM, [command, "--gpu", GPU, "--measurements", K, "--e2e", "bad.csv"], cwd=world, env=_env(world))
    cli.fails(r, message, before=before, code=2)


def test_e2e_all_equal_step_times_are_not_fitted(cli, world):
    _write_bad(world, E, every("step_us", "9000"))
    before = cli.snapshot(_protected(world))
    r = cli.run(SIM, [*CAL, K, "--e2e", "bad.csv"], cwd=world, env=_env(world))
    cli.fails(r, r"e2e: all \d+ training steps take 9000 us while batch and context differ", before=before, code=2)


def test_validate_time_us_inf_no_longer_passes(cli, world):
    """A `time_us=inf` row must not pass validate: the inf sits on a held-out point, the ones validate reads."""
    header, rows = _table((world / K).read_text())
    line = next(n for n, r in enumerate(rows, 2) if not is_training(_kernel_id(dict(zip(header, r)))))
    _write_bad(world, K, cell("time_us", "inf", line))
    before = cli.snapshot(_protected(world))
    r = cli.run(SIM, [*VAL, "bad.csv", "--e2e", E], cwd=world, env=_env(world))
    cli.fails(r, rf"bad\.csv, row {line}, column 'time_us': must be a finite number above 0, got 'inf'", before, 2)


# --- calibrate arguments and destinations: (id, args, message regex) -------------------------------------------------
CALIBRATE = [
    (
        "transfer-from-h100-80g-to-itself",
        ["calibrate", "--gpu", GPU, "--transfer-from", GPU],
        r"--transfer-from h100-80g is the GPU being calibrated",
    ),
    (
        "transfer-from-itself-by-path",
        ["calibrate", "--gpu", GPU, "--transfer-from", "configs/hardware/h100-80g.yaml"],
        r"--transfer-from configs/hardware/h100-80g\.yaml is the GPU being calibrated",
    ),
    (
        "transfer-over-measured-calibration",
        ["calibrate", "--gpu", GPU, "--transfer-from", "h200"],
        r"h100-80g\.yaml holds a calibration measured on this GPU; refusing to replace it.*--overwrite-measured",
    ),
    (
        "transfer-from-uncalibrated-gpu",
        ["calibrate", "--gpu", "a100-80g", "--transfer-from", "l40s"],
        r"l40s is not calibrated from measurements",
    ),
    (
        "transfer-from-unknown-gpu",
        ["calibrate", "--gpu", "h200", "--transfer-from", "h100"],
        r"unknown GPU 'h100'; valid: ",
    ),
    (
        "measurements-and-transfer",
        [*CAL, K, "--transfer-from", "h200"],
        r"give --measurements \(and --e2e\) or --transfer-from, not both",
    ),
    (
        "neither-measurements-nor-transfer",
        ["calibrate", "--gpu", GPU],
        r"give --measurements \(a kernel decode CSV\) or --transfer-from",
    ),
    ("measurements-missing-file", [*CAL, "nope.csv"], r"measurement file nope\.csv does not exist"),
    ("measurements-is-a-directory", [*CAL, "configs"], r"measurement file configs is a directory, not a CSV file"),
    (
        "gpu-without-torch-device-name",
        ["calibrate", "--gpu", "a100-80g", "--measurements", K],
        r"no field 'torch_device_name'",
    ),
    (
        "validate-uncalibrated-gpu-csv-of-h100",
        ["validate", "--gpu", "l40s", "--measurements", K],
        r"no field 'torch_device_name'",
    ),
]


@pytest.mark.parametrize("args,message", [c[1:] for c in CALIBRATE], ids=[c[0] for c in CALIBRATE])
def test_bad_calibrate_arguments(cli, world, args, message):
    before = cli.snapshot(_protected(world))
    r = cli.run(SIM, args, cwd=world, env=_env(world))
    cli.fails(r, message, before=before, code=2)


def test_calibrate_backup_name_taken_by_a_directory(cli, world):
    """A directory (or any file) at the fit file's backup name is left alone: the previous fit goes to the next
    free name, which the last line names."""
    (world / f"{FIT}.bak").mkdir()
    fit = world / FIT
    old = fit.read_bytes() + b"# an edit the refit replaces\n"
    fit.write_bytes(old)
    r = cli.run(SIM, [*CAL, K, "--e2e", E], cwd=world, env=_env(world))
    assert r.returncode == 0, r.stderr
    assert (world / f"{FIT}.bak").is_dir() and (world / f"{FIT}.1.bak").read_bytes() == old
    assert r.stdout.splitlines()[-1].startswith(f"wrote calibration to {FIT} (previous version: {FIT}.1.bak)")


# --- report -o: checked before rendering (id, output, message regex) --------------------------------------------------
REPORT = [
    (
        "report-o-unwritable-fails-after-rendering",
        "/proc/kvq-report.pdf",
        r"report /proc/kvq-report\.pdf: cannot write in /proc",
    ),
    ("report-o-existing-non-pdf", "notes.md", r"report notes\.md exists and is not a PDF; refusing to overwrite it"),
    ("report-o-directory", "configs", r"report configs is a directory, not a file"),
    ("report-o-below-a-file", "notes.md/out.pdf", r"report notes\.md/out\.pdf: notes\.md is not a directory"),
]


@pytest.mark.parametrize("output,message", [c[1:] for c in REPORT], ids=[c[0] for c in REPORT])
def test_bad_report_output(cli, world, output, message):
    (world / "notes.md").write_text("# my notes\n")
    before = cli.snapshot(_protected(world))
    r = cli.run(SIM, ["report", "--model", "llama-7b", "--gpu", GPU, "-o", output], cwd=world, env=_env(world))
    cli.fails(r, message, before=before, code=2)


def test_report_with_a_non_utf8_measurement_leaves_no_pdf(cli, world):
    (world / "m").mkdir()
    (world / "q").mkdir()
    (world / "m" / report_data.KERNEL_CSV).write_bytes(non_utf8((world / K).read_bytes()))
    before = cli.snapshot(_protected(world))
    args = ["report", "--model", "llama-7b", "--gpu", GPU, "--measurements", "m", "--quality", "q", "-o", "r.pdf"]
    r = cli.run(SIM, args, cwd=world, env=_env(world))
    cli.fails(r, rf"m/{re.escape(report_data.KERNEL_CSV)}, row 5: not UTF-8 text", before=before, code=2)
    assert sorted(p.name for p in world.iterdir() if p.name.endswith((".pdf", ".tmp"))) == []


# --- positive controls -------------------------------------------------------------------------------------------------


def test_committed_measurements_calibrate_unchanged_and_validate(cli, world):
    yaml = world / FIT
    before = cli.snapshot(_protected(world))
    r = cli.run(SIM, [*CAL, K, "--e2e", E], cwd=world, env=_env(world))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"{FIT} already holds this calibration; not rewritten"
    r = cli.run(SIM, [*VAL, K, "--e2e", E], cwd=world, env=_env(world))
    assert r.returncode == 0, r.stderr
    assert "PASS kernel: 162 held-out points" in r.stdout
    assert cli.snapshot(_protected(world)) == before
    assert not yaml.with_name(yaml.name + ".bak").exists()


def test_calibrate_replaces_atomically_and_keeps_the_old_file(cli, world):
    yaml = world / FIT
    old = yaml.read_bytes()
    shutil.copy(MEASURED / "kernel_decode_h100_repeat.csv", world / "repeat.csv")
    r = cli.run(SIM, [*CAL, "repeat.csv"], cwd=world, env=_env(world))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"wrote calibration to {FIT} (previous version: {FIT}.bak)"
    assert yaml.read_bytes() != old
    assert "file: repeat.csv" in yaml.read_text()
    assert yaml.with_name(yaml.name + ".bak").read_bytes() == old
    assert sorted(p.name for p in yaml.parent.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_flags_allow_what_is_refused_without_them(cli, world):
    hw = world / "configs" / "hardware"
    measured = (world / FIT).read_bytes()
    shutil.copy(hw / f"{GPU}.yaml", hw / "h100-twin.yaml")  # another measured GPU to transfer from
    r = cli.run(
        SIM,
        ["calibrate", "--gpu", GPU, "--transfer-from", "h100-twin", "--overwrite-measured"],
        cwd=world,
        env=_env(world),
    )
    assert r.returncode == 0, r.stderr
    assert "transferred_from: h100-twin" in (world / FIT).read_text()
    assert (world / f"{FIT}.bak").read_bytes() == measured
    _write_bad(world, K, scale_family("kvq_fp16", (0.6, 1.4, 1.0)))
    r = cli.run(SIM, [*CAL, "bad.csv", "--accept-worse-fit"], cwd=world, env=_env(world))
    assert r.returncode == 0, r.stderr
    assert "calibrated: true" in (world / FIT).read_text()


def test_dry_run_writes_nothing_and_warns_of_a_worse_fit(cli, world):
    _write_bad(world, K, scale_family("kvq_fp16", (0.6, 1.4, 1.0)))
    before = cli.snapshot(_protected(world))
    r = cli.run(SIM, [*CAL, "bad.csv", "--dry-run"], cwd=world, env=_env(world))
    assert r.returncode == 0, r.stderr
    assert "warning: without --accept-worse-fit this fit would not be written: kvq_fp16: training MAPE" in r.stderr
    assert r.stdout.startswith("h100-80g: fitted 10 kernel families")
    assert cli.snapshot(_protected(world)) == before


def test_report_replaces_an_earlier_pdf_and_keeps_it(cli, world):
    (world / "r.pdf").write_bytes(b"%PDF-1.4 an earlier report\n")
    (world / "none").mkdir()  # named folders must exist; this one holds no CSV
    args = ["report", "--model", "llama-7b", "--gpu", GPU, "--methods", "kivi:2", "--measurements", "none"]
    r = cli.run(SIM, [*args, "--quality", "none", "-o", "r.pdf"], cwd=world, env=_env(world))
    assert r.returncode == 0, r.stderr
    assert (world / "r.pdf").read_bytes()[:5] == b"%PDF-"
    assert (world / "r.pdf.bak").read_bytes() == b"%PDF-1.4 an earlier report\n"
