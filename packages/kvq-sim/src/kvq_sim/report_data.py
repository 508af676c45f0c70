"""Every number `kvq-sim report` shows, computed without matplotlib, as dataclasses and a JSON-ready dict.

`figures.py` draws a `ReportData` and computes nothing the reader sees; `report.py` assembles the PDF.
`python -m kvq_sim.report_data --model llama-7b --gpu a100-80g -o data.json` writes the dict as JSON
(floats to 6 significant digits, so the file is the same on every platform and matplotlib version).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import platform
import re
import statistics
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .api import deployment
from .deployment import Deployment
from .errors import SimInputError
from .hardware import GIB, load_hardware
from .latency import decode_step, decode_terms
from .memory import kv_tokens_per_gpu, memory
from .models import load_model
from .planner import check_weights_fit, max_batch, max_context
from .provenance import KINDS, TERMS, TermSource, term_provenance

#: methods drawn when --methods is not given: fp16 baseline, plain int, and the three seed methods
DEFAULT_METHODS = "fp16,int:8,int:4,kivi:4,kivi:2,kvquant:3,kvquant:2,skvq:k2v1.5"
#: contexts of the sweep pages: 1,024 to 2,097,152 tokens in powers of 2 (the 2-bit limits on 80 GB sit near 1M)
DEFAULT_CONTEXTS = tuple(1 << k for k in range(10, 22))
#: context at which the roofline page places each method's attention operator
ROOFLINE_CONTEXT = 32768
#: batches at which the roofline page places the weight GEMMs
ROOFLINE_BATCHES = (1, 16, 256)
MEASUREMENTS_DIR = Path("reports/measurements")
QUALITY_DIR = Path("reports/quality")
KERNEL_CSV = "kernel_decode_h100_v5.csv"
E2E_CSV = "e2e_decode_h100_v5.csv"
#: measured device name (CSV `device` column) -> hardware config; looked up exactly
DEVICE_HARDWARE = {"NVIDIA H100 80GB HBM3": "h100-80g", "NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100-80g"}
QUALITY_COLUMNS = ("method", "bits", "avg_bits", "held_bits_per_element", "ppl", "protocol", "params")
#: the confidence level of kvq-eval's intervals (kvq_core.eval.paired_change: a 95% percentile bootstrap)
INTERVAL_PCT = 95
#: optional quality columns: kvq-eval's pooled change against the full cache and its 95% interval (files
#: written before kvq-eval reported them lack them: the change is then computed from perplexity, no interval)
CHANGE_COLUMNS = ("change", "change_low", "change_high")
#: the predicted-vs-measured page's band and note: the spread that holds this percentage of the points
SPREAD_PCT = 90
#: significant digits of the floats in the JSON (equal on every platform, exact enough for every label)
JSON_DIGITS = 6
#: methods drawn as the unquantized baseline (black) on every page
BASELINE_METHODS = ("fp16", "full")


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


def bits_value(bits: str | None) -> float:
    """Nominal bits of a method's bit spec, for ordering: '2' -> 2, 'k2v1.5' -> 1.75 (K and V mean), None -> 16."""
    if not bits:
        return 16.0
    kv = re.fullmatch(r"k([\d.]+)v([\d.]+)", bits)
    if kv:
        return (float(kv[1]) + float(kv[2])) / 2
    try:
        return float(bits)
    except ValueError:
        return math.inf


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
    """Versions printed on the title page (packages, python, plotting stack), read without importing them."""
    out = {}
    for dist in ("kvq-core", "kvq-sim", "matplotlib", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["python"] = platform.python_version()
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


# ---- GPUs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuFacts:
    """The datasheet facts the title page lists, and where the latency efficiencies come from."""

    name: str
    usable_gib: float
    hbm_gb_s: float
    fp16_tflops: float
    calibration: str


def gpu_facts(inp: Inputs, gpu: str) -> GpuFacts:
    h = inp.deps[gpu, inp.series[0]].hardware
    return GpuFacts(gpu, h.usable_memory_gib, h.hbm_bandwidth_gb_s, h.fp16_dense_tflops, h.calibration.status)


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


def memory_bars(inp: Inputs, gpu: str) -> tuple[MemoryBar, ...]:
    bars = []
    for s in inp.series:
        dep = inp.deps[gpu, s]
        ctx = max_context(dep, 1)
        at = max(ctx if ctx is not None else (dep.model.sliding_window or 1), 1)
        mb = memory(dep, 1, at)
        gib = {label: getattr(mb, f) / GIB for label, f in MEMORY_PARTS}
        bars.append(MemoryBar(s, ctx, gib, mb.usable_bytes / GIB, _avg_bits(dep, at)))
    return tuple(bars)


def _avg_bits(dep: Deployment, context: int) -> float:
    return dep.kv_format.avg_bits(max(kv_tokens_per_gpu(dep, context), 1), dep.kv_heads_per_gpu, dep.model.head_dim)


def same_memory_groups(gpus: tuple[str, ...], bars: dict[str, tuple[MemoryBar, ...]]) -> tuple[tuple[str, ...], ...]:
    """GPUs whose memory bars are equal, grouped in first-seen order: the memory-only pages (breakdown, max
    batch) draw one panel per group, since the batch that fits depends on memory alone (a100-80g and h100-80g
    both have 85,017,493,504 usable bytes and the same reserve, so their panels would be identical)."""
    groups: list[list[str]] = []
    for g in gpus:
        same = next((grp for grp in groups if bars[grp[0]] == bars[g]), None)
        if same:
            same.append(g)
        else:
            groups.append([g])
    return tuple(tuple(grp) for grp in groups)


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
    batch: int
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
        pts.append(RooflinePoint(f"GEMMs, batch {b}", None, b, i, min(t.peak_flops, i * t.weight_bw) / 1e12))
    for s in inp.series:
        t = decode_terms(inp.deps[gpu, s], 1, ROOFLINE_CONTEXT)
        i = t.attn_flops / t.kv_bytes
        pts.append(RooflinePoint(f"attention, {s.label}", s, 1, i, min(t.peak_flops, i * t.kv_bw) / 1e12))
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
class MeasuredGroup:
    """The held-out points of one implementation at one bit width: predicted and measured times, context."""

    label: str
    method: str  # the KV method whose colour the group takes ("fp16" for fp16 kernels)
    bits: str | None
    predicted_us: tuple[float, ...]
    measured_us: tuple[float, ...]
    context: tuple[int, ...]


@dataclass(frozen=True)
class Comparison:
    """Predicted vs measured times of one measurement file, or why there are none."""

    title: str
    path: Path
    missing: str | None  # the explanation when the file cannot be used
    groups: tuple[MeasuredGroup, ...] = ()
    model_note: str = ""

    @property
    def rel_errors(self) -> list[float]:
        """predicted / measured - 1 of every point."""
        return [p / m - 1 for g in self.groups for p, m in zip(g.predicted_us, g.measured_us)]

    @property
    def median_abs_error_pct(self) -> float:
        return 100 * statistics.median(abs(e) for e in self.rel_errors)

    @property
    def p90_abs_error_pct(self) -> float:
        return 100 * percentile([abs(e) for e in self.rel_errors], SPREAD_PCT)

    @property
    def band_factor(self) -> float:
        """SPREAD_PCT% of points have max(predicted / measured, measured / predicted) at most this factor."""
        return percentile([max(1 + e, 1 / (1 + e)) for e in self.rel_errors], SPREAD_PCT)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method), q in [0, 100]."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


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


