"""`kvq-sim report`: the numbers behind each PDF page, computed without matplotlib, and the PDF writer.

The data functions here return plain dataclasses and dicts (testable, no plotting); `figures.py` draws
them. Determinism: the PDF carries no creation date unless SOURCE_DATE_EPOCH is set (then that date),
a fixed Producer, and no absolute paths, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .api import deployment
from .deployment import Deployment
from .errors import SimInputError
from .files import check_destination, replacing
from .hardware import GIB, load_hardware
from .latency import decode_step, decode_terms
from .memory import memory
from .models import load_model
from .planner import check_weights_fit, max_batch, max_context

#: methods drawn when --methods is not given: fp16 baseline, plain int, and the three seed methods
DEFAULT_METHODS = "fp16,int:8,int:4,kivi:4,kivi:2,kvquant:3,kvquant:2,skvq:k2v1.5"
#: contexts of the sweep pages: 1K to 2M tokens in powers of 2 (the 2-bit limits on 80 GB sit near 1M)
DEFAULT_CONTEXTS = tuple(1 << k for k in range(10, 22))
#: context at which the roofline page places each method's attention operator
ROOFLINE_CONTEXT = 32768
#: batches at which the roofline page places the weight GEMMs
ROOFLINE_BATCHES = (1, 16, 256)
MEASUREMENTS_DIR = Path("reports/measurements")
QUALITY_DIR = Path("reports/quality")
KERNEL_CSV = "kernel_decode_h100.csv"
E2E_CSV = "e2e_decode_h100.csv"
#: measured device name (CSV `device` column) -> hardware config; looked up exactly
DEVICE_HARDWARE = {"NVIDIA H100 80GB HBM3": "h100-80g", "NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100-80g"}
QUALITY_COLUMNS = ("method", "bits", "avg_bits", "ppl", "protocol")
PRODUCER = "kvq-sim report"


@dataclass(frozen=True)
class Series:
    """One KV method at one bit width, e.g. kivi 2-bit; `label` is what legends show."""

    method: str
    bits: str | None

    @property
    def label(self) -> str:
        return "fp16" if self.method == "fp16" else f"{self.method} {self.bits}-bit"


def parse_methods(spec: str) -> list[Series]:
    """'kivi:2,kvquant:3,fp16' -> Series list, fp16 first (added when missing: every page compares to it)."""
    out: list[Series] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        method, _, bits = item.partition(":")
        s = Series(method.strip(), bits.strip() or None)
        if s not in out:
            out.append(s)
    fp16 = [s for s in out if s.method == "fp16"] or [Series("fp16", None)]
    return fp16[:1] + [s for s in out if s.method != "fp16"]


@dataclass(frozen=True)
class Inputs:
    """What the report was asked for, resolved: every name checked before any page is drawn."""

    model: str
    gpus: tuple[str, ...]
    series: tuple[Series, ...]
    contexts: tuple[int, ...]
    measurements_dir: Path
    quality_dir: Path
    deps: dict = field(compare=False, repr=False)  # (gpu, Series) -> Deployment


def resolve_inputs(
    model: str,
    gpus: list[str],
    methods: str = DEFAULT_METHODS,
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS,
    measurements_dir: Path = MEASUREMENTS_DIR,
    quality_dir: Path = QUALITY_DIR,
) -> Inputs:
    """Load and validate model, GPUs and methods (SimInputError with the valid names on a bad one)."""
    if not gpus:
        raise SimInputError("give at least one --gpu")
    series = parse_methods(methods)
    shape = load_model(model)
    deps = {}
    for g in dict.fromkeys(gpus):
        hw = load_hardware(g)
        for s in series:
            dep = deployment(shape, hw, s.bits, s.method, 16, 1, "tp")
            check_weights_fit(dep)
            deps[g, s] = dep
    return Inputs(
        shape.name, tuple(dict.fromkeys(gpus)), tuple(series), tuple(contexts), measurements_dir, quality_dir, deps
    )


def versions() -> dict[str, str]:
    """Versions printed on the title page (packages, python, plotting stack)."""
    import matplotlib
    import numpy

    out = {}
    for dist in ("kvq-core", "kvq-sim"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out.update(python=platform.python_version(), matplotlib=matplotlib.__version__, numpy=numpy.__version__)
    return out


def report_date() -> datetime.datetime | None:
    """SOURCE_DATE_EPOCH as a UTC date when set (reproducible-builds convention), else None: no date."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return None
    try:
        return datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc)
    except ValueError:
        raise SimInputError(f"SOURCE_DATE_EPOCH must be an integer (seconds), got {epoch!r}") from None


