"""`kvq-bench`: measure this GPU (bandwidth, matmul peak, decode kernels, a whole decode step) and draft its
kvq-sim hardware YAML.

Writes into --out: `kernel_decode_<slug>.csv` (kvq_kernels.benchmarking's schema, kvq-sim calibrate's
--measurements), `e2e_decode_<slug>.csv` (kvq_kernels.decode_step's rows of the LLaMA-7B-shaped step
kvq-sim's e2e fit assumes, its --e2e; needs kvq-sim installed for that model's shape) and `<slug>.yaml` (a
hardware file kvq_sim.hardware loads, its header holding each phase's wall time), then prints the
`kvq-sim calibrate` and `validate` commands that read them. Without a CUDA GPU it exits 2 before importing
any Triton code. The pure parts (GpuInfo, the YAML draft, the plans, the output checks, the commands) run
on CPU and are tested there.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NO_GPU = "error: kvq-bench needs a CUDA GPU (torch sees none)"
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class GpuInfo:
    """What kvq-bench found out about one GPU: reported by the driver, or measured (GB/s, TFLOP/s)."""

    name: str  # torch.cuda.get_device_name(): the CSV's device column and the YAML's torch_device_name
    memory_bytes: int  # torch total_memory
    sm_count: int
    l2_bytes: int
    max_sm_clock_mhz: float | None  # nvidia-smi clocks.max.sm; None where nvidia-smi is absent
    max_memory_clock_mhz: float | None  # nvidia-smi clocks.max.memory
    driver: str
    read_gb_s: float  # streaming read (torch sum over 4 GiB)
    copy_gb_s: float  # device-to-device copy, bytes read + written
    matmul_tflops: float  # bf16 8192^3 matmul, median run

    @property
    def slug(self) -> str:
        return slug(self.name)


def slug(name: str) -> str:
    """File-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


@dataclass(frozen=True)
class SweepPlan:
    """What one kvq-bench run measures: the decode sweep's grid (kvq_kernels.benchmarking.decode_grid), the
    correctness checks before it, repetition budgets, and the whole-step points (kvq_kernels.decode_step)."""

    bits: tuple[int, ...]  # 16: SDPA flash and kvq_fp16
    heads: tuple[tuple[int, int], ...]  # (query heads, kv heads)
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    split_contexts: tuple[int, ...]  # extra contexts at batch <= 8
    probe: bool  # time PROBE_CONFIGS per bit width (full) or take decode_kivi's defaults (quick)
    check_shapes: tuple  # benchmarking.correctness shapes
    check_variants: tuple  # benchmarking.correctness KIVI variants (group, sinks, nuq)
    rep_ms: float  # timed runs per sweep measurement (benchmarking.median_us)
    peak_rep_ms: float  # timed runs of the bandwidth and matmul measurements
    step_bits: tuple[int, ...]  # kvq bit widths of the whole step (beside sdpa fp16)
    step_batches: tuple[int, ...]
    step_contexts: tuple[int, ...]
    step_warmup_ms: float  # triton.testing.do_bench of a step's graph replay
    step_rep_ms: float


#: --quick: 4 contexts x 2 batches x 2 head layouts x (SDPA, fp16, 4-bit, 2-bit), 64 kernel points. The
#: contexts are chosen for kvq-sim's fixed split (sha256 of each point id): every kernel family gets at least 4
#: training and 2 held-out points (with 4096, 32768 and 131072 the 4-bit GQA family got 1 training point, and
#: without 1024 it gets 2, where `kvq-sim calibrate` needs 3). Correctness checks only what the sweep times
#: (group 128, no sinks, uniform codes; 32/8 heads over more rows and over at most decode_kivi's FRAG_FEW_ROWS rows
#: of a short cache, which run different launches, and 32/32): each other variant costs its own Triton compiles.
#: The whole step: sdpa fp16 and kvq 4/2-bit at batch 1 and 16, contexts 4K and 32K.
QUICK = SweepPlan(
    bits=(16, 4, 2),
    heads=((32, 8), (32, 32)),
    batches=(1, 8),
    contexts=(1024, 4096, 16384, 131072),
    split_contexts=(),
    probe=False,
    check_shapes=((32, 8, (1, 97, 4099), 4100), (32, 8, (97, 2000), 2048), (32, 32, (2048,), 2048)),
    check_variants=((128, 0, False),),
    rep_ms=30.0,
    peak_rep_ms=100.0,
    step_bits=(4, 2),
    step_batches=(1, 16),
    step_contexts=(4096, 32768),
    step_warmup_ms=10.0,
    step_rep_ms=60.0,
)


