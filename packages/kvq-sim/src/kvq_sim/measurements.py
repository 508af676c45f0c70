"""Measured H100 CSVs (kernel decode sweep, end-to-end decode step): read, check, and split train/held-out.

The split is a fixed rule on each point's identity, never on its measured value: a point is in the
training set when the first 8 hex digits of sha256(point id) are even. Membership of a point therefore
never changes when rows are added to or removed from a file, and a held-out point is never fitted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SimInputError

KERNEL_COLUMNS = (
    "device",
    "commit",
    "date",
    "impl",
    "bits",
    "group_size",
    "batch",
    "q_heads",
    "kv_heads",
    "head_dim",
    "context",
    "bytes_read",
    "time_us",
)
E2E_COLUMNS = (
    "device",
    "commit",
    "date",
    "backend",
    "bits",
    "batch",
    "context",
    "step_us",
    "weights_bytes",
    "cache_bytes",
    "max_allocated_bytes",
)


@dataclass(frozen=True)
class KernelPoint:
    """One decode-attention launch: `batch` sequences of `context` tokens, one new query token each."""

    impl: str
    bits: int
    group_size: int  # 0 for fp16 kernels
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    context: int
    bytes_read: int  # every cached byte the kernel must read (codes, scales, zeros, residual)
    time_us: float
    config: str = ""  # the benchmark's launch configuration tag (e.g. simt-bn64-w4-s1-pf); "" when absent

    @property
    def family(self) -> str:
        """Kernel family a calibration fits: the implementation, and for packed KIVI its bit width and head
        layout (kvq-kernels runs a CUDA-core kernel for MHA and tensor-core slices for GQA: two kernels)."""
        if self.bits == 16:
            return self.impl
        return f"{self.impl}_{self.bits}b_{'mha' if self.q_heads == self.kv_heads else 'gqa'}"

    @property
    def point_id(self) -> str:
        return (
            f"{self.impl}|{self.bits}|{self.group_size}|{self.batch}|{self.q_heads}|{self.kv_heads}|"
            f"{self.head_dim}|{self.context}"
        )

    @property
    def kv_elements(self) -> int:
        """K and V elements the kernel reads (and, when packed, unpacks): 2 * B * H_kv * T * D."""
        return 2 * self.batch * self.kv_heads * self.context * self.head_dim

    @property
    def q_elements(self) -> int:
        """Multiply-adds over K and V per query head: 2 * B * H_q * T * D (GQA: H_q / H_kv per element)."""
        return 2 * self.batch * self.q_heads * self.context * self.head_dim


@dataclass(frozen=True)
class E2EPoint:
    """One end-to-end decode step of the LLaMA-7B-shaped benchmark (benchmarks/e2e_decode.py)."""

    backend: str  # sdpa (torch flash, fp16 KV) or kvq (kvq-kernels fused kernels)
    bits: int
    batch: int
    context: int
    step_us: float
    weights_bytes: int
    cache_bytes: int
    max_allocated_bytes: int

    @property
    def point_id(self) -> str:
        return f"e2e|{self.backend}|{self.bits}|{self.batch}|{self.context}"


@dataclass(frozen=True)
class Provenance:
    """Where a measurement file came from: written into the calibration it feeds."""

    path: str
    device: str
    commit: str
    date: str  # newest row's date


def is_training(point_id: str) -> bool:
    """The fixed split: training iff the first 8 hex digits of sha256(point_id) form an even number."""
    return int(hashlib.sha256(point_id.encode()).hexdigest()[:8], 16) % 2 == 0


def split(points: list) -> tuple[list, list]:
    """(training, held-out) points by `is_training`, each in file order."""
    train = [p for p in points if is_training(p.point_id)]
    held = [p for p in points if not is_training(p.point_id)]
    return train, held


#: Each column's type and smallest accepted value ("text": a string; int: a whole number; float: a finite
#: number); group_size may be empty (fp16 kernels have none) and is then 0.
KERNEL_TYPES = dict(
    bits=(int, 1),
    group_size=(int, 0),
    batch=(int, 1),
    q_heads=(int, 1),
    kv_heads=(int, 1),
    head_dim=(int, 1),
    context=(int, 1),
    bytes_read=(int, 1),
    time_us=(float, 0.0),
)
E2E_TYPES = dict(
    bits=(int, 1), batch=(int, 1), context=(int, 1), step_us=(float, 0.0), weights_bytes=(int, 1),
    cache_bytes=(int, 1), max_allocated_bytes=(int, 1),
)  # fmt: skip
#: e2e benchmark backends and the KV bits each stores (benchmarks/e2e_decode.py; E2E_KIVI_GROUP)
E2E_BITS = {"sdpa": (16,), "kvq": (16, 8, 4, 3, 2)}
#: KIVI group and fp16 residual window of the decode-step benchmarks' packed caches at every bit width
#: (benchmarks/e2e_decode.py, kvq_kernels.bench_cli and benchmarks/multigpu_attention.py import them through
#: kvq_sim.calibrate), so the format costed for their rows is the one they were measured with
E2E_KIVI_GROUP = 128
E2E_KIVI_RESIDUAL = 128


def benchmark_kv_format(bits: int):
    """The KIVI format the decode-step benchmarks store at `bits` (not KIVI's default group of 32)."""
    from kvq_core.formats import kivi_format

    return kivi_format(bits, group_size=E2E_KIVI_GROUP, residual_tokens=E2E_KIVI_RESIDUAL)


@dataclass(frozen=True)
class Row:
    """One data row of a measurement CSV and its row number: the file line it ends on, the header being row 1
    (as a spreadsheet numbers it)."""

    line: int
    values: dict[str, str]


def read_rows(path: str | Path, columns: tuple[str, ...]) -> list[Row]:
    """The rows of a CSV that must hold `columns`; a missing, unreadable, non-UTF-8 or malformed file, a
    missing column, a row with more or fewer fields than the header, or no data row is a SimInputError
    naming the file and the row."""
    p = Path(path)
    if p.is_dir():
        raise SimInputError(f"measurement file {path} is a directory, not a CSV file")
    if not p.is_file():
        raise SimInputError(f"measurement file {path} does not exist")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise SimInputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SimInputError(f"{path}, row {line}: not UTF-8 text (byte {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise SimInputError(f"{path}: empty file; expected a header with {', '.join(columns)}")
        missing = [c for c in columns if c not in header]
        if missing:
            raise SimInputError(
                f"{path}: missing column(s) {', '.join(missing)}; expected at least {', '.join(columns)}"
            )
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise SimInputError(f"{path}: column(s) {', '.join(twice)} given twice in the header")
        rows = []
        for fields in reader:
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                raise SimInputError(
                    f"{path}, row {reader.line_num}: {len(fields)} fields, the header has {len(header)} "
                    "(truncated or misaligned row)"
                )
            rows.append(Row(reader.line_num, dict(zip(header, fields))))
    except csv.Error as e:
        raise SimInputError(f"{path}, row {reader.line_num}: malformed CSV ({e})") from None
    if not rows:
        raise SimInputError(f"{path}: no data rows")
    return rows


def _value(row: Row, column: str, kind, least, path):
    """The checked value of one cell: a whole number or finite number >= `least` (float: > `least`)."""
    v = row.values[column].strip()
    where = f"{path}, row {row.line}, column {column!r}"
    if kind is int:
        if not re.fullmatch(r"[+-]?[0-9]{1,30}", v):  # int() would also take "1_000" and 5,000-digit numbers
            raise SimInputError(f"{where}: expected a whole number, got {v[:40]!r}")
        x = int(v)
        if x < least:
            raise SimInputError(f"{where}: must be at least {least}, got {x}")
        return x
    try:
        x = float(v) if "_" not in v else None
    except ValueError:
        x = None
    if x is None:
        raise SimInputError(f"{where}: expected a number, got {v[:40]!r}")
    if not math.isfinite(x) or x <= least:
        raise SimInputError(f"{where}: must be a finite number above {least:g}, got {v!r}")
    return x


def _typed(row: Row, types: dict, path, device: str) -> dict:
    """The row's typed values; its device must be the GPU file's."""
    got = row.values["device"]
    if got != device:
        raise SimInputError(
            f"{path}, row {row.line}, column 'device': measured on {got!r}, but the GPU file describes {device!r}"
        )
    out = {}
    for column, (kind, least) in types.items():
        if column == "group_size" and not row.values[column].strip():
            out[column] = 0
        else:
            out[column] = _value(row, column, kind, least, path)
    return out


def _provenance(rows: list[Row], path, device: str) -> Provenance:
    commits = sorted({r.values["commit"] for r in rows})
    return Provenance(str(path), device, ",".join(commits), max(r.values["date"] for r in rows))


def _unique(points: list, rows: list[Row], path) -> None:
    """A point measured twice would count twice in the fit and the split: refuse it."""
    first: dict[str, int] = {}
    for p, r in zip(points, rows):
        if p.point_id in first:
            raise SimInputError(f"{path}, row {r.line}: point {p.point_id} repeats row {first[p.point_id]}")
        first[p.point_id] = r.line


#: bit widths of kvq's packed KIVI kernels (kvq_kernels.decode_kivi)
KIVI_KERNEL_BITS = (2, 3, 4, 8)


def _check_kernel_layout(impl: str, v: dict, where: str) -> None:
    """A row's bits and group size fit its kernel, and its bytes hold at least its codes: an fp16 kernel reads 16
    bits an element and no groups; kvq_kivi 2/3/4/8-bit codes in groups of a power of two >= 16 (kivi_layout). A
    batch, head or context count that does not match the bytes the kernel read (e.g. a mistyped batch of 1e14)
    would make every time look impossibly fast."""
    bits, group = v["bits"], v["group_size"]
    if impl == "kvq_kivi":
        if bits not in KIVI_KERNEL_BITS:
            raise SimInputError(f"{where}, column 'bits': kvq_kivi stores 2, 3, 4 or 8 bits, got {bits}")
        if group < 16 or group & (group - 1):
            raise SimInputError(f"{where}, column 'group_size': kvq_kivi groups are powers of two >= 16, got {group}")
    elif impl.endswith("_fp16") and (bits != 16 or group):
        raise SimInputError(f"{where}: an fp16 kernel ({impl}) reads 16-bit K/V with no group size, got bits {bits}")
    codes = 2 * v["batch"] * v["kv_heads"] * v["context"] * v["head_dim"] * bits // 8
    if v["bytes_read"] < codes:
        raise SimInputError(
            f"{where}, column 'bytes_read': {v['bytes_read']:,} bytes are fewer than the {codes:,} that the K/V "
            f"codes of batch {v['batch']:,} x {v['kv_heads']} KV heads x {v['context']:,} tokens x {v['head_dim']} "
            f"channels at {bits} bits hold"
        )


def read_kernel_csv(path: str | Path, device: str) -> tuple[list[KernelPoint], Provenance]:
    """Kernel decode points measured on `device` (torch.cuda.get_device_name), with the file's provenance."""
    rows = read_rows(path, KERNEL_COLUMNS)
    pts = []
    for r in rows:
        v = _typed(r, KERNEL_TYPES, path, device)
        impl = r.values["impl"].strip()
        if not impl:
            raise SimInputError(f"{path}, row {r.line}, column 'impl': empty kernel name")
        if v["q_heads"] % v["kv_heads"]:
            raise SimInputError(
                f"{path}, row {r.line}, column 'kv_heads': {v['kv_heads']} does not divide q_heads {v['q_heads']}"
            )
        _check_kernel_layout(impl, v, f"{path}, row {r.line}")
        pts.append(KernelPoint(impl=impl, config=(r.values.get("config") or "").strip(), **v))
    _unique(pts, rows, path)
    return pts, _provenance(rows, path, device)


def read_kernel_csvs(paths, device: str) -> tuple[list[KernelPoint], Provenance]:
    """The kernel points of one or more sweeps of `device` (e.g. a main sweep and one at other head layouts), with
    one provenance naming every file ("a.csv + b.csv", their commits, the newest date). A point in two files is
    refused: the fit and the split would count it twice."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise SimInputError("no kernel measurement file given")
    points, provs, seen = [], [], {}
    for path in paths:
        pts, prov = read_kernel_csv(path, device)
        for p in pts:
            if p.point_id in seen:
                raise SimInputError(f"{path}: point {p.point_id} is also in {seen[p.point_id]}; a point is fitted once")
            seen[p.point_id] = path
        points += pts
        provs.append(prov)
    commits = " + ".join(p.commit for p in provs)
    return points, Provenance(" + ".join(p.path for p in provs), device, commits, max(p.date for p in provs))


def read_e2e_csv(path: str | Path, device: str) -> tuple[list[E2EPoint], Provenance]:
    """End-to-end decode-step points measured on `device`, with the file's provenance."""
    rows = read_rows(path, E2E_COLUMNS)
    pts = []
    for r in rows:
        v = _typed(r, E2E_TYPES, path, device)
        backend = r.values["backend"]
        if backend not in E2E_BITS:
            raise SimInputError(
                f"{path}, row {r.line}, column 'backend': unknown backend {backend!r}; valid: {', '.join(E2E_BITS)}"
            )
        if v["bits"] not in E2E_BITS[backend]:
            valid = ", ".join(map(str, E2E_BITS[backend]))
            raise SimInputError(
                f"{path}, row {r.line}, column 'bits': {backend} steps store {valid} bits, got {v['bits']}"
            )
        pts.append(E2EPoint(backend=backend, **v))
    _unique(pts, rows, path)
    return pts, _provenance(rows, path, device)
