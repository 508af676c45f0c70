"""Fit a GPU's decode efficiencies from the training half of its measurements; write them to its fit file.

Per decode-attention kernel family (latency.attention_kernel_us), two candidate forms, each a
non-negative least-squares fit of relative error on the training points:

    bandwidth:  t = overhead + bytes / (eff * HBM)                      (2 parameters)
    compute:    t = overhead + a * kv_elements + b * q_elements         (3 parameters; packed kernels
                                                                          whose unpack, not HBM, binds)

The compute form is taken when it cuts the training RMS relative error to at most COMPUTE_FORM_MIN_GAIN
of the bandwidth form's, or when the bandwidth form's efficiency is below BANDWIDTH_FORM_MIN_EFFICIENCY;
its bandwidth floor is then the best efficiency a
bandwidth-bound family reached on this GPU. The end-to-end step (latency.eager_step_us) fits one more,
the per-kernel overhead, after subtracting the attention the kernel fits predict and the weights streamed
at the kvq_fp16 efficiency (every benchmark step reads the same weights through the same kernels, so the
data cannot separate the two). Held-out points (measurements.split) are never read here.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from .configs import display_path, read_text, resolve
from .errors import SimInputError
from .files import check_destination, latest_backup, replacing
from .fitting import nnls
from .hardware import Hardware, KernelFit, calibration_fit_path, load_hardware, read_calibration_fit, transferred
from .latency import EAGER_KERNELS_PER_LAYER, EAGER_KERNELS_PER_STEP, attention_kernel_us, grid_terms
from .measurements import (
    E2E_KIVI_GROUP,
    E2E_KIVI_RESIDUAL,
    E2EPoint,
    KernelPoint,
    Provenance,
    benchmark_kv_format,
    split,
)

# Take the 3-parameter compute form when it cuts training RMS relative error to <= 80% of the 2-parameter
# bandwidth form's (c7c9282 sweep: KIVI-2 12.3% -> 6.7%, taken; kvq_fp16 5.84% -> 5.82%, not), or when the
# bandwidth form needs an efficiency below half of HBM: a kernel whose time is linear in bytes at < 50% of
# the datasheet bandwidth is bound by per-element work (KIVI-4 fits 0.20, KIVI-8 0.37), and must transfer
# with SMs x clock, not with HBM bandwidth.
COMPUTE_FORM_MIN_GAIN = 0.8
COMPUTE_FORM_MIN_ABS_GAIN = 0.001  # and by at least 0.1 points of RMS: exact ties keep the simpler form
BANDWIDTH_FORM_MIN_EFFICIENCY = 0.5
#: Fewest training points per kernel family: the compute form has 3 parameters.
MIN_TRAINING_POINTS = 3
#: A fitted family or e2e step whose training MAPE is above this is not written without --accept-worse-fit
#: (the committed H100 fit's worst family: sdpa_flash_fp16, 4.80%; all-equal times fit at ~40,000%).
FIT_MAPE_MAX_PCT = 20.0
#: A new fit is worse than the file's when a family's (or the e2e step's) training MAPE rises by more than
#: this many points: two repeat runs of the H100 sweep moved each family by at most 0.13 points
#: (kvq_kivi_3b_gqa 3.29% -> 3.42%, reports/measurements/kernel_decode_h100_repeat.csv).
FIT_WORSE_TOLERANCE_PCT = 1.0
# The benchmark model: LLaMA-7B shapes (configs/models/llama-7b.yaml), no embedding table (it feeds a
# random hidden vector), one new token per sequence written at slot `context` (context + 1 tokens read).
E2E_MODEL = "llama-7b"


@dataclass(frozen=True)
class FitStats:
    """Training residuals of one fitted family or of the e2e step: relative, in percent."""

    name: str
    form: str
    train_points: int
    mape_pct: float
    worst_pct: float


@dataclass(frozen=True)
class CalibrationResult:
    kernels: tuple[KernelFit, ...]
    kernel_stats: tuple[FitStats, ...]
    weight_gemv_efficiency: float | None  # None: no e2e training data, prior kept
    kernel_overhead_us: float | None
    e2e_stats: FitStats | None
    notes: tuple[str, ...]  # what could not be fitted and why


def _relative_fit(cols: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients minimising sum(((cols @ x) / t - 1)^2), x >= 0; and the RMS relative error."""
    x = nnls(cols / t[:, None], np.ones_like(t))
    return x, float(np.sqrt(np.mean((cols @ x / t - 1) ** 2)))