def full_plan() -> SweepPlan:
    """packages/kvq-kernels/benchmarks/bench_decode.py's default grid (kvq_kernels.benchmarking constants), configs
    probed, every correctness variant; the whole step as benchmarks/e2e_decode.py runs it."""
    from kvq_kernels import benchmarking as bm
    from kvq_kernels.decode_step import FULL_GRID

    return SweepPlan(
        bm.BITS, bm.HEADS, bm.BATCHES, bm.CONTEXTS, bm.SPLIT_REGIME_CONTEXTS, probe=True,
        check_shapes=bm.CORRECTNESS_SHAPES, check_variants=bm.CORRECTNESS_VARIANTS, rep_ms=60.0, peak_rep_ms=200.0,
        step_bits=(16, 4, 2), step_batches=FULL_GRID[0], step_contexts=FULL_GRID[1], step_warmup_ms=50.0,
        step_rep_ms=300.0,
    )  # fmt: skip


def output_paths(out_dir: str | Path, gpu_slug: str) -> tuple[Path, Path, Path]:
    """(kernel CSV, whole-step CSV, hardware YAML) kvq-bench writes for a GPU."""
    out = Path(out_dir)
    return out / f"kernel_decode_{gpu_slug}.csv", out / f"e2e_decode_{gpu_slug}.csv", out / f"{gpu_slug}.yaml"


def next_commands(yaml_path, kernel_csv, e2e_csv=None) -> list[str]:
    """The kvq-sim commands that fit and check this run's measurements (--e2e when the step was measured)."""
    args = f"--gpu {yaml_path} --measurements {kernel_csv}" + (f" --e2e {e2e_csv}" if e2e_csv else "")
    return [f"kvq-sim calibrate {args}", f"kvq-sim validate {args}"]


class Phases:
    """Wall seconds of each phase of a run that ends normally, printed on stderr as it ends; `total` from `start`."""

    def __init__(self, start: float):
        self.start = start
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t
        print(f"kvq-bench: {name} took {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)

    def summary(self, now: float) -> str:
        parts = [f"{name} {sec:.1f}" for name, sec in self.seconds.items()]
        return ", ".join([*parts, f"total {now - self.start:.1f}"])


def check_outputs(paths, force: bool) -> None:
    """Refuse (ValueError) an --out that is a file, that cannot be created or written, or existing outputs
    without --force; create --out."""
    out = Path(paths[0]).parent
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        raise ValueError(f"refusing to overwrite {', '.join(existing)} (pass --force, or another --out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # os.access says yes to root in /proc or on a read-only mount
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror})") from None


MEASURED = "measured by kvq-bench, not the datasheet: replace with the datasheet figure"


def draft_hardware(info: GpuInfo) -> dict:
    """The kvq-sim hardware mapping (kvq_sim.hardware's schema) of one GPU, with uncalibrated priors."""
    hw = {
        "description": f"{info.name} (drafted by kvq-bench)",
        "gpus": 1,
        "nominal_memory_gib": math.ceil(info.memory_bytes / GIB),
        "usable_memory_bytes": info.memory_bytes,
        "hbm_bandwidth_gb_s": round(info.read_gb_s, 1),
        "fp16_dense_tflops": round(info.matmul_tflops, 1),
        "int8_dense_tops": round(2 * info.matmul_tflops, 1),
        "l2_mib": round(info.l2_bytes / MIB, 2),
        "sm_count": info.sm_count,
    }
    if info.max_sm_clock_mhz:
        hw["boost_clock_mhz"] = info.max_sm_clock_mhz
    hw.update(
        torch_device_name=info.name,
        interconnect="pcie",
        interconnect_bandwidth_gb_s=64,
        interconnect_latency_us=25,
        calibration_fit=f"fits/{slug(info.name)}-calibration.yaml",
        # uncalibrated priors (each field's source in _COMMENTS); `kvq-sim calibrate` writes a fit of this
        # GPU's measurements to the calibration_fit file, whose fields replace these
        calibration={
            "calibrated": False,
            "source": "uncalibrated priors (kvq-bench draft): run kvq-sim calibrate with the kvq-bench CSV",
            "bandwidth_efficiency": {"weight_gemv": 0.85, "attention_fp16": 0.80, "attention_quantized": 0.80},
            "tensor_core_efficiency": 0.69,
            "interconnect_efficiency": 0.80,
            "kernel_launch_overhead_us": 3.0,
            "cuda_context_mib": 512,
            "framework_workspace_mib": 256,
        },
    )
    return hw


