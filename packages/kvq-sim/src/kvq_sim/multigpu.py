"""Multi-GPU decode steps: read measured steps, predict them, fit collective costs per layout, validate.

A layout is a parallelism and a GPU count ("tp2", "cp4"). For each layout measured on a node, a fit gives
  measured step = shard_scale * (kvq-sim's step without collectives) + calls * latency + bytes / bandwidth,
where `calls` and `bytes` are the collectives kvq-sim's model issues for the step (two all-reduces of the
[batch, hidden] fp16 activations per layer under tensor parallelism, one all-gather of the partial attention
state per layer under context parallelism). `shard_scale` absorbs what the single-GPU model misses once weights
and heads are split (smaller GEMVs reach less bandwidth); latency and bandwidth are those of the collectives as
the benchmark issues them. The fit uses the training half of the points (measurements.is_training) and is
checked on the other half.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from .configs import read_yaml
from .deployment import Deployment, deployment
from .errors import SimInputError
from .files import check_destination, replacing
from .fitting import nnls
from .hardware import CollectiveFit, Hardware
from .latency import (
    attention_seconds,
    collective_seconds,
    collective_terms,
    decode_terms,
    eager_step_us,
    prior_collective_seconds,
)
from .measurements import benchmark_kv_format, is_training
from .memory import weight_bytes

#: kv column of the benchmark -> (kvq-sim method, bits)
KV_METHODS = {"fp16": ("fp16", "16"), "kivi4": ("kivi", "4"), "kivi2": ("kivi", "2")}
COLUMNS = ("model", "parallel", "gpus", "batch", "context", "kv", "mode", "step_us", "device", "commit", "date")
#: what benchmarks/multigpu_decode.py writes in its status and mode columns ("check": its correctness row)
STEP_STATUSES = ("ok", "skipped", "failed", "not_run")
STEP_MODES = ("eager", "graph", "check")
MULTIGPU_MAPE_MAX_PCT = 8.0
MULTIGPU_WORST_MAX_PCT = 20.0


@dataclass(frozen=True)
class StepPoint:
    """One measured multi-GPU decode step (CUDA-graph mode: no host launch gaps)."""

    model: str
    parallel: str
    gpus: int
    batch: int
    context: int
    kv: str
    step_us: float

    @property
    def layout(self) -> str:
        return f"{self.parallel}{self.gpus}"

    @property
    def point_id(self) -> str:
        return f"multigpu|{self.model}|{self.layout}|{self.kv}|{self.batch}|{self.context}"


def read_steps(path: str | Path, mode: str = "graph") -> tuple[list[StepPoint], dict]:
    """The measured points of one timing mode, each row checked (a step measured more than once counts once,
    at its median time); and the file's provenance."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SimInputError(f"measurement file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SimInputError(f"{path}: cannot be read as UTF-8 text ({e.__class__.__name__})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise SimInputError(f"{path}: missing column(s) {', '.join(missing)}")
    devices, commits, dates, seen = set(), set(), set(), {}
    for i, row in enumerate(reader, start=2):
        where = f"{path}, row {i}"
        status = row.get("status") or "ok"
        if status not in STEP_STATUSES:
            raise SimInputError(f"{where}: column 'status' must be one of {', '.join(STEP_STATUSES)}, got {status!r}")
        if row["mode"] not in STEP_MODES:
            raise SimInputError(f"{where}: column 'mode' must be one of {', '.join(STEP_MODES)}, got {row['mode']!r}")
        if status != "ok" or row["mode"] != mode:
            continue
        sizes = {}
        for c in ("gpus", "batch", "context"):
            try:
                sizes[c] = int(row[c])
            except (TypeError, ValueError):
                sizes[c] = 0
            if sizes[c] < 1:
                raise SimInputError(f"{where}: column '{c}' must be a positive integer, got {row[c]!r}")
        gpus, batch, context = sizes["gpus"], sizes["batch"], sizes["context"]
        # a step timed over fewer layers than the model has carries the whole model's time in step_us_scaled
        cols = ["step_us"] + (["step_us_scaled"] if row.get("step_us_scaled") not in (None, "") else [])
        for c in cols:
            try:
                t = float(row[c])
            except (TypeError, ValueError):
                t = math.nan
            if not (math.isfinite(t) and t > 0):
                raise SimInputError(f"{where}: column '{c}' must be a positive finite time, got {row[c]!r}")
        step = float(row[cols[-1]])
        if row["kv"] not in KV_METHODS:
            raise SimInputError(f"{where}: column 'kv' must be one of {', '.join(KV_METHODS)}, got {row['kv']!r}")
        if row["parallel"] not in ("tp", "cp"):
            raise SimInputError(f"{where}: column 'parallel' must be tp or cp, got {row['parallel']!r}")
        # a step measured more than once (a repeat, or the same rows twice) is one point at its median time
        seen.setdefault((row["model"], row["parallel"], gpus, batch, context, row["kv"]), []).append(step)
        devices.add(row["device"])
        commits.add(row["commit"])
        dates.add(row["date"])
    points = [StepPoint(*key, statistics.median(times)) for key, times in seen.items()]
    if not points:
        raise SimInputError(f"{path}: no measured rows in mode {mode!r}")
    if len(devices) != 1:
        raise SimInputError(f"{path}: rows from several devices: {', '.join(sorted(devices))}")
    return points, {"file": str(path), "device": devices.pop(), "commit": ",".join(sorted(commits)), "date": max(dates)}