def _stats(name: str, form: str, pred: np.ndarray, meas: np.ndarray) -> FitStats:
    err = np.abs(pred / meas - 1) * 100
    return FitStats(name, form, len(meas), float(err.mean()), float(err.max()))


#: Resident programs per SM tried for the wave-tail factor (0: not modelled); the fit keeps the one with
#: the lowest training error (ties within WAVE_TIE_RMS keep the earlier, simpler, entry).
PROGRAMS_PER_SM_CHOICES = (0, 1, 2, 4)
WAVE_TIE_RMS = 0.001
#: kvq-kernels benchmark formats (bench_decode.py random_kivi): fp16 residual window 128, no sinks; the
#: CUDA-core and fragment paths give the window ceil(128 / 32) = 4 tail programs per row, the tensor-core path 1.
BENCH_TAIL_PROGRAMS = {"simt": 4, "frag": 4, "tc": 1}


def launch_path(config: str) -> str:
    """The kvq kernel a benchmark config tag names, its first field (simt, frag, tc, slice; bn<N> for the fp16
    kernel); "" for an untagged point."""
    return config.split("-", 1)[0]


def family_grid(points: list[KernelPoint]) -> dict:
    """Launch-grid fields (KernelFit.grid ...) of one family from its points' impl and config tags: torch
    SDPA runs FlashAttention-2's grid; kvq kernels the kvq grid with the tag's BLOCK_N (bn<N>), 8 waves for
    the CUDA-core path (simt-*) and 4 otherwise (kvq_kernels decode_kivi / decode_fp16), and the programs an SM
    holds (-r<N>, recorded from the compiled kernel) whose waves the splits fill. {} without tags."""
    if points[0].impl.startswith("sdpa_flash"):
        return dict(grid="flash")
    tags = Counter(p.config for p in points if p.config)
    if not tags:
        return {}
    tag = tags.most_common(1)[0][0]
    bn = re.search(r"bn(\d+)", tag)
    if bn is None:
        return {}
    path = launch_path(tag)
    resident = re.search(r"-r(\d+)", tag)
    return dict(
        grid="kvq-nofill" if path == "simt" else "kvq",
        block_tokens=int(bn.group(1)),
        split_waves=8 if path == "simt" else 4,
        tail_programs_per_row=BENCH_TAIL_PROGRAMS.get(path, 0),
        resident_programs_per_sm=int(resident.group(1)) if resident else 0,
    )


def launch_of(config: str) -> str:
    """The launch a benchmark config tag names: the kernel and its tile, warps and stages (frag-bn64-w1-s3), without
    what the launch plan derives per shape (-r resident programs, -sp splits); "" for an untagged point."""
    return re.sub(r"-r\d+|-sp\d+", "", config)


def one_launch(points: list[KernelPoint]) -> tuple[list[KernelPoint], list[str]]:
    """The points a family's fit reads: per family, those run by its most common launch (kernel, tile, warps and
    stages; ties: the launch named first in sorted order). A family is one launch's time model; kvq-kernels'
    dispatch sends some shapes of a family to another kernel (MHA caches of at most 4096 tokens and one sequence
    ran the fragment kernel, not the CUDA-core one) or to another launch of the same kernel (the fragment kernel's
    few-rows, short and small launches: 4 warps a program, or 128-token tiles, against one warp and 64 tokens),
    whose times would bend the fit: on the H200's sixteenth sweep, fitting the 4-bit GQA family on all of its
    fragment-kernel points gave held-out MAPE 5.02%, worst 11.25%, on its main launch's alone 0.96%, worst 4.45%.
    Returns (kept points, one note per family with points left out)."""
    kept, notes = [], []
    for family in sorted({p.family for p in points}):
        by_launch: dict[str, list[KernelPoint]] = {}
        for p in points:
            if p.family == family:
                by_launch.setdefault(launch_of(p.config), []).append(p)
        main = min(by_launch, key=lambda k: (-len(by_launch[k]), k))
        kept += by_launch.pop(main)
        if by_launch:
            left = sum(map(len, by_launch.values()))
            notes.append(
                f"kernel {family}: {left} training point(s) ran another launch ({', '.join(sorted(by_launch))}), "
                f"not the {main} launch the family models; not fitted"
            )
    return kept, notes


def _grid(points: list[KernelPoint], fit: KernelFit, sms: int) -> list:
    return [grid_terms(fit, sms, p.batch, p.q_heads, p.kv_heads, p.context, p.head_dim) for p in points]