# ---- memory: breakdown at each method's max context ------------------------------------------------

#: (label, MemoryBreakdown field) in stacking order
MEMORY_PARTS = (
    ("weights", "weights_bytes"),
    ("KV codes", "kv_codes_bytes"),
    ("KV scales + zeros", "kv_scales_zeros_bytes"),
    ("KV outliers", "kv_outliers_bytes"),
    ("KV in fp16 (window, sinks; fp16 cache)", "kv_full_precision_bytes"),
    ("KV per-layer shared", "kv_shared_bytes"),
    ("activations", "activation_bytes"),
    ("allocator rounding", "allocator_rounding_bytes"),
    ("CUDA context + workspace", "reserve_bytes"),
)


@dataclass(frozen=True)
class MemoryBar:
    series: Series
    max_context: int | None  # None: a sliding window caps the cache (bar drawn at the window)
    gib: dict[str, float]  # MEMORY_PARTS label -> GiB
    usable_gib: float
    avg_bits: float  # KV bits per element at this context, all metadata included


@lru_cache(maxsize=64)
def memory_bars(inp: Inputs, gpu: str) -> tuple[MemoryBar, ...]:
    bars = []
    for s in inp.series:
        dep = inp.deps[gpu, s]
        ctx = max_context(dep, 1)
        at = ctx if ctx is not None else (dep.model.sliding_window or 1)
        mb = memory(dep, 1, max(at, 1))
        bars.append(
            MemoryBar(
                s,
                ctx,
                {label: getattr(mb, f) / GIB for label, f in MEMORY_PARTS},
                mb.usable_bytes / GIB,
                _avg_bits(dep, max(at, 1)),
            )
        )
    return tuple(bars)


def _avg_bits(dep: Deployment, context: int) -> float:
    from .memory import kv_tokens_per_gpu

    return dep.kv_format.avg_bits(max(kv_tokens_per_gpu(dep, context), 1), dep.kv_heads_per_gpu, dep.model.head_dim)


# ---- sweeps over context --------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextSweep:
    """Per context (only those where batch 1 fits): batch-1 step, max batch, and throughput at max batch."""

    series: Series
    contexts: tuple[int, ...]
    step_ms: tuple[float, ...]  # batch 1
    bound: tuple[str, ...]  # batch 1
    max_batch: tuple[int, ...]
    tokens_per_s: tuple[float, ...]  # at max batch
    bound_at_max_batch: tuple[str, ...]


@lru_cache(maxsize=256)
def context_sweep(inp: Inputs, gpu: str, s: Series) -> ContextSweep:
    dep = inp.deps[gpu, s]
    rows = []
    for c in inp.contexts:
        b = max_batch(dep, c)
        if not b:
            continue
        t1, tb = decode_step(dep, 1, c), decode_step(dep, b, c)
        rows.append((c, t1.step_s * 1e3, t1.bound, b, tb.tokens_per_s, tb.bound))
    cols = list(zip(*rows)) if rows else [()] * 6
    return ContextSweep(s, *map(tuple, cols))


# ---- roofline ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RooflinePoint:
    label: str
    series: Series | None  # None for the weight GEMMs (method independent)
    intensity: float  # FLOP / byte
    tflops: float  # attainable with the effective bandwidth and peak


@dataclass(frozen=True)
class Roofline:
    gpu: str
    peak_tflops: float  # datasheet dense fp16
    hbm_tb_s: float  # datasheet
    eff_peak_tflops: float
    eff_weight_tb_s: float
    calibrated: bool
    points: tuple[RooflinePoint, ...]


def roofline(inp: Inputs, gpu: str) -> Roofline:
    pts = []
    base = inp.deps[gpu, inp.series[0]]
    for b in ROOFLINE_BATCHES:
        t = decode_terms(base, b, ROOFLINE_CONTEXT)
        i = t.gemm_flops / t.weight_bytes
        pts.append(RooflinePoint(f"GEMMs, batch {b}", None, i, min(t.peak_flops, i * t.weight_bw) / 1e12))
    for s in inp.series:
        t = decode_terms(inp.deps[gpu, s], 1, ROOFLINE_CONTEXT)
        i = t.attn_flops / t.kv_bytes
        pts.append(RooflinePoint(f"attention, {s.label}", s, i, min(t.peak_flops, i * t.kv_bw) / 1e12))
    hw, t = base.hardware, decode_terms(base, 1, ROOFLINE_CONTEXT)
    return Roofline(
        gpu,
        hw.fp16_dense_tflops,
        hw.hbm_bandwidth_gb_s / 1e3,
        t.peak_flops / 1e12,
        t.weight_bw / 1e12,
        hw.calibration.calibrated,
        tuple(pts),
    )