def _groups(points: dict[tuple[str, str, str | None], list[tuple[float, float, int]]]) -> tuple[MeasuredGroup, ...]:
    return tuple(
        MeasuredGroup(label, method, bits, *map(tuple, zip(*pts)))
        for (label, method, bits), pts in sorted(points.items())
    )


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

    points: dict = {}
    _, held = split(read_kernel_csv(path, device)[0])
    for p in held:  # held-out points only: the calibration never saw them
        pred = predict_kernel(hw, p)
        if pred is None:
            continue
        if p.impl.endswith("fp16"):
            key = (p.impl, "fp16", None)
        else:  # kvq_kivi: the KIVI codes read by kvq's kernel
            key = (f"{p.impl} {p.bits}-bit", p.impl.removeprefix("kvq_"), str(p.bits))
        points.setdefault(key, []).append((pred, p.time_us, p.context))
    if not points:
        return Comparison(title, path, f"{path}: no held-out point can be predicted: {hw.name} has no fitted kernel "
                          "family; fit one with:\n  make calibrate")  # fmt: skip
    note = (
        f"held-out points; predicted: kvq-sim's per-family kernel model on {hw.name} "
        f"({'calibrated on the training half' if hw.calibration.calibrated else hw.calibration.status})"
    )
    return Comparison(title, path, None, _groups(points), note)