def fit_kernel_family(
    points: list[KernelPoint], hbm_bandwidth_gb_s: float, bandwidth_floor: float = 1.0, sms: int = 0
) -> tuple[KernelFit, FitStats]:
    """Fit one family from its training points (all of one `family`); see the module docstring.

    With `sms` (the GPU's SM count) and a known launch grid (family_grid), each form gains a per-program
    term and the wave-tail factor, and FlashAttention's split and non-split kernels get one efficiency each.
    """
    if len(points) < MIN_TRAINING_POINTS:
        name = points[0].family if points else "?"
        raise SimInputError(
            f"kernel family {name}: {len(points)} training point(s), at least {MIN_TRAINING_POINTS} needed"
        )
    family = points[0].family
    t = np.array([p.time_us for p in points])
    if len(set(t.tolist())) == 1:
        raise SimInputError(
            f"kernel family {family}: all {len(t)} training times are {t[0]:g} us while the launches differ; "
            "a fit to constant times is meaningless (a broken timer or a copied column?)"
        )
    bw_us = np.array([p.bytes_read for p in points]) / (hbm_bandwidth_gb_s * 1e3)  # time at 100% of HBM
    ones = np.ones_like(t)
    kv = np.array([p.kv_elements for p in points], float) * 1e-6  # ps * elements * 1e-6 = us
    q = np.array([p.q_elements for p in points], float) * 1e-6
    gfields = family_grid(points) if sms else {}
    base = KernelFit(family, "bandwidth", 0.0, 1.0, 0.0, 0.0, **gfields)
    best = None
    for per_sm in PROGRAMS_PER_SM_CHOICES if gfields else (0,):
        shell = replace(base, programs_per_sm=per_sm)
        g = _grid(points, shell, sms) if gfields else None
        prog = np.array([float(x.programs_per_sm) for x in g]) if g else np.zeros_like(t)
        wave = np.array([float(x.wave) for x in g]) if g else ones
        split_ = np.array([bool(x.split) for x in g]) if g else np.ones_like(t, bool)
        splits = np.array([float(x.splits) for x in g]) if g else ones
        two = gfields.get("grid") == "flash"
        # flash: a split launch adds its combine kernel, a fixed cost and one per split (the combine's programs
        # loop over the splits); fitted only where both kinds are trained
        both = two and split_.any() and not split_.all()
        extra = ([prog] if gfields else []) + ([split_.astype(float), split_ * splits] if both else [])
        bw_cols = [bw_us * wave * split_, bw_us * wave * ~split_] if two else [bw_us * wave]
        xb, rms_b = _relative_fit(np.column_stack([ones, *extra, *bw_cols]), t)
        xc, rms_c = _relative_fit(np.column_stack([ones, *extra, kv * wave, q * wave]), t)
        n = len(extra)
        prog_us_b = float(xb[1]) if n else 0.0
        prog_us_c = float(xc[1]) if n else 0.0
        split_us, per_split_us = (float(xb[2]), float(xb[3])) if both else (0.0, 0.0)
        inv = xb[1 + n :]
        plausible = inv[0] > 0 and all(1.0 / v >= BANDWIDTH_FORM_MIN_EFFICIENCY for v in inv if v > 0)
        gain = rms_c <= COMPUTE_FORM_MIN_GAIN * rms_b and rms_b - rms_c >= COMPUTE_FORM_MIN_ABS_GAIN
        if two or (plausible and not gain):
            eff = min(1.0, 1.0 / inv[0]) if inv[0] > 0 else 1.0
            nosplit = (min(1.0, 1.0 / inv[1]) if inv[1] > 0 else eff) if two else 0.0
            fit = replace(shell, bound="bandwidth", overhead_us=float(xb[0]), bandwidth_efficiency=eff,
                          program_us=prog_us_b, nosplit_bandwidth_efficiency=nosplit,
                          split_overhead_us=split_us, split_us_per_split=per_split_us)  # fmt: skip
            rms = rms_b
        else:
            fit = replace(shell, bound="compute", overhead_us=float(xc[0]), bandwidth_efficiency=bandwidth_floor,
                          unpack_ps_per_kv_element=float(xc[1 + n]), dot_ps_per_q_element=float(xc[2 + n]),
                          program_us=prog_us_c)  # fmt: skip
            rms = rms_c
        if best is None or rms < best[0] - WAVE_TIE_RMS:
            best = (rms, fit)
    fit = best[1]
    g = _grid(points, fit, sms) if fit.grid else [None] * len(points)
    pred = np.array(
        [
            float(attention_kernel_us(fit, hbm_bandwidth_gb_s, p.bytes_read, p.kv_elements, p.q_elements, gi))
            for p, gi in zip(points, g)
        ]
    )
    return fit, _stats(family, fit.bound, pred, t)