# ---- predicted vs measured --------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Predicted vs measured times of one measurement file, or why there are none."""

    title: str
    path: Path
    missing: str | None  # the explanation when the file cannot be used
    groups: dict[str, tuple[list[float], list[float], list[int]]] = field(default_factory=dict)  # (pred, meas, ctx)
    model_note: str = ""

    @property
    def rel_errors(self) -> list[float]:
        return [p / m - 1 for pr, me, _ in self.groups.values() for p, m in zip(pr, me)]


def _read_csv(path: Path) -> list[dict]:
    """The rows of a CSV as dicts; an unreadable, non-UTF-8 or malformed file is a SimInputError naming it."""
    try:
        data = path.read_bytes()
        return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    except UnicodeDecodeError as e:
        row = data.count(b"\n", 0, e.start) + 1
        raise SimInputError(f"{path}, row {row}: not UTF-8 text (byte {e.start})") from None
    except (csv.Error, OSError) as e:
        raise SimInputError(f"{path}: unreadable CSV ({e})") from None


def _hardware_for(rows: list[dict], path: Path):
    devices = sorted({r.get("device", "") for r in rows})
    if len(devices) != 1 or devices[0] not in DEVICE_HARDWARE:
        raise SimInputError(
            f"{path.name}: device {devices} has no hardware config; known: {', '.join(DEVICE_HARDWARE)}"
        )
    return load_hardware(DEVICE_HARDWARE[devices[0]])


def _open_measurements(path: Path, title: str, cmd: str, need: set[str]):
    """(device, hardware) of a measurement CSV, or a Comparison saying why the file cannot be used."""
    if not path.exists():
        return Comparison(title, path, f"{path} is missing; produce it with:\n  {cmd}")
    rows = _read_csv(path)
    if not rows or not need <= set(rows[0]):
        return Comparison(title, path, f"{path} lacks columns {sorted(need - set(rows[0] if rows else ()))}")
    try:
        return rows[0]["device"], _hardware_for(rows, path)
    except SimInputError as e:
        return Comparison(title, path, str(e))


def kernel_comparison(directory: Path) -> Comparison:
    """Attention kernels alone, held-out points, predicted by the calibrated per-family model (as validate)."""
    path = directory / KERNEL_CSV
    title = "attention kernel, one layer"
    cmd = "python packages/kvq-kernels/benchmarks/bench_decode.py --out reports/measurements  (on an H100)"
    opened = _open_measurements(path, title, cmd, {"impl", "bits", "bytes_read", "time_us", "context", "device"})
    if isinstance(opened, Comparison):
        return opened
    device, hw = opened
    from .measurements import read_kernel_csv, split
    from .validate import predict_kernel

    groups: dict[str, tuple[list[float], list[float], list[int]]] = {}
    _, held = split(read_kernel_csv(path, device)[0])
    for p in held:  # held-out points only: the calibration never saw them
        pred = predict_kernel(hw, p)
        if pred is None:
            continue
        key = p.impl if p.impl.endswith("fp16") else f"{p.impl} {p.bits}-bit"
        g = groups.setdefault(key, ([], [], []))
        g[0].append(pred)
        g[1].append(p.time_us)
        g[2].append(p.context)
    note = (
        f"held-out points; predicted: kvq-sim's per-family kernel model on {hw.name} "
        f"({'calibrated on the training half' if hw.calibration.calibrated else hw.calibration.status})"
    )
    return Comparison(title, path, None, groups, note)