def e2e_comparison(directory: Path, model: str = "llama-7b") -> Comparison:
    """Whole decode step of a LLaMA-7B shape, held-out steps, predicted by the calibrated step model (as validate)."""
    path = directory / E2E_CSV
    title = "end-to-end decode step, llama-7b shape"
    cmd = f"python benchmarks/e2e_decode.py --out reports/measurements/{E2E_CSV}  (on an H100)"
    opened = _open_measurements(path, title, cmd, {"backend", "bits", "batch", "context", "step_us", "device"})
    if isinstance(opened, Comparison):
        return opened
    device, hw = opened
    from .measurements import read_e2e_csv, split
    from .validate import predict_e2e

    points: dict = {}
    _, held = split(read_e2e_csv(path, device)[0])
    for p in held:  # held-out steps only
        pred, _ = predict_e2e(hw, p)
        if pred is None:
            continue
        if p.bits == 16:
            key = (f"{p.backend} fp16", "fp16", None)
        else:  # the kvq backend stores the cache as KIVI codes
            key = (f"{p.backend} {p.bits}-bit", "kivi", str(p.bits))
        points.setdefault(key, []).append((pred, p.step_us, p.context))
    if not points:
        return Comparison(title, path, f"{path}: no held-out step can be predicted: {hw.name} has no fitted kernel "
                          "family; fit one with:\n  make calibrate")  # fmt: skip
    note = f"held-out steps; predicted: kvq-sim's eager decode-step model on {hw.name} ({model} shape, fp16 weights)"
    return Comparison(title, path, None, _groups(points), note)


# ---- provenance: where each latency term's efficiency comes from ---------------------------------

#: what the latency page's legend says of a series' KV read, by provenance kind: whether kvq has a kernel
#: for it (measured on or transferred to a GPU, which the panel title says) or only a prior
KV_READ_TAGS = {
    "measured": "KV read: kvq kernel",
    "transferred": "KV read: kvq kernel",
    "prior": "KV read: no kernel, prior",
}


@dataclass(frozen=True)
class TermProvenance:
    """The provenance of every decode-step term for one GPU and KV series, from `provenance.term_provenance`
    (the function `kvq-sim plan` prints): TERMS order, each with its kind and text."""

    gpu: str
    series: Series
    terms: dict[str, TermSource]

    def __post_init__(self):
        if tuple(self.terms) != TERMS or any(t.kind not in KINDS or not t.text for t in self.terms.values()):
            raise ValueError(f"provenance of {self.gpu} {self.series.label} lacks a term or a kind: {self.terms}")


def provenance(inp: Inputs, gpu: str, s: Series) -> TermProvenance:
    return TermProvenance(gpu, s, term_provenance(inp.deps[gpu, s]))


#: how the provenance page names each term
TERM_LABELS = {
    "weights": "weights",
    "kv_read": "KV read",
    "compute": "compute",
    "interconnect": "interconnect",
    "launch": "launch",
}


def provenance_rows(d: ReportData, gpu: str) -> list[tuple[str, TermSource]]:
    """(label, source) of every term on `gpu` for the provenance page: KV read once per series, the other
    terms once when every series agrees (they do not depend on the KV method), else once per series."""
    provs = [d.provenance[gpu, s] for s in d.inputs.series]
    rows = []
    for k in TERMS:
        if k != "kv_read" and len({p.terms[k] for p in provs}) == 1:
            rows.append((TERM_LABELS[k], provs[0].terms[k]))
        else:
            rows += [(f"{TERM_LABELS[k]}, {p.series.label}", p.terms[k]) for p in provs]
    return rows


