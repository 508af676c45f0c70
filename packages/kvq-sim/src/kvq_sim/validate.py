"""Predict every held-out measured point with the calibrated GPU file and check the agreement thresholds.

Thresholds are the constants below; a failed threshold prints by how much and makes `kvq-sim validate` exit 1.
Latency is checked on held-out points only (measurements.split); memory has no fitted parameter, so every
e2e point checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .calibrate import e2e_family, e2e_terms
from .hardware import MIB, Hardware
from .latency import attention_kernel_us, eager_step_us, grid_terms
from .measurements import E2EPoint, KernelPoint, split

KERNEL_MIN_KV_BYTES = 64 * MIB  # kernel thresholds apply to launches reading at least this much KV
KERNEL_MAPE_MAX_PCT = 5.0
KERNEL_WORST_MAX_PCT = 15.0
E2E_MAPE_MAX_PCT = 8.0
MEMORY_MAX_ERR_PCT = 2.0  # |predicted weights + cache + activations - max_memory_allocated| / measured


@dataclass(frozen=True)
class Prediction:
    point_id: str
    group: str  # kernel family, or "e2e <backend> <bits>"
    measured: float
    predicted: float
    kv_bytes: int

    @property
    def err_pct(self) -> float:
        return (self.predicted / self.measured - 1) * 100


@dataclass
class Report:
    gpu: str
    kernel: list[Prediction] = field(default_factory=list)  # held-out kernel points
    e2e: list[Prediction] = field(default_factory=list)  # held-out e2e steps
    memory: list[Prediction] = field(default_factory=list)  # every e2e point
    checks: list[tuple[str, bool | None, str]] = field(default_factory=list)  # (name, passed or None, detail)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok is not False for _, ok, _ in self.checks)


def _mape(ps: list[Prediction]) -> tuple[float, float, Prediction | None]:
    if not ps:
        return float("nan"), float("nan"), None
    errs = np.array([abs(p.err_pct) for p in ps])
    return float(errs.mean()), float(errs.max()), ps[int(errs.argmax())]


def predict_kernel(hw: Hardware, p: KernelPoint) -> float | None:
    fit = hw.calibration.kernel(p.family)
    if fit is None:
        return None
    g = grid_terms(fit, hw.sm_count, p.batch, p.q_heads, p.kv_heads, p.context, p.head_dim)
    return float(attention_kernel_us(fit, hw.hbm_bandwidth_gb_s, p.bytes_read, p.kv_elements, p.q_elements, g))


def predict_e2e(hw: Hardware, p: E2EPoint) -> tuple[float | None, int]:
    """(predicted step us or None without a kernel fit, predicted memory bytes)."""
    e = e2e_terms(p, hw)
    if e["attention_us_per_layer"] is None:
        return None, e["memory_bytes"]
    return eager_step_us(hw, e["weights_bytes"], e["layers"], e["attention_us_per_layer"]), e["memory_bytes"]


def validate(hw: Hardware, kernel_points: list[KernelPoint], e2e_points: list[E2EPoint] | None) -> Report:
    rep = Report(hw.name)
    if not hw.calibration.calibrated or not hw.calibration.attention_kernels:
        rep.checks.append(("calibrated", False, f"{hw.name} has no fitted kernel families: run kvq-sim calibrate"))
        return rep
    _, held = split(kernel_points)
    for p in held:
        t = predict_kernel(hw, p)
        if t is None:
            rep.notes.append(
                f"kernel family {p.family} has no fit in {hw.source_file}: point {p.point_id} not predicted"
            )
            continue
        rep.kernel.append(Prediction(p.point_id, p.family, p.time_us, t, p.bytes_read))
    big = [p for p in rep.kernel if p.kv_bytes >= KERNEL_MIN_KV_BYTES]
    mape, worst, wp = _mape(big)
    if not big:
        rep.checks.append(("kernel", False, "no held-out kernel point reads >= 64 MiB of KV"))
    else:
        ok = mape <= KERNEL_MAPE_MAX_PCT and worst <= KERNEL_WORST_MAX_PCT
        rep.checks.append(
            (
                "kernel",
                ok,
                f"{len(big)} held-out points >= 64 MiB: MAPE {mape:.2f}% (max {KERNEL_MAPE_MAX_PCT}%), "
                f"worst {worst:.2f}% (max {KERNEL_WORST_MAX_PCT}%) at {wp.point_id}",
            )
        )
    if not e2e_points:
        rep.checks.append(("e2e", None, "NOT CHECKED: no e2e measurement file given"))
        rep.checks.append(("memory", None, "NOT CHECKED: no e2e measurement file given"))
        return rep
    _, e_held = split(e2e_points)
    held_ids = {p.point_id for p in e_held}
    for p in e2e_points:
        t, mem = predict_e2e(hw, p)
        group = f"e2e {p.backend} {p.bits}b"
        rep.memory.append(Prediction(p.point_id, group, p.max_allocated_bytes, mem, p.cache_bytes))
        if p.point_id not in held_ids:
            continue
        if t is None:
            rep.notes.append(f"e2e point {p.point_id}: no kernel fit for {e2e_family(p)}; not predicted")
            continue
        rep.e2e.append(Prediction(p.point_id, group, p.step_us, t, p.cache_bytes))
    mape, worst, wp = _mape(rep.e2e)
    if rep.e2e:
        rep.checks.append(
            (
                "e2e",
                mape <= E2E_MAPE_MAX_PCT,
                f"{len(rep.e2e)} held-out steps: MAPE {mape:.2f}% (max {E2E_MAPE_MAX_PCT}%), worst {worst:.2f}% "
                f"at {wp.point_id}",
            )
        )
    else:
        rep.checks.append(("e2e", False, f"no held-out e2e step could be predicted ({len(e_held)} held out)"))
    _, worst, wp = _mape(rep.memory)
    rep.checks.append(
        (
            "memory",
            worst <= MEMORY_MAX_ERR_PCT,
            f"{len(rep.memory)} steps: worst |error| {worst:.2f}% (max {MEMORY_MAX_ERR_PCT}%) at {wp.point_id}",
        )
    )
    if not any(p.backend == "kvq" for p in e2e_points):
        rep.notes.append("e2e file has no kvq backend rows: quantized end-to-end steps are not validated")
    return rep


def _group_rows(ps: list[Prediction]) -> list[str]:
    groups = sorted({p.group for p in ps})
    out = []
    for g in groups:
        sel = [p for p in ps if p.group == g]
        big = [p for p in sel if p.kv_bytes >= KERNEL_MIN_KV_BYTES]
        mape, worst, _ = _mape(sel)
        bm, bw, _ = _mape(big)
        bias = float(np.mean([p.err_pct for p in sel]))
        out.append(f"| {g} | {len(sel)} | {mape:.2f} | {worst:.2f} | {bias:+.2f} | {len(big)} | {bm:.2f} | {bw:.2f} |")
    return out


def render(rep: Report) -> str:
    """The markdown table docs/validation.md quotes, then one PASS/FAIL line per threshold."""
    out = [f"## kvq-sim validate: {rep.gpu} (held-out points only)", ""]
    if rep.kernel:
        out += [
            "| kernel family | n | MAPE % | worst % | bias % | n >= 64 MiB | MAPE % | worst % |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *_group_rows(rep.kernel),
            "",
        ]
    if rep.e2e or rep.memory:
        out += ["| e2e step | point | measured us | predicted us | error % |", "|---|---|---:|---:|---:|"]
        out += [
            f"| {p.group} | {p.point_id} | {p.measured:.1f} | {p.predicted:.1f} | {p.err_pct:+.2f} |" for p in rep.e2e
        ]
        out += ["", "| memory | point | max_allocated GB | predicted GB | error % |", "|---|---|---:|---:|---:|"]
        out += [
            f"| {p.group} | {p.point_id} | {p.measured / 1e9:.3f} | {p.predicted / 1e9:.3f} | {p.err_pct:+.2f} |"
            for p in rep.memory
        ]
        out.append("")
    for name, ok, detail in rep.checks:
        out.append(f"{'PASS' if ok else 'SKIP' if ok is None else 'FAIL'} {name}: {detail}")
    out += [f"note: {n}" for n in rep.notes]
    return "\n".join(out)