def _deployment(hw: Hardware, p: StepPoint) -> Deployment:
    """The benchmark's deployment, its KIVI caches in the packed format it stores (groups of 128, a 128-token
    fp16 window per GPU: measurements.benchmark_kv_format), not KIVI's default group of 32, whose scales and
    zeros would add 0.75 bits per element the benchmark never reads."""
    method, bits = KV_METHODS[p.kv]
    dep = deployment(p.model, hw, bits=bits, method=method, gpus=p.gpus, parallel=p.parallel)
    if method == "kivi":
        dep = replace(dep, kv_format=benchmark_kv_format(int(bits)))
    return dep


def terms(hw: Hardware, p: StepPoint) -> tuple[float, float, float]:
    """(step us without collectives, collective calls per step, collective bytes per step) of one benchmark step.

    The step is the benchmark's (benchmarks/multigpu_decode.py, built like benchmarks/e2e_decode.py): unfused
    eager kernels captured in a CUDA graph, so it is costed by `eager_step_us` with each GPU's share: the
    weights it holds (no embedding table: the benchmark reads none) and attention over its heads (TP) or its
    slice of the context (CP), from the fitted kernel families."""
    dep = _deployment(replace(hw, collectives=()), p)
    m = dep.model
    embedding = 0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size * 2
    weights = weight_bytes(dep)[0] - embedding
    t = decode_terms(dep, p.batch, p.context)
    attn_us = float(attention_seconds(dep, p.batch, p.context, t.kv_bytes, t.attn_flops)) * 1e6 / m.num_hidden_layers
    calls, nbytes = collective_terms(dep, p.batch)
    return eager_step_us(dep.hardware, weights, m.num_hidden_layers, attn_us), calls, float(nbytes)


def predict(hw: Hardware, p: StepPoint) -> float:
    """Predicted benchmark step us: the layout's measured fit when `hw` carries one, else the priors
    (`latency.prior_collective_seconds`, the ones `kvq-sim plan` uses)."""
    base, calls, nbytes = terms(hw, p)
    f = hw.collective(p.layout) if p.gpus > 1 else None
    if f is None:
        return base + float(prior_collective_seconds(hw, p.gpus, calls, nbytes)) * 1e6
    return f.shard_scale * base + float(collective_seconds(f, calls, nbytes)) * 1e6