def fit_kernels(
    train: list[KernelPoint], hbm_bandwidth_gb_s: float, sms: int = 0
) -> tuple[list[KernelFit], list[FitStats]]:
    """Every family in `train`: bandwidth-form families first, whose best efficiency floors the others."""
    families = sorted({p.family for p in train})
    by = {f: [p for p in train if p.family == f] for f in families}
    first = {f: fit_kernel_family(by[f], hbm_bandwidth_gb_s, sms=sms) for f in families}
    floor = max((k.bandwidth_efficiency for k, _ in first.values() if k.bound == "bandwidth"), default=1.0)
    out = {
        f: (k, s) if k.bound == "bandwidth" else fit_kernel_family(by[f], hbm_bandwidth_gb_s, floor, sms)
        for f, (k, s) in first.items()
    }
    return [out[f][0] for f in families], [out[f][1] for f in families]


def e2e_family(p: E2EPoint) -> str:
    """The attention kernel family an e2e backend runs: torch SDPA flash, or kvq's fp16 / KIVI kernel."""
    if p.backend == "sdpa":
        return "sdpa_flash_fp16"
    return "kvq_fp16" if p.bits == 16 else f"kvq_kivi_{p.bits}b_mha"  # LLaMA-7B: one query head per KV head


#: E2E_KIVI_GROUP / E2E_KIVI_RESIDUAL (kvq_sim.measurements) stay importable from here: benchmarks/e2e_decode.py,
#: benchmarks/multigpu_attention.py and kvq_kernels.bench_cli allocate their caches with them


def e2e_terms(p: E2EPoint, hw: Hardware) -> dict:
    """The simulator's view of one benchmark step: bytes the GEMVs read, attention per layer, memory."""
    from .deployment import deployment
    from .memory import activation_terms, kv_layer_streams, weight_bytes

    dep = deployment(E2E_MODEL, hw, 16 if p.bits == 16 else p.bits, None if p.bits == 16 else "kivi", gpus=1)
    if p.bits != 16:  # the format the benchmark stored, not KIVI's default group of 32
        dep = dataclasses.replace(dep, kv_format=benchmark_kv_format(p.bits))
    m = dep.model
    weights = weight_bytes(dep)[0] - m.vocab_size * m.hidden_size * 2  # no embedding table in the benchmark
    tokens = p.context + 1
    key, value = kv_layer_streams(dep, tokens)
    kv_layer = p.batch * (key.per_sequence + value.per_sequence) + key.shared + value.shared
    fit = hw.calibration.kernel(e2e_family(p))
    attn_us = None
    if fit is not None:
        attn_us = float(
            attention_kernel_us(
                fit,
                hw.hbm_bandwidth_gb_s,
                kv_layer,
                2 * p.batch * m.num_key_value_heads * tokens * m.head_dim,
                2 * p.batch * m.num_attention_heads * tokens * m.head_dim,
                grid_terms(fit, hw.sm_count, p.batch, m.num_attention_heads, m.num_key_value_heads, tokens, m.head_dim),
            )
        )
    decode_act, _ = activation_terms(dep, p.context)
    cache = e2e_cache_bytes(p.backend, p.bits, p.batch, tokens, m.num_key_value_heads, m.head_dim, m.num_hidden_layers)
    return dict(
        layers=m.num_hidden_layers,
        weights_bytes=weights,
        kv_bytes=m.num_hidden_layers * kv_layer,
        attention_us_per_layer=attn_us,
        memory_bytes=weights + cache + p.batch * decode_act + DO_BENCH_FLUSH_BYTES,
    )


#: triton.testing.do_bench allocates a 256 MiB L2-flush buffer inside the timed region (Triton's
#: nvidia driver.py, get_empty_cache_for_benchmark), so it counts in the step's max_memory_allocated.
DO_BENCH_FLUSH_BYTES = 256 * 1024 * 1024