def kv_read_tag(provs: list[TermProvenance]) -> str:
    """One series' KV-read provenance over the report's GPUs, for its legend entry: 'KV read: kvq kernel' or
    'KV read: no kernel, prior' when all GPUs agree, else each with its GPUs."""
    by_tag: dict[str, list[str]] = {}
    for p in provs:
        by_tag.setdefault(KV_READ_TAGS[p.terms["kv_read"].kind], []).append(p.gpu)
    if len(by_tag) == 1:
        return next(iter(by_tag))
    return "KV read: " + "; ".join(f"{t.removeprefix('KV read: ')} ({', '.join(g)})" for t, g in by_tag.items())


# ---- quality ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityRow:
    """One cache's result in one panel. `held_bits` per K/V element while scoring (kvq-eval's
    held_bits_per_element); `change_pct` the pooled perplexity change against the full cache with its 95%
    interval when the file reports them (kvq-eval's paired window bootstrap), else computed from perplexity
    against the panel's reference row (`computed`, no interval: files written before kvq-eval reported one)."""

    method: str
    bits: str | None
    avg_bits: float
    held_bits: float
    ppl: float
    change_pct: float
    interval_pct: tuple[float, float] | None  # (low, high) of the 95% interval
    computed: bool
    file: str

    @property
    def label(self) -> str:
        return quality_label(self.method, self.bits)


def quality_label(method: str, bits: str | None) -> str:
    """'kivi 2-bit', or the method alone for a cache without a bit spec ('full', 'fp16')."""
    return method if bits is None else f"{method} {bits}-bit"


@dataclass(frozen=True)
class QualityPanel:
    """Rows of one model, protocol and window length (tokens the cache holds when scored), with the front of
    (held bits, change) and, when some rows' change is computed from perplexity, what it is computed against."""

    model: str
    protocol: str
    window_tokens: int
    files: tuple[str, ...]
    rows: tuple[QualityRow, ...]
    front: tuple[tuple[float, float], ...]
    reference: str  # "" when every row carries kvq-eval's change; else "<label> row of <file>"

    @property
    def title(self) -> str:
        return f"{self.protocol}, {self.window_tokens:,}-token window"

    @property
    def without_interval(self) -> tuple[str, ...]:
        """Files whose rows in this panel have no interval."""
        return tuple(sorted({r.file for r in self.rows if r.interval_pct is None}))


@dataclass(frozen=True)
class Quality:
    """Panels from reports/quality/*.csv, and the files skipped with why (reported on stderr, not on a page)."""

    directory: Path
    panels: tuple[QualityPanel, ...]
    skipped: tuple[str, ...]  # "file: reason"

    @property
    def missing(self) -> str | None:
        if self.panels:
            return None
        cmd = f"kvq-eval kivi:2 kivi:4 --protocol decode --csv {self.directory}/<name>.csv"
        why = "\n".join(f"  {s}" for s in self.skipped) or f"  no CSV files in {self.directory}"
        return (
            f"No usable quality results: the page needs CSVs in {self.directory}/ with columns "
            f"{', '.join(QUALITY_COLUMNS)}.\n{why}\nProduce them with the quality evaluation, e.g.:\n  {cmd}"
        )


def window_tokens(params: str) -> int | None:
    """Tokens in the cache when scored, from kvq-eval's `params`: 'prefill=384 scored=128' -> 512 (decode),
    'window=512 prefix=1 chunk=16' -> 512 (teacher-forced); None when neither form is there."""
    m = re.search(r"\bprefill=(\d+) scored=(\d+)", params)
    if m:
        return int(m[1]) + int(m[2])
    m = re.search(r"\bwindow=(\d+)", params)
    return int(m[1]) if m else None


def _optional(r: dict, column: str) -> float | None:
    """A float column that older files lack or leave empty: None then; ValueError when unreadable."""
    v = (r.get(column) or "").strip()
    if not v:
        return None
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(column)
    return x


#: the panel's reference when a file has no change column: the full cache, else the fp16 cache
REFERENCE_METHODS = ("full", "fp16")