def _solve(rows: np.ndarray, t: np.ndarray, free_scale: bool) -> np.ndarray:
    """(scale, latency us per call, us per byte) minimising the relative error, all >= 0; scale 1 unless free."""
    if free_scale:
        return nnls(rows / t[:, None], np.ones_like(t))
    x = nnls(rows[:, 1:] / t[:, None], (t - rows[:, 0]) / t)
    return np.r_[1.0, x]


def _loo_mape(rows: np.ndarray, t: np.ndarray, free_scale: bool) -> float:
    """Leave-one-out relative error over the training points: how well the form predicts a point it did not see."""
    errs = []
    for i in range(len(t)):
        keep = np.arange(len(t)) != i
        x = _solve(rows[keep], t[keep], free_scale)
        errs.append(abs(rows[i] @ x / t[i] - 1))
    return float(np.mean(errs) * 100)


def fit(hw: Hardware, points: list[StepPoint]) -> tuple[CollectiveFit, ...]:
    """One fit per multi-GPU layout with at least 4 training points. Two forms are tried: collectives only (the
    sharded single-GPU model kept at scale 1) and collectives plus a free scale on the rest of the step (what
    sharding gains or loses); the form with the lower leave-one-out error on the training points is kept, so a
    scale is fitted only where the training data support it."""
    fits = []
    for layout in sorted({p.layout for p in points if p.gpus > 1}):
        train = [p for p in points if p.layout == layout and is_training(p.point_id)]
        if len(train) < 4:
            continue
        rows = np.array([terms(hw, p) for p in train])  # [n, 3]: base us, calls, bytes
        t = np.array([p.step_us for p in train])
        free = _loo_mape(rows, t, True) < _loo_mape(rows, t, False)
        x = _solve(rows, t, free)
        err = np.abs(rows @ x / t - 1) * 100
        scale, lat_us, us_per_byte = (float(v) for v in x)
        fits.append(
            CollectiveFit(
                layout=layout,
                shard_scale=scale,
                latency_us=lat_us,
                bandwidth_gb_s=(1e-3 / us_per_byte) if us_per_byte > 0 else 0.0,
                train_points=len(train),
                mape_pct=float(err.mean()),
                worst_pct=float(err.max()),
                max_call_bytes=float(max(r[2] / r[1] for r in rows if r[1])),
            )
        )
    if not fits:
        raise SimInputError("no multi-GPU layout has 4 or more training points: nothing to fit")
    return tuple(fits)


@dataclass(frozen=True)
class LayoutErrors:
    layout: str
    points: int
    prior_mape_pct: float
    prior_signed_pct: float
    fitted_mape_pct: float
    fitted_worst_pct: float


def held_out_errors(prior: Hardware, fitted: Hardware, points: list[StepPoint]) -> list[LayoutErrors]:
    """Per layout, on held-out points: the error of the prior prediction and of the fitted one."""
    out = []
    for layout in sorted({p.layout for p in points}):
        held = [p for p in points if p.layout == layout and not is_training(p.point_id)]
        if not held:
            continue
        m = np.array([p.step_us for p in held])
        e0 = np.array([predict(prior, p) for p in held]) / m - 1
        e1 = np.abs(np.array([predict(fitted, p) for p in held]) / m - 1)
        out.append(
            LayoutErrors(
                layout,
                len(held),
                float(np.abs(e0).mean() * 100),
                float(e0.mean() * 100),
                float(e1.mean() * 100),
                float(e1.max() * 100),
            )
        )
    return out


def fit_file_path(hw_yaml: Path) -> tuple[Path, bool]:
    """(where the node's collective fit is written, whether its YAML already names that file)."""
    ref = read_yaml(hw_yaml).get("collectives_fit")
    if isinstance(ref, str) and ref:
        return hw_yaml.parent / ref, True
    return hw_yaml.parent / "fits" / f"{hw_yaml.stem}-collectives.yaml", False