def e2e_comparison(directory: Path, model: str = "llama-7b") -> Comparison:
    """Whole decode step of a LLaMA-7B shape, held-out steps, predicted by the calibrated step model (as validate)."""
    path = directory / E2E_CSV
    title = "end-to-end decode step, llama-7b shape"
    cmd = "python benchmarks/e2e_decode.py --out reports/measurements/e2e_decode_h100.csv  (on an H100)"
    opened = _open_measurements(path, title, cmd, {"backend", "bits", "batch", "context", "step_us", "device"})
    if isinstance(opened, Comparison):
        return opened
    device, hw = opened
    from .measurements import read_e2e_csv, split
    from .validate import predict_e2e

    groups: dict[str, tuple[list[float], list[float], list[int]]] = {}
    _, held = split(read_e2e_csv(path, device)[0])
    for p in held:  # held-out steps only
        pred, _ = predict_e2e(hw, p)
        if pred is None:
            continue
        key = f"{p.backend} fp16" if p.bits == 16 else f"{p.backend} {p.bits}-bit"
        g = groups.setdefault(key, ([], [], []))
        g[0].append(pred)
        g[1].append(p.step_us)
        g[2].append(p.context)
    note = f"held-out steps; predicted: kvq-sim's eager decode-step model on {hw.name} ({model} shape, fp16 weights)"
    return Comparison(title, path, None, groups, note)


# ---- quality ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quality:
    """Rows (method, bits, avg_bits, ppl, protocol) from reports/quality/*.csv, and files that were skipped."""

    directory: Path
    rows: tuple[dict, ...]
    skipped: tuple[str, ...]  # "file: reason"

    @property
    def missing(self) -> str | None:
        if self.rows:
            return None
        cmd = (
            "python scripts/eval_perplexity.py --protocol decode --start 512 --caches ... "
            f"--csv {self.directory}/<name>.csv"
        )
        why = "\n".join(f"  {s}" for s in self.skipped) or f"  no CSV files in {self.directory}"
        return (
            f"No usable quality results: the page needs CSVs in {self.directory}/ with columns "
            f"{', '.join(QUALITY_COLUMNS)}.\n{why}\nProduce them with the quality evaluation, e.g.:\n  {cmd}"
        )


def quality(directory: Path) -> Quality:
    rows, skipped = [], []
    files = sorted(directory.glob("*.csv")) if directory.is_dir() else []
    for path in files:
        try:
            data = _read_csv(path)
        except SimInputError as e:
            skipped.append(str(e).replace(str(path), path.name, 1))
            continue
        lacking = [c for c in QUALITY_COLUMNS if not data or c not in data[0]]
        if lacking:
            skipped.append(f"{path.name}: lacks columns {', '.join(lacking)}")
            continue
        for r in data:
            try:
                rows.append(
                    dict(
                        method=r["method"],
                        bits=r["bits"],
                        avg_bits=float(r["avg_bits"]),
                        ppl=float(r["ppl"]),
                        protocol=r["protocol"],
                        model=r.get("model", ""),
                    )
                )
            except ValueError:
                skipped.append(f"{path.name}: unreadable row {r}")
    rows = [r for r in rows if math.isfinite(r["ppl"]) and math.isfinite(r["avg_bits"])]
    return Quality(directory, tuple(rows), tuple(skipped))


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both axes (lower bits and lower perplexity are better), by increasing bits."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


# ---- the PDF ----------------------------------------------------------------------------------------


PDF_MAGIC = b"%PDF-"


def check_output(out: Path) -> None:
    """Before any rendering: `out` can be written, and is not an existing file other than a PDF (a report
    replaces only an earlier PDF, whose bytes it keeps in `<name>.bak`)."""
    check_destination(out, "report")
    if out.is_file():
        with open(out, "rb") as f:
            head = f.read(len(PDF_MAGIC))
        if head != PDF_MAGIC:
            raise SimInputError(
                f"report {out} exists and is not a PDF; refusing to overwrite it (remove it or choose another -o)"
            )


def write_report(inp: Inputs, out: Path) -> int:
    """Draw every page into `out` (a PDF) atomically; return the page count. `check_output` first."""
    from matplotlib.backends.backend_pdf import PdfPages

    from .figures import build_pages, rc

    date = report_date()
    meta = {"Creator": PRODUCER, "Producer": PRODUCER, "CreationDate": date, "ModDate": date}
    meta["Title"] = f"kvq-sim report: {inp.model} on {', '.join(inp.gpus)}"
    import matplotlib

    with matplotlib.rc_context(rc()):
        pages = build_pages(inp)
        with replacing(out) as tmp, PdfPages(tmp, metadata=meta) as pdf:
            for fig in pages:
                pdf.savefig(fig)
    return len(pages)