def _changes(rows: list[dict], skipped: list[str]) -> tuple[list[QualityRow], str]:
    """Rows of one panel as QualityRow: kvq-eval's change where the file has it, else computed from perplexity
    against the panel's full-cache row (else its fp16 row); the reference named, or "" when none was needed."""
    need = [r for r in rows if r["change"] is None]
    ref = next((r for m in REFERENCE_METHODS for r in rows if r["method"] == m), None) if need else None
    out = []
    for r in rows:
        if r["change"] is not None:
            change, computed = r["change"], False
        elif ref is not None:
            change, computed = r["ppl"] / ref["ppl"] - 1, True
        else:
            skipped.append(
                f"{r['file']}, row {r['line']}: no change column and no full-cache or fp16 row to compute it"
            )
            continue
        lo, hi = r["change_low"], r["change_high"]
        interval = None if computed or lo is None or hi is None else (100 * lo, 100 * hi)
        out.append(
            QualityRow(r["method"], r["bits"], r["avg_bits"], r["held_bits"], r["ppl"], 100 * change, interval,
                       computed, r["file"])
        )  # fmt: skip
    return out, "" if ref is None else f"{quality_label(ref['method'], ref['bits'])} row of {ref['file']}"


def quality(directory: Path) -> Quality:
    by_panel: dict[tuple[str, str, int], list[dict]] = {}
    skipped: list[str] = []
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
        for i, r in enumerate(data, 2):
            window = window_tokens(r["params"])
            try:
                row = {
                    "method": r["method"],
                    "bits": None if r["method"] in ("fp16", "full") else r["bits"] or None,  # fp16: 16 or nothing
                    "avg_bits": float(r["avg_bits"]),
                    "held_bits": float(r["held_bits_per_element"]),
                    "ppl": float(r["ppl"]),
                    **{c: _optional(r, c) for c in CHANGE_COLUMNS},
                    "file": path.name,
                    "line": i,
                }
            except ValueError:
                row = None
            if (
                row is None
                or window is None
                or not all(map(math.isfinite, (row["ppl"], row["avg_bits"], row["held_bits"])))
            ):
                skipped.append(f"{path.name}, row {i}: unreadable avg_bits, held bits, ppl, change or window in params")
                continue
            if row["ppl"] <= 0 or row["avg_bits"] < 0 or row["held_bits"] < 0:
                skipped.append(f"{path.name}, row {i}: ppl must be positive and bits not negative")
                continue
            by_panel.setdefault((r.get("model", ""), r["protocol"], window), []).append(row)
    panels = []
    # decode first, the longest window first: the 4K-token table leads
    for (model, protocol, window), raw in sorted(
        by_panel.items(), key=lambda kv: (kv[0][0], kv[0][1] != "decode", kv[0][1], -kv[0][2])
    ):
        rows, ref = _changes(raw, skipped)
        if rows:
            names = tuple(sorted({r.file for r in rows}))
            panels.append(QualityPanel(model, protocol, window, names, tuple(rows), tuple(pareto(rows)), ref))
    return Quality(directory, tuple(panels), tuple(skipped))


def pareto(rows: list[QualityRow]) -> list[tuple[float, float]]:
    """(held bits, change %) not beaten on both axes (fewer bits and a smaller change are better), by
    increasing bits."""
    front, best = [], math.inf
    for x, y in sorted((r.held_bits, r.change_pct) for r in rows):
        if y < best:
            front.append((x, y))
            best = y
    return front


# ---- everything, for one report --------------------------------------------------------------------


@dataclass(frozen=True)
class ReportData:
    """Every number the pages show. `methods` orders the method families (one colour each, baselines first)
    and `bits` every bit spec shown (one marker each), so a series looks the same on every page. `versions`
    and `date` (title page only) are left out of `to_dict`: they describe the environment, not the model."""

    inputs: Inputs
    gpus: tuple[GpuFacts, ...]
    memory: dict[str, tuple[MemoryBar, ...]]
    memory_groups: tuple[tuple[str, ...], ...]
    sweeps: dict[tuple[str, Series], ContextSweep]
    rooflines: dict[str, Roofline]
    provenance: dict[tuple[str, Series], TermProvenance]
    kv_read_tags: dict[Series, str]  # legend tag per series: where its KV-read time comes from
    comparisons: tuple[Comparison, ...]
    quality: Quality
    methods: tuple[str, ...]
    bits: tuple[str | None, ...]
    versions: dict[str, str]
    date: datetime.datetime | None