def fit_document(fits: tuple[CollectiveFit, ...], prov: dict) -> dict:
    """The fit file's content: provenance, then {layout: fields} (written by a YAML library, read by hardware)."""
    return {
        "source": f"{prov['file']} at {prov['commit']} ({prov['device']}, {prov['date']}), training half",
        "layouts": {
            f.layout: {
                "shard_scale": round(f.shard_scale, 5),
                "latency_us": round(f.latency_us, 3),
                "bandwidth_gb_s": round(f.bandwidth_gb_s, 3),
                "train_points": f.train_points,
                "mape_pct": round(f.mape_pct, 3),
                "worst_pct": round(f.worst_pct, 3),
                "max_call_bytes": int(f.max_call_bytes),
            }
            for f in fits
        },
    }


def write_fit(path: Path, doc: dict) -> bool:
    """Write the fit file atomically (the previous one kept as .bak); False when the bytes are unchanged."""
    check_destination(path, "collective fit")
    before = path.read_bytes() if path.is_file() else None
    text = "# Measured collective costs per layout: written by `kvq-sim calibrate --multigpu`; do not edit.\n"
    text += yaml.safe_dump(doc, sort_keys=False, width=120)
    with replacing(path) as tmp:
        tmp.write_text(text)
    return before != text.encode()


def render_fits(fits: tuple[CollectiveFit, ...]) -> str:
    rows = [
        f"{'layout':7s} {'train':>5s} {'shard_scale':>11s} {'latency_us':>10s} {'GB/s':>8s} {'MAPE%':>6s} {'worst%':>6s}"
    ]
    for f in fits:
        rows.append(
            f"{f.layout:7s} {f.train_points:5d} {f.shard_scale:11.3f} {f.latency_us:10.2f} "
            f"{(f'{f.bandwidth_gb_s:8.1f}' if f.bandwidth_gb_s else '       -')} "
            f"{f.mape_pct:6.2f} {f.worst_pct:6.2f}"
        )
    return "\n".join(rows)


def fitted_errors_pct(hw: Hardware, points: list[StepPoint]) -> np.ndarray:
    """|predicted / measured - 1| in percent for every held-out multi-GPU point of a layout `hw` has a fit for:
    what the gate's MAPE and worst case are taken over."""
    held = [p for p in points if p.gpus > 1 and not is_training(p.point_id) and hw.collective(p.layout) is not None]
    return np.array([abs(predict(hw, p) / p.step_us - 1) * 100 for p in held])


def validate_steps(hw: Hardware, points: list[StepPoint]) -> tuple[str, bool]:
    """The held-out table (prior error beside the fitted one, per layout) and whether the thresholds hold."""
    if not hw.collectives:
        return f"{hw.name}: no measured collective fits: run kvq-sim calibrate --gpu {hw.name} --multigpu CSV", False
    prior = replace(hw, collectives=())
    rows = held_out_errors(prior, hw, [p for p in points if p.gpus > 1])
    out = [
        f"multi-GPU decode step on {hw.name}, held-out points (CUDA graphs):",
        f"{'layout':7s} {'n':>3s} {'prior MAPE%':>11s} {'prior signed%':>13s} {'fitted MAPE%':>12s} {'worst%':>7s}",
    ]
    for r in rows:
        out.append(
            f"{r.layout:7s} {r.points:3d} {r.prior_mape_pct:11.2f} {r.prior_signed_pct:+13.2f} "
            f"{r.fitted_mape_pct:12.2f} {r.fitted_worst_pct:7.2f}"
        )
    errs = fitted_errors_pct(hw, points)
    if not len(errs):
        return "\n".join([*out, "FAIL: no held-out point of a fitted layout"]), False
    ok = errs.mean() <= MULTIGPU_MAPE_MAX_PCT and errs.max() <= MULTIGPU_WORST_MAX_PCT
    out.append(
        f"{'PASS' if ok else 'FAIL'}: {len(errs)} held-out points, MAPE {errs.mean():.2f}% (max "
        f"{MULTIGPU_MAPE_MAX_PCT:g}%), worst {errs.max():.2f}% (max {MULTIGPU_WORST_MAX_PCT:g}%)"
    )
    return "\n".join(out), bool(ok)
