"""Measured H100 CSVs (kernel decode sweep, end-to-end decode step): read, check, and split train/held-out.

The split is a fixed rule on each point's identity, never on its measured value: a point is in the
training set when the first 8 hex digits of sha256(point id) are even. Membership of a point therefore
never changes when rows are added to or removed from a file, and a held-out point is never fitted.
"""

from __future__ import annotations

import csv
import hashlib
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


def _rows(path: str | Path, columns: tuple[str, ...], device: str) -> tuple[list[dict], Provenance]:
    p = Path(path)
    if not p.is_file():
        raise SimInputError(f"measurement file {path} does not exist")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        have = reader.fieldnames or []
        missing = [c for c in columns if c not in have]
        if missing:
            raise SimInputError(
                f"{path}: missing column(s) {', '.join(missing)}; expected at least {', '.join(columns)}"
            )
        rows = list(reader)
    if not rows:
        raise SimInputError(f"{path}: no data rows")
    devices = sorted({r["device"] for r in rows})
    if devices != [device]:
        raise SimInputError(f"{path}: measured on {', '.join(devices)}, but the GPU file describes {device!r}")
    commits = sorted({r["commit"] for r in rows})
    return rows, Provenance(str(path), device, ",".join(commits), max(r["date"] for r in rows))


def _num(row: dict, key: str, path, kind=int, default=None):
    v = row[key]
    if v in ("", None) and default is not None:
        return default
    try:
        return kind(float(v)) if kind is int else kind(v)
    except ValueError:
        raise SimInputError(f"{path}: column {key!r} must be a number, got {v!r}") from None


def read_kernel_csv(path: str | Path, device: str) -> tuple[list[KernelPoint], Provenance]:
    """Kernel decode points measured on `device` (torch.cuda.get_device_name), with the file's provenance."""
    rows, prov = _rows(path, KERNEL_COLUMNS, device)
    pts = [
        KernelPoint(
            impl=r["impl"],
            bits=_num(r, "bits", path),
            group_size=_num(r, "group_size", path, default=0),
            batch=_num(r, "batch", path),
            q_heads=_num(r, "q_heads", path),
            kv_heads=_num(r, "kv_heads", path),
            head_dim=_num(r, "head_dim", path),
            context=_num(r, "context", path),
            bytes_read=_num(r, "bytes_read", path),
            time_us=_num(r, "time_us", path, float),
            config=(r.get("config") or "").strip(),
        )
        for r in rows
    ]
    if any(p.time_us <= 0 or p.bytes_read <= 0 for p in pts):
        raise SimInputError(f"{path}: time_us and bytes_read must be positive")
    return pts, prov


def read_e2e_csv(path: str | Path, device: str) -> tuple[list[E2EPoint], Provenance]:
    """End-to-end decode-step points measured on `device`, with the file's provenance."""
    rows, prov = _rows(path, E2E_COLUMNS, device)
    pts = [
        E2EPoint(
            backend=r["backend"],
            bits=_num(r, "bits", path),
            batch=_num(r, "batch", path),
            context=_num(r, "context", path),
            step_us=_num(r, "step_us", path, float),
            weights_bytes=_num(r, "weights_bytes", path),
            cache_bytes=_num(r, "cache_bytes", path),
            max_allocated_bytes=_num(r, "max_allocated_bytes", path),
        )
        for r in rows
    ]
    if any(p.step_us <= 0 for p in pts):
        raise SimInputError(f"{path}: step_us must be positive")
    return pts, prov