def report_data(inp: Inputs) -> ReportData:
    mem = {g: memory_bars(inp, g) for g in inp.gpus}
    provs = {(g, s): provenance(inp, g, s) for g in inp.gpus for s in inp.series}
    q = quality(inp.quality_dir)
    comps = (kernel_comparison(inp.measurements_dir), e2e_comparison(inp.measurements_dir, "llama-7b"))
    shown = [(s.method, s.bits) for s in inp.series]
    shown += [(g.method, g.bits) for c in comps for g in c.groups]
    shown += [(r.method, r.bits) for p in q.panels for r in p.rows]
    methods = dict.fromkeys(m for m in BASELINE_METHODS if any(m == x for x, _ in shown))
    methods.update(dict.fromkeys(m for m, _ in shown))
    bits = sorted({b for _, b in shown}, key=lambda b: (bits_value(b), b or ""))
    return ReportData(
        inp,
        tuple(gpu_facts(inp, g) for g in inp.gpus),
        mem,
        same_memory_groups(inp.gpus, mem),
        {(g, s): context_sweep(inp, g, s) for g in inp.gpus for s in inp.series},
        {g: roofline(inp, g) for g in inp.gpus},
        provs,
        {s: kv_read_tag([provs[g, s] for g in inp.gpus]) for s in inp.series},
        comps,
        q,
        tuple(methods),
        tuple(bits),
        versions(),
        report_date(),
    )


def _round(v):
    """Floats to JSON_DIGITS significant digits, recursively: the JSON is the same wherever the last bits of libm differ."""
    if isinstance(v, float):
        return float(f"{v:.{JSON_DIGITS}g}") if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_round(x) for x in v]
    return v


def to_dict(d: ReportData) -> dict:
    """The data as plain JSON types, keyed by GPU and series label (the numbers behind each page)."""
    inp = d.inputs
    out = {
        "model": inp.model,
        "gpus": [vars(g) for g in d.gpus],
        "series": [s.label for s in inp.series],
        "contexts": list(inp.contexts),
        "memory": {
            g: [
                {"series": b.series.label, "max_context": b.max_context, "avg_bits": b.avg_bits, "gib": b.gib}
                for b in bars
            ]
            for g, bars in d.memory.items()
        },
        "memory_groups": [list(grp) for grp in d.memory_groups],
        "sweeps": {
            g: {
                s.label: {
                    k: list(getattr(sw, k))
                    for k in ("contexts", "step_ms", "bound", "max_batch", "tokens_per_s", "bound_at_max_batch")
                }
                for (g2, s), sw in d.sweeps.items()
                if g2 == g
            }
            for g in inp.gpus
        },
        "rooflines": {
            g: {
                "peak_tflops": r.peak_tflops,
                "hbm_tb_s": r.hbm_tb_s,
                "eff_peak_tflops": r.eff_peak_tflops,
                "eff_weight_tb_s": r.eff_weight_tb_s,
                "points": {p.label: {"intensity": p.intensity, "tflops": p.tflops} for p in r.points},
            }
            for g, r in d.rooflines.items()
        },
        "provenance": {
            g: {
                s.label: {k: {"kind": t.kind, "text": t.text} for k, t in p.terms.items()}
                for (g2, s), p in d.provenance.items()
                if g2 == g
            }
            for g in inp.gpus
        },
        "kv_read_tags": {s.label: tag for s, tag in d.kv_read_tags.items()},
        "comparisons": [
            {"file": c.path.name, "missing": c.missing}
            if c.missing
            else {
                "file": c.path.name,
                "points": len(c.rel_errors),
                "median_abs_error_pct": c.median_abs_error_pct,
                "p90_abs_error_pct": c.p90_abs_error_pct,
                "band_factor": c.band_factor,
                "groups": {
                    g.label: {"predicted_us": g.predicted_us, "measured_us": g.measured_us, "context": g.context}
                    for g in c.groups
                },
            }
            for c in d.comparisons
        ],
        "quality": [
            {
                "model": p.model,
                "protocol": p.protocol,
                "window_tokens": p.window_tokens,
                "files": p.files,
                "rows": [
                    {
                        "method": r.method,
                        "bits": r.bits,
                        "file": r.file,
                        "avg_bits": r.avg_bits,
                        "held_bits": r.held_bits,
                        "ppl": r.ppl,
                        "change_pct": r.change_pct,
                        "interval_pct": r.interval_pct,
                        "computed": r.computed,
                    }
                    for r in p.rows
                ],
                "front": p.front,
                "reference": p.reference,
            }
            for p in d.quality.panels
        ],
        "quality_skipped": list(d.quality.skipped),
    }
    return _round(out)