#: the comment after each field's line in the drafted YAML
_COMMENTS = {
    "nominal_memory_gib": "total_memory rounded up to whole GiB: replace with the datasheet figure",
    "usable_memory_bytes": "measured: torch total_memory",
    "hbm_bandwidth_gb_s": MEASURED,
    "fp16_dense_tflops": MEASURED,
    "int8_dense_tops": "2x the measured bf16 matmul (the datasheet ratio of A100, H100, L40S): "
    "replace with the datasheet figure",
    "l2_mib": "reported by the driver (torch L2_cache_size)",
    "sm_count": "reported by the driver",
    "boost_clock_mhz": "nvidia-smi clocks.max.sm",
    "torch_device_name": "torch.cuda.get_device_name(): measurements must match it",
    "interconnect": "prior: a single GPU; set nvlink and its bandwidth for a node",
    "interconnect_bandwidth_gb_s": "prior: PCIe Gen4 x16, both directions summed",
    "interconnect_latency_us": "prior: small-message NCCL all-reduce over PCIe",
    "calibration_fit": "written by kvq-sim calibrate: the fit that replaces the priors below",
    "weight_gemv": "prior: fraction of hbm_bandwidth_gb_s a decode GEMV streams at",
    "attention_fp16": "prior: same for fp16 decode attention",
    "attention_quantized": "prior: same for fused dequantize + attention",
    "tensor_core_efficiency": "prior: H100 bf16 8192^3 matmul 684 of 989 datasheet TFLOP/s",
    "interconnect_efficiency": "prior: NCCL bus bandwidth ~80% of the link rate",
    "kernel_launch_overhead_us": "prior: per kernel in an eager decode step",
    "cuda_context_mib": "prior: CUDA context + torch before the first tensor",
    "framework_workspace_mib": "prior: cuBLAS workspace and attention split-KV scratch",
}


def draft_yaml(info: GpuInfo, phases: str | None = None) -> str:
    """`draft_hardware` as YAML text (written by PyYAML), a header naming the measured fields (and, when given,
    the run's phase wall times), and a comment on each field saying where its value came from."""
    import yaml

    text = yaml.safe_dump(draft_hardware(info), sort_keys=False, width=10_000)
    lines = []
    for line in text.splitlines():
        key = line.strip().split(":", 1)[0]
        if key in _COMMENTS and not line.rstrip().endswith(":"):
            line = f"{line}  # {_COMMENTS[key]}"
        lines.append(line)
    clocks = ", ".join(
        f"{what} {mhz:g} MHz"
        for what, mhz in (("SM", info.max_sm_clock_mhz), ("memory", info.max_memory_clock_mhz))
        if mhz
    )
    header = [
        f"# {info.name}: drafted by kvq-bench (driver {info.driver}{'; max clocks ' + clocks if clocks else ''}).",
        f"# Measured here: streaming read {info.read_gb_s:.0f} GB/s, copy {info.copy_gb_s:.0f} GB/s (read + write),",
        f"# bf16 matmul {info.matmul_tflops:.0f} TFLOP/s.",
        "# hbm_bandwidth_gb_s, fp16_dense_tflops and int8_dense_tops hold measured values, not the datasheet's:",
        "# replace them with the datasheet figures BEFORE `kvq-sim calibrate` (fitted efficiencies are fractions",
        "# of these numbers). The calibration section holds uncalibrated priors until `kvq-sim calibrate` fits it.",
    ]
    if phases:
        header.append(f"# kvq-bench phases, wall seconds: {phases}.")
    return "\n".join([*header, *lines]) + "\n"