def e2e_cache_bytes(backend: str, bits: int, batch: int, tokens: int, kv_heads: int, head_dim: int, layers: int) -> int:
    """Bytes of the caches the e2e benchmark allocates (benchmarks/kvq_e2e_backend.py), all layers.

    fp16: K and V [B, H, T, D]. Packed: `kvq_kernels.kivi_layout.allocate(B, H, D, T, bits, G, R)` with
    G = E2E_KIVI_GROUP and R = E2E_KIVI_RESIDUAL, whose capacity is preallocated: quantized rows rounded up to
    whole flush blocks of R tokens and both fp16 rings of R tokens, so it holds more than the format counts at
    T tokens (what the kernels read). Memory is
    validated against this layout; latency against the format's bytes. The kvq backend also holds int32
    lengths [B]: one tensor for fp16, one per layer for packed caches."""
    h, d = kv_heads, head_dim
    lens = 0 if backend == "sdpa" else 4 * batch
    if bits == 16:
        return layers * 2 * batch * h * tokens * d * 2 + lens
    g, r = E2E_KIVI_GROUP, E2E_KIVI_RESIDUAL
    tq = -(-tokens // r) * r
    row = d * bits // 8
    per_head = 2 * tq * row + 2 * (tq // g) * d * 2 + 2 * tq * (d // min(g, d)) * 2 + 2 * r * d * 2
    return layers * (batch * h * per_head + lens)


def fit_e2e(train: list[E2EPoint], hw: Hardware) -> tuple[float | None, float | None, FitStats | None, list[str]]:
    """(weight_gemv efficiency, per-kernel overhead us, stats, notes) from e2e training points; `hw` must
    already carry the kernel fits."""
    notes, rows = [], []
    for p in train:
        e = e2e_terms(p, hw)
        if e["attention_us_per_layer"] is None:
            notes.append(f"e2e point {p.point_id}: no kernel fit for {e2e_family(p)}; not used")
            continue
        rest = p.step_us - e["layers"] * e["attention_us_per_layer"]
        kernels = e["layers"] * EAGER_KERNELS_PER_LAYER + EAGER_KERNELS_PER_STEP
        rows.append((e["weights_bytes"] / (hw.hbm_bandwidth_gb_s * 1e3), kernels, rest, p.step_us))
    if not rows:
        notes.append("e2e: no usable training points; weight_gemv and kernel_launch_overhead_us keep the file's values")
        return None, None, None, notes
    w_us, kernels, rest, step = (np.array(c, float) for c in zip(*rows))
    if len(step) > 1 and len(set(step.tolist())) == 1:
        raise SimInputError(
            f"e2e: all {len(step)} training steps take {step[0]:g} us while batch and context differ; "
            "a fit to constant times is meaningless"
        )
    # Every benchmark step reads the same weights through the same kernel count, so the data pin only
    # their sum: weights stream at the best efficiency this GPU's kernels reached (the kvq_fp16 fit),
    # and the per-kernel overhead takes the rest (least squares of relative error, >= 0).
    fp16 = hw.calibration.kernel("kvq_fp16")
    eff = (
        fp16.bandwidth_efficiency if fp16 and fp16.bound == "bandwidth" else hw.calibration.weight_bandwidth_efficiency
    )
    if not (fp16 and fp16.bound == "bandwidth"):
        notes.append(f"e2e: no bandwidth-bound kvq_fp16 fit; weight_gemv keeps its prior {eff}")
    left = rest - w_us / eff
    over = max(0.0, float(np.sum(left * kernels / step**2) / np.sum(kernels**2 / step**2)))
    pred = w_us / eff + kernels * over + (step - rest)
    return eff, over, _stats("e2e step", "gemv + attention + kernels", pred, step), notes


def calibrate(
    hw: Hardware, kernel_points: list[KernelPoint], e2e_points: list[E2EPoint] | None, source: str = ""
) -> CalibrationResult:
    """Fit kernels on their training split, then the e2e step on its training split; `source` (the kernel
    file) prefixes the error of a family that cannot be fitted."""
    k_train, _ = split(kernel_points)
    k_train, notes = one_launch(k_train)
    try:
        if not k_train:
            raise SimInputError(
                f"all {len(kernel_points)} points are held out for validation; no training point to fit"
            )
        fits, kstats = fit_kernels(k_train, hw.hbm_bandwidth_gb_s, hw.sm_count)
    except SimInputError as e:
        raise SimInputError(f"{source}: {e}" if source else str(e)) from None
    hw_k = with_kernels(hw, fits)
    eff = over = estats = None
    if e2e_points:
        e_train, _ = split(e2e_points)
        if not e_train:
            notes.append("e2e: every point of the file is held out; nothing to fit (the file's values kept)")
        else:
            eff, over, estats, n = fit_e2e(e_train, hw_k)
            notes += n
    else:
        notes.append("e2e: no measurement file; weight_gemv and kernel_launch_overhead_us keep the file's values")
    return CalibrationResult(tuple(fits), tuple(kstats), eff, over, estats, tuple(notes))


def with_kernels(hw: Hardware, fits: list[KernelFit] | tuple[KernelFit, ...], **cal_fields) -> Hardware:
    """`hw` with these kernel fits (and any other Calibration fields) in place: what the YAML will load as."""
    return replace(hw, calibration=replace(hw.calibration, attention_kernels=tuple(fits), **cal_fields))


def calibrated_hardware(hw: Hardware, r: CalibrationResult) -> Hardware:
    cal = hw.calibration
    fp16 = next((k for k in r.kernels if k.family == "kvq_fp16" and k.bound == "bandwidth"), None)
    return with_kernels(
        hw,
        r.kernels,
        calibrated=True,
        weight_bandwidth_efficiency=r.weight_gemv_efficiency or cal.weight_bandwidth_efficiency,
        kernel_launch_overhead_us=cal.kernel_launch_overhead_us
        if r.kernel_overhead_us is None
        else r.kernel_overhead_us,
        kv_fp16_bandwidth_efficiency=fp16.bandwidth_efficiency if fp16 else cal.kv_fp16_bandwidth_efficiency,
    )


#: The first lines of every fit file; a YAML library writes the fields below them (and keeps no comments).
FIT_HEADER = (
    "Written by `kvq-sim calibrate` (make calibrate); do not edit. Its fields replace the priors of the",
    "`calibration:` section of the GPU file that names it (calibration_fit), field by field.",
    "attention_kernels: time model in kvq_sim.hardware.KernelFit, launch grids in kvq_sim.grids.",
)


def _sig(x: float) -> float:
    """`x` to the 4 significant digits a fit file keeps."""
    return float(f"{x:.4g}")


def _pct(x: float) -> float:
    """A fit error in percent to 0.01 points."""
    return float(f"{x:.2f}")


def _kernel_fields(k: KernelFit) -> dict:
    """One fitted family as the fields of `calibration.attention_kernels.<family>`."""
    out = {
        "bound": k.bound,
        "overhead_us": _sig(k.overhead_us),
        "bandwidth_efficiency": _sig(k.bandwidth_efficiency),
        "unpack_ps_per_kv_element": _sig(k.unpack_ps_per_kv_element),
        "dot_ps_per_q_element": _sig(k.dot_ps_per_q_element),
    }
    if k.grid:
        out.update(
            grid=k.grid,
            program_us=_sig(k.program_us),
            programs_per_sm=k.programs_per_sm,
            nosplit_bandwidth_efficiency=_sig(k.nosplit_bandwidth_efficiency),
        )
        if k.split_overhead_us:
            out["split_overhead_us"] = _sig(k.split_overhead_us)
        if k.split_us_per_split:
            out["split_us_per_split"] = _sig(k.split_us_per_split)
        if k.grid.startswith("kvq"):
            out.update(
                block_tokens=k.block_tokens, split_waves=k.split_waves, tail_programs_per_row=k.tail_programs_per_row
            )
            if k.resident_programs_per_sm:
                out["resident_programs_per_sm"] = k.resident_programs_per_sm
    return out


def _fit_stats(s: FitStats) -> dict:
    return {"train_points": s.train_points, "mape_pct": _pct(s.mape_pct), "worst_pct": _pct(s.worst_pct)}


def _provenance(p: Provenance) -> dict:
    return {"file": p.path, "commit": p.commit, "date": p.date}


def _fit_text(doc: dict, notes: list[str]) -> str:
    """A fit file: FIT_HEADER and `notes` as comments, then `doc` by yaml.safe_dump in the order given."""
    head = "".join(f"# {line}\n" for line in (*FIT_HEADER, *notes))
    return head + yaml.safe_dump(doc, sort_keys=False, width=4096)  # long strings on one line


def calibration_yaml(hw: Hardware, r: CalibrationResult, kprov: Provenance, eprov: Provenance | None) -> str:
    """The fit file of a GPU fitted from its own measurements: the `calibration:` fields the fit sets."""
    new = calibrated_hardware(hw, r).calibration
    e2e_src = f"{eprov.path} (commit {eprov.commit}, {eprov.date})" if eprov else "none"
    stats = {s.name: s for s in r.kernel_stats}
    doc = {
        "calibrated": True,
        "source": f"kvq-sim calibrate: {kprov.path} (commit {kprov.commit}, {kprov.date}); e2e: {e2e_src}",
        "measurements": {"kernel": _provenance(kprov), **({"e2e": _provenance(eprov)} if eprov else {})},
        "bandwidth_efficiency": {
            "weight_gemv": _sig(new.weight_bandwidth_efficiency),
            "attention_fp16": _sig(new.kv_fp16_bandwidth_efficiency),
        },
        "kernel_launch_overhead_us": _sig(new.kernel_launch_overhead_us),
        "attention_kernels": {
            k.family: {**_kernel_fields(k), "fit": _fit_stats(stats[k.family])} for k in new.attention_kernels
        },
    }
    if r.e2e_stats:
        doc["e2e_fit"] = _fit_stats(r.e2e_stats)
    kept = "not fitted by this run (no e2e training data): the value the GPU loaded before"
    notes = [
        "Fit on the training half of the measurements (split: sha256 of each point id, even = training;",
        "docs/validation.md); held-out points are checked by `kvq-sim validate`.",
        "bandwidth_efficiency.attention_fp16: the kvq_fp16 family's efficiency when fitted.",
        "bandwidth_efficiency.weight_gemv (GEMV weight streaming in a decode step): "
        + ("the kvq_fp16 streaming efficiency." if r.weight_gemv_efficiency else kept + "."),
        "kernel_launch_overhead_us (per kernel in a decode step): "
        + (
            f"fit on the eager e2e step, {EAGER_KERNELS_PER_LAYER} kernels/layer."
            if r.kernel_overhead_us is not None
            else kept + "."
        ),
    ]
    return _fit_text(doc, notes)


def transferred_yaml(src: Hardware, dst: Hardware) -> str:
    """The fit file of a GPU without measurements: a measured GPU's fit carried over (hardware.transferred)."""
    cal = transferred(src, dst)
    scale = (src.sm_count * src.boost_clock_mhz) / (dst.sm_count * dst.boost_clock_mhz)
    doc = {
        "calibrated": False,
        "source": cal.source,
        "transferred_from": src.name,
        "bandwidth_efficiency": {
            "weight_gemv": _sig(cal.weight_bandwidth_efficiency),
            "attention_fp16": _sig(cal.kv_fp16_bandwidth_efficiency),
            "attention_quantized": _sig(cal.kv_quantized_bandwidth_efficiency),
        },
        "kernel_launch_overhead_us": _sig(cal.kernel_launch_overhead_us),
        "attention_kernels": {k.family: _kernel_fields(k) for k in cal.attention_kernels},
    }
    notes = [
        f"TRANSFERRED, not measured on this GPU: `kvq-sim calibrate --gpu {dst.name} --transfer-from {src.name}`",
        "(rules in docs/validation.md and kvq_sim.hardware.transferred). Re-run after recalibrating the source.",
        f"Per-element costs x {scale:.3f} = ({src.sm_count} SMs * {src.boost_clock_mhz:g} MHz) / "
        f"({dst.sm_count} SMs * {dst.boost_clock_mhz:g} MHz); efficiencies and fixed costs as on {src.name}.",
    ]
    return _fit_text(doc, notes)


def fit_path(path: Path) -> Path:
    """The fit file of the GPU file `path`: the one its `calibration_fit:` names, else
    fits/<name>-calibration.yaml beside it (used once the GPU file names it)."""
    return calibration_fit_path(path) or path.parent / "fits" / f"{path.stem}-calibration.yaml"


def calibration_path(gpu: str) -> Path:
    """The GPU file `kvq-sim calibrate --gpu` calibrates; the fit file it names is checked writable before any
    fitting."""
    path = resolve("hardware", gpu)
    check_destination(fit_path(path), "calibration fit")
    return path


def file_calibration(path: Path) -> dict:
    """The fields of the GPU file's own fit file (not one inherited from a `base:`), {} when there is none."""
    fit = fit_path(path)
    return read_calibration_fit(fit) if fit.is_file() else {}


def check_transfer(src_name: str, dst: Path, overwrite_measured: bool) -> None:
    """A GPU is not transferred onto itself, and a measured calibration is not replaced by a transferred
    one unless `overwrite_measured` (a re-measurement is the way to update a measured GPU)."""
    if resolve("hardware", src_name).resolve() == dst.resolve():
        raise SimInputError(
            f"--transfer-from {src_name} is the GPU being calibrated ({display_path(dst)}); "
            "a transfer carries another, measured GPU's fit over"
        )
    if file_calibration(dst).get("calibrated") is True and not overwrite_measured:
        raise SimInputError(
            f"{display_path(dst)} holds a calibration measured on this GPU; refusing to replace it with one "
            "transferred from another GPU (pass --overwrite-measured to do so)"
        )


def fit_regressions(path: Path, r: CalibrationResult) -> list[str]:
    """Why the fit `r` is worse than the measured one `path` holds (or poor by itself): a training MAPE above
    FIT_MAPE_MAX_PCT, a family of the file missing from the fit, or a MAPE up by more than
    FIT_WORSE_TOLERANCE_PCT points on a family or the e2e step. [] when it may be written."""
    new = {s.name: s.mape_pct for s in r.kernel_stats}
    if r.e2e_stats:
        new["e2e step"] = r.e2e_stats.mape_pct
    out = [f"{n}: training MAPE {m:.2f}% (above {FIT_MAPE_MAX_PCT:g}%)" for n, m in new.items() if m > FIT_MAPE_MAX_PCT]
    cal = file_calibration(path)
    if cal.get("calibrated") is not True:
        return out
    old = {}
    kernels = cal.get("attention_kernels")
    for family, k in (kernels if isinstance(kernels, dict) else {}).items():
        fit = k.get("fit") if isinstance(k, dict) else None
        old[family] = fit.get("mape_pct") if isinstance(fit, dict) else None
    e2e = cal.get("e2e_fit")
    if isinstance(e2e, dict) and r.e2e_stats:
        old["e2e step"] = e2e.get("mape_pct")
    for name, was in old.items():
        if name not in new:
            out.append(f"{name}: fitted in the file, missing from these measurements")
        elif isinstance(was, (int, float)) and new[name] > was + FIT_WORSE_TOLERANCE_PCT:
            out.append(f"{name}: training MAPE {new[name]:.2f}%, the file's {was:.2f}%")
    return out


def write_calibration(path: Path, text: str) -> bool:
    """Write `text` to the fit file the GPU file `path` names, atomically, its previous bytes kept in a new
    backup (`files.next_backup`: `<fit file>.bak` or the next free `<fit file>.<n>.bak`); the GPU file is loaded
    with the new fit first, and nothing is written if the loader refuses it. False when the fit file already holds
    exactly this text."""
    fit = fit_path(path)
    if fit.is_file() and read_text(fit) == text:
        return False
    with replacing(fit) as tmp:
        tmp.write_text(text, encoding="utf-8")
        try:
            load_hardware(str(path), calibration_fit=tmp)
        except SimInputError as e:
            raise SimInputError(
                f"{display_path(fit)}: the new calibration does not load, file left as it was: {e}"
            ) from None
    return True


def summary(hw: Hardware, r: CalibrationResult) -> str:
    out = [f"{hw.name}: fitted {len(r.kernels)} kernel families on training points"]
    out.append(
        f"{'family':18s} {'form':9s} {'n':>3s} {'overhead_us':>11s} {'prog_us':>7s} {'/SM':>3s} {'bw_eff':>7s} "
        f"{'ps/kv':>7s} {'ps/q':>6s} {'MAPE%':>6s} {'worst%':>6s}"
    )
    st = {s.name: s for s in r.kernel_stats}
    for k in r.kernels:
        s = st[k.family]
        out.append(
            f"{k.family:18s} {k.bound:9s} {s.train_points:3d} {k.overhead_us:11.2f} {k.program_us:7.3f} "
            f"{k.programs_per_sm:3d} {k.bandwidth_efficiency:7.3f} {k.unpack_ps_per_kv_element:7.3f} "
            f"{k.dot_ps_per_q_element:6.3f} {s.mape_pct:6.2f} {s.worst_pct:6.2f}"
        )
    if r.e2e_stats:
        s = r.e2e_stats
        out.append(
            f"e2e step: weight_gemv efficiency {r.weight_gemv_efficiency:.3f}, {r.kernel_overhead_us:.3f} us per kernel "
            f"({s.train_points} training points, MAPE {s.mape_pct:.2f}%, worst {s.worst_pct:.2f}%)"
        )
    out += [f"note: {n}" for n in r.notes]
    return "\n".join(out)


def written(path: Path, changed: bool, what: str = "calibration") -> str:
    """The last line of `kvq-sim calibrate`: where the fit of the GPU file `path` went, or that its fit file
    already held it."""
    fit = fit_path(path)
    where = display_path(fit)
    bak = latest_backup(fit)
    if not changed:
        line = f"{where} already holds this {what}; not rewritten"
    elif bak is not None and bak.is_file():
        line = f"wrote {what} to {where} (previous version: {display_path(bak)})"
    else:
        line = f"wrote {what} to {where} (a new file)"
    if calibration_fit_path(path) is None:
        ref = fit.relative_to(path.parent)
        line += f"\nnote: add 'calibration_fit: {ref}' to {display_path(path)} so plans use it"
    return line


def check_device(hw: Hardware) -> str:
    """The torch device name measurements must carry for this GPU (its YAML's `torch_device_name`)."""
    if hw.torch_device_name is None:
        raise SimInputError(
            f"{hw.source_file}: no field 'torch_device_name', so no measurement can be matched to {hw.name}; "
            "transferred GPUs are not calibrated from measurements (docs/validation.md)"
        )
    return hw.torch_device_name