def to_json(d: ReportData) -> str:
    return json.dumps(to_dict(d), indent=1, sort_keys=True) + "\n"


DOC_BEGIN = "<!-- generated by python -m kvq_sim.report_data --doc: begin -->"
DOC_END = "<!-- generated by python -m kvq_sim.report_data --doc: end -->"


def summary(d: dict) -> str:
    """The report's headline numbers as a markdown list (from `to_dict`), for docs/reports.md."""
    gpus = {g["name"]: g for g in d["gpus"]}
    lines = []
    for group in d["memory_groups"]:
        bars = d["memory"][group[0]]
        fp16 = next(b for b in bars if b["series"] == "fp16")
        best = max(bars, key=lambda b: b["max_context"] or 0)
        same = " (same usable memory and reserve: one panel on pages 2-4)" if len(group) > 1 else ""
        lines.append(
            f"- {', '.join(group)}{same}: {gpus[group[0]]['usable_gib']:.2f} GiB usable; max context at batch 1 "
            f"{fp16['max_context']:,} tokens with fp16 KV, {best['max_context']:,} with {best['series']} "
            f"({best['max_context'] / fp16['max_context']:.2f}x)"
        )
    by_tag: dict[str, list[str]] = {}
    for label, tag in d["kv_read_tags"].items():
        by_tag.setdefault(tag, []).append(label)
    lines += [f"- pages 5-6, {tag}: {', '.join(labels)}" for tag, labels in sorted(by_tag.items())]
    for c in d["comparisons"]:
        if c.get("missing"):
            lines.append(f"- page 8, {c['file']}: missing")
        else:
            lines.append(
                f"- page 8, {c['file']}: {c['points']} held-out points, median |error| "
                f"{c['median_abs_error_pct']:.1f}%, {SPREAD_PCT}th percentile {c['p90_abs_error_pct']:.1f}% "
                f"(error = predicted / measured - 1)"
            )
            for label, g in c["groups"].items():
                errs = [100 * (p / m - 1) for p, m in zip(g["predicted_us"], g["measured_us"])]
                n = f"{len(errs)} point" + "s" * (len(errs) != 1)
                lines.append(f"  - {label}: {n}, median error {statistics.median(errs):+.1f}%")
    for p in d["quality"]:
        lines.append(
            f"- page 9, {p['protocol']}, {p['window_tokens']:,}-token window: {len(p['rows'])} results "
            f"({sum(r['interval_pct'] is not None for r in p['rows'])} with a {INTERVAL_PCT}% interval) from {', '.join(p['files'])}"
        )
    if d["quality_skipped"]:
        lines.append(f"- skipped quality files (named on stderr): {len(d['quality_skipped'])}")
    return "\n".join(lines) + "\n"


def replace_section(text: str, body: str) -> str:
    """`text` with the part between DOC_BEGIN and DOC_END replaced by `body`."""
    i, j = text.index(DOC_BEGIN) + len(DOC_BEGIN), text.index(DOC_END)
    return text[:i] + "\n" + body + text[j:]


def main(argv: list[str] | None = None) -> int:
    """Write the report's data as JSON (the file committed beside reports/llama-7b.pdf) and, with --doc,
    rewrite that doc's generated section from it."""
    ap = argparse.ArgumentParser(prog="python -m kvq_sim.report_data", description=main.__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu", dest="gpus", action="append", required=True)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--measurements", type=Path, default=MEASUREMENTS_DIR)
    ap.add_argument("--quality", type=Path, default=QUALITY_DIR)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--doc", type=Path, help="markdown file whose generated section is rewritten")
    a = ap.parse_args(argv)
    try:
        inp = resolve_inputs(a.model, a.gpus, a.methods, measurements_dir=a.measurements, quality_dir=a.quality)
    except SimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = report_data(inp)
    a.output.write_text(to_json(d))
    if a.doc:
        a.doc.write_text(replace_section(a.doc.read_text(), summary(json.loads(to_json(d)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