def _nvidia_smi(fields: str, uuid: str | None) -> list[str] | None:
    """One GPU's values of `nvidia-smi --query-gpu=<fields>`; None when nvidia-smi is absent or fails."""
    cmd = ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
    for extra in ([f"--id={uuid}"] if uuid else [], []):
        try:
            out = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0 and out.stdout.strip():
            return [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return None


def _mhz(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:  # "[N/A]"
        return None
    return v if v > 0 else None


def _provenance() -> dict:
    """The CSV's provenance columns (kvq_core.provenance); the commit of a kvq-bench installed from a wheel,
    outside any checkout and without KVQ_COMMIT, is the installed kvq-kernels version."""
    from importlib.metadata import PackageNotFoundError, version

    from kvq_core.provenance import CSV_FIELDS, provenance

    prov = provenance(fields=CSV_FIELDS)
    if prov["commit"] == "unknown":
        try:
            prov["commit"] = f"kvq-kernels {version('kvq-kernels')}"
        except PackageNotFoundError:
            pass
    return prov


def _progress(total: int | None = None, desc: str = "decode sweep"):
    """A progress bar over a list of points (`total` of them, default its length): tqdm where installed, else a
    line every 10%."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    def wrap(points):
        n = len(points) if total is None else total
        if tqdm is not None:
            yield from tqdm(points, total=n, desc=desc, unit="pt")
            return
        step = max(1, n // 10)
        for i, p in enumerate(points):
            if i % step == 0:
                print(f"{desc}: {i}/{n} points", flush=True)
            yield p

    return wrap


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


#: KIVI group sizes the sweep's caches take: powers of two >= 16 (kivi_layout) that divide the benchmarks'
#: 128-token fp16 window and the 128 channels of a head
GROUPS = (16, 32, 64, 128)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kvq-bench", description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--out", default=".", help="directory for the CSV and YAML (default: the current one)")
    ap.add_argument("--quick", action="store_true", help="a compact sweep (under a minute) for a first fit")
    ap.add_argument("--budget-s", type=_seconds, default=420.0, help="stop the kernel sweep after this many seconds")
    ap.add_argument("--group", type=int, choices=GROUPS, default=128,
                    help="KIVI group size (tokens for keys, channels for values)")  # fmt: skip
    ap.add_argument("--force", action="store_true", help="overwrite existing output files")
    return ap.parse_args(argv)


def step_model():
    """(Shape, KIVI group, residual) of the step kvq-sim's e2e calibration assumes (kvq_sim.calibrate.E2E_MODEL and
    its packed format), or None when kvq-sim is not installed."""
    try:
        from kvq_sim.calibrate import E2E_KIVI_GROUP, E2E_KIVI_RESIDUAL, E2E_MODEL
        from kvq_sim.models import load_model
    except ImportError:
        return None
    from kvq_kernels.decode_step import shape_from_config

    return shape_from_config(E2E_MODEL, load_model(E2E_MODEL)), E2E_KIVI_GROUP, E2E_KIVI_RESIDUAL


def _measure_step(plan: SweepPlan, configs: dict, prov: dict, path: Path) -> str:
    """Time the whole decode step's points and write their CSV to `path` (a file left there by an earlier run is
    removed first): "ok", "skipped" (kvq-sim absent, or no point fits this GPU) or "failed" (a point raised),
    each but "ok" said on stderr and leaving no file."""
    from kvq_kernels import decode_step as ds
    from kvq_kernels.benchmarking import config_kwargs, release_flush_buffer

    path.unlink(missing_ok=True)
    model = step_model()
    if model is None:
        print("kvq-bench: kvq-sim is not installed: the whole decode step is not measured", file=sys.stderr)
        return "skipped"
    s, group, residual = model
    launch = {
        b: config_kwargs(configs[(b, s.heads, s.kv_heads)])
        for b in plan.step_bits
        if (b, s.heads, s.kv_heads) in configs
    }
    points = ds.plan(("sdpa", "kvq"), plan.step_bits, plan.step_batches, plan.step_contexts)
    release_flush_buffer()  # the steps' max_allocated_bytes count only what a step allocates (kvq-sim's memory model)
    try:
        rows = ds.run_points(
            s, points, group, residual, prov, launch, plan.step_warmup_ms, plan.step_rep_ms,
            _progress(desc="decode step"),
        )  # fmt: skip
    except RuntimeError as e:  # CUDA errors and out-of-memory included
        print(f"kvq-bench: the whole decode step failed: {e}", file=sys.stderr)
        return "failed"
    if not rows:
        print("kvq-bench: no whole-step point fits this GPU's memory", file=sys.stderr)
        return "skipped"
    ds.write_rows(path, rows)
    print(f"\nwhole decode step ({s.name} shape, random weights, CUDA graph):")
    ds.print_rows(rows)
    return "ok"


def main(argv=None) -> None:
    t0, wall0 = time.perf_counter(), time.time()
    args = parse_args(argv)
    phases = Phases(t0)
    with phases("detect"):
        import torch

        if not torch.cuda.is_available():
            print(NO_GPU, file=sys.stderr)
            sys.exit(2)
        name = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        csv_path, e2e_path, yaml_path = output_paths(args.out, slug(name))
        try:
            check_outputs((csv_path, e2e_path, yaml_path), args.force)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        uuid = getattr(props, "uuid", None)
        smi = _nvidia_smi("driver_version,clocks.max.sm,clocks.max.memory", f"GPU-{uuid}" if uuid else None)

        from kvq_kernels import benchmarking as bm

        plan = QUICK if args.quick else full_plan()
        prov = _provenance()
    print(", ".join(f"{k} {v}" for k, v in prov.items()))
    kivi_bits = [b for b in plan.bits if b != 16]
    with phases("compile + correctness"):
        bm.correctness(kivi_bits, plan.check_shapes, plan.check_variants)
    with phases("bandwidth"):
        read = bm.hbm_read_tb_s(plan.peak_rep_ms)
        copy = bm.copy_tb_s(plan.peak_rep_ms)
    with phases("matmul"):
        mm = bm.matmul_tflops(rep_ms=plan.peak_rep_ms)
    print(
        f"streaming read {read * 1e3:.0f} GB/s, copy {copy * 1e3:.0f} GB/s (read + write), bf16 matmul {mm:.0f} TFLOP/s"
    )
    info = GpuInfo(
        name=name,
        memory_bytes=props.total_memory,
        sm_count=props.multi_processor_count,
        l2_bytes=props.L2_cache_size,
        max_sm_clock_mhz=_mhz(smi[1]) if smi else None,
        max_memory_clock_mhz=_mhz(smi[2]) if smi else None,
        driver=smi[0] if smi else prov["driver"] or "unknown",
        read_gb_s=read * 1e3,
        copy_gb_s=copy * 1e3,
        matmul_tflops=mm,
    )
    yaml_path.write_text(draft_yaml(info), encoding="utf-8")
    if plan.probe:
        with phases("probe"):
            configs = bm.probe(plan.bits, args.group, plan.heads)
    else:
        configs = bm.default_configs(kivi_bits, args.group, plan.heads)
    points = bm.decode_grid(plan.heads, plan.batches, plan.contexts, plan.split_contexts)
    with phases("kernel sweep"):
        results, stopped = bm.sweep(
            csv_path, prov, read, points, plan.bits, args.group, configs, args.budget_s, wall0,
            _progress(len(points)), plan.rep_ms,
        )  # fmt: skip
    if stopped:
        print(f"sweep stopped by --budget-s at heads {stopped[0]}/{stopped[1]} batch {stopped[2]} context {stopped[3]}")
    bm.print_table(results, read, (1, max(plan.batches) if args.quick else 32), (4096, 131072))
    with phases("decode step"):
        step = _measure_step(plan, configs, prov, e2e_path)
    summary = phases.summary(time.perf_counter())
    yaml_path.write_text(draft_yaml(info, summary), encoding="utf-8")
    print(f"\n{'GPU':<22} {name}")
    wrote = [csv_path, *([e2e_path] if step == "ok" else []), yaml_path]
    for label, value in (
        ("memory", f"{info.memory_bytes / GIB:.1f} GiB"),
        ("SMs / L2", f"{info.sm_count} / {info.l2_bytes / MIB:g} MiB"),
        ("max SM / memory clock", f"{info.max_sm_clock_mhz or '?'} / {info.max_memory_clock_mhz or '?'} MHz"),
        ("driver", info.driver),
        ("streaming read", f"{info.read_gb_s:.0f} GB/s"),
        ("copy (read + write)", f"{info.copy_gb_s:.0f} GB/s"),
        ("bf16 matmul", f"{info.matmul_tflops:.0f} TFLOP/s"),
        ("decode sweep", f"{len(results)} kvq points (plus SDPA)"),
        ("phases (wall s)", summary),
        ("wrote", ", ".join(map(str, wrote))),
    ):
        print(f"{label:<22} {value}")
    print("\nnext (the YAML's header names the measured fields to replace with datasheet figures first):")
    for cmd in next_commands(yaml_path, csv_path, e2e_path if step == "ok" else None):
        print(f"  {cmd}")
    if step == "failed":
        sys.exit(1)


if __name__ == "__main__":
    main()
