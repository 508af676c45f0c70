"""kvq-sim against published measurements of other serving systems: load reports/published/points.csv, predict
every point with kvq-sim's public API under its engine's preset (ENGINES, configs/engines/engines.yaml), and
summarize the errors per source and per GPU/parallelism class.

Every timing point is compared as time: a throughput T tokens/s of `batch` sequences generating `output_tokens`
each is the request time batch * output_tokens / T; the error is predicted / measured - 1, so a positive error
means kvq-sim predicts slower than measured. E.g. gpt-fast's 104.9 tokens/s at batch 1 is 1000 / 104.9 =
9.533 ms per token. Memory is compared as bytes per GPU (`max_memory_allocated`: kvq-sim's total minus its
CUDA-context reserve).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from .configs import CONFIG_DIR, display_path
from .errors import SimInputError
from .recipes import QSERVE_W4_G128, WEIGHT_SCHEMES, WeightScheme

#: the committed dataset (reports/published/ beside configs/ in a checkout)
DEFAULT_CSV = CONFIG_DIR.parent / "reports" / "published" / "points.csv"
SPLITS = ("calibration", "held_out")
COLUMNS = (
    "point_id", "source", "split", "published_model", "model", "published_gpu", "gpu", "gpu_count", "tp", "pp",
    "cp", "batch", "prompt_tokens", "output_tokens", "weight_precision", "activation_precision", "kv_precision",
    "engine", "engine_version", "metric", "value", "unit", "citation", "assumed",
)  # fmt: skip

#: metric -> {unit: factor to the SI unit (seconds, tokens/s, bytes)}; tokens/s/gpu is also times gpu_count
UNITS: dict[str, dict[str, float]] = {
    "generation_throughput": {"tokens/s": 1.0, "tokens/s/gpu": 1.0},
    "first_token_latency": {"ms": 1e-3, "s": 1.0},
    "request_latency": {"ms": 1e-3, "s": 1.0},
    "decode_step_latency": {"us": 1e-6, "ms": 1e-3, "s": 1.0},
    "peak_memory": {"GB": 1e9, "GiB": 2**30, "MB": 1e6, "MiB": 2**20},
}

#: weight_precision -> how kvq-sim stores the linear weights (embeddings and LM head stay 16-bit)
WEIGHTS: dict[str, WeightScheme] = {
    "fp16": WEIGHT_SCHEMES[16],
    "bf16": WEIGHT_SCHEMES[16],
    "fp8": WeightScheme("fp8, one scale per tensor", 8),
    "int8-channel": WEIGHT_SCHEMES[8],
    "fp8-channel": WeightScheme("fp8, fp32 scale per row (fbgemm)", 8, channel_scale_bytes=4),
    "int4-g32": WeightScheme("int4, group 32 bf16 scale + zero (gpt-fast)", 4, 32, 2, 2, gemv_kernel="int4"),
    "int4-g128": WEIGHT_SCHEMES[4],
    # AutoAWQ's own GEMM/GEMV kernels, not the measured tinygemm: streamed at the fp16 efficiency
    "int4-g128-awq": WeightScheme("int4, group 128 fp16 scale + packed int4 zero (AWQ)", 4, 128, 2, 0.5),
    "nf4-b64": WeightScheme("nf4, fp32 absmax per 64 (bitsandbytes)", 4, 64, 4),
    # double quantization: int8 absmax per 64 plus one fp32 scale per 256 absmax blocks
    "nf4-b64-dq": WeightScheme("nf4, int8 absmax per 64 + fp32 per 256 blocks (bitsandbytes)", 4, 64, 1 + 4 / 256),
    "qserve-w4-g128": QSERVE_W4_G128,
}
#: activation_precision -> GEMM input bits (8: linear layers at the INT8/FP8 tensor-core peak)
ACTIVATIONS = {"fp16": 16, "bf16": 16, "fp8": 8, "int8": 8}
#: kv_precision -> (kvq-core method, bits)
KV = {"fp16": ("fp16", None), "bf16": ("fp16", None), "fp8": ("fp8-e4m3", "8"), "int4": ("int", "4")}
#: engine as the source names it -> kvq-sim engine preset (configs/engines/engines.yaml). Presets are fitted on
#: calibration-part sources only; an engine seen only in held-out sources gets the fused roofline, with why.
ENGINES = {
    "Hugging Face transformers (eager) under optimum-benchmark": "hf-eager",
    # eager PyTorch like transformers: one Python-launched kernel per op, no CUDA graph
    "LitGPT generate/base.py (eager PyTorch 2.1.0, bitsandbytes 0.41.1)": "hf-eager",
    "NeMo Framework inference (TensorRT-LLM)": "nemo",
    "TensorRT-LLM": "trtllm",
    # QServe's own engine: no preset of its own (its 10 points are the QServe kernels' only evidence)
    "QServe (in-flight batching off)": "fused",
    # held-out only: torch.compile with CUDA graphs ("reduce-overhead"), a fused engine by construction
    "gpt-fast (torch.compile)": "fused",
    # held-out only: TurboMind is a C++ engine with fused kernels; no calibration point to fit overheads on
    "LMDeploy TurboMind": "fused",
}
#: the chip of a multi-GPU node config, so that a node's points and its single GPU's share one class
NODE_CHIP = {"8x-a100-80g": "a100-80g", "8x-h100": "h100-80g", "4x-l40s": "l40s"}
WORST_SHOWN = 8


@dataclass(frozen=True)
class Point:
    """One published measurement, validated; `measured_si` is `value` in seconds, tokens/s or bytes."""

    point_id: str
    source: str
    split: str
    model: str
    gpu: str
    gpu_count: int
    tp: int
    pp: int
    cp: int
    batch: int
    prompt_tokens: int
    output_tokens: int
    weight_precision: str
    activation_precision: str
    kv_precision: str
    engine: str
    metric: str
    value: float
    unit: str
    line: int

    @property
    def measured_si(self) -> float:
        v = self.value * UNITS[self.metric][self.unit]
        return v * self.gpu_count if self.unit == "tokens/s/gpu" else v

    @property
    def measured(self) -> float:
        """The compared quantity: seconds (a throughput as its request time) or bytes."""
        if self.metric == "generation_throughput":
            return self.batch * self.output_tokens / self.measured_si
        return self.measured_si

    @property
    def gpu_class(self) -> str:
        """GPU/parallelism class: the chip and the layout, e.g. "a100-80g tp4"."""
        layout = f"cp{self.cp}" if self.cp > 1 else f"pp{self.pp}" if self.pp > 1 else f"tp{self.tp}"
        return f"{NODE_CHIP.get(self.gpu, self.gpu)} {layout}"


@dataclass(frozen=True)
class Result:
    """A point and kvq-sim's prediction of it, or the reason kvq-sim cannot express it."""

    point: Point
    predicted: float | None  # same unit as point.measured; None when not expressible
    reason: str = ""  # why kvq-sim cannot express the point

    @property
    def err_pct(self) -> float:
        return (self.predicted / self.point.measured - 1) * 100


@dataclass(frozen=True)
class Stats:
    n: int
    signed_pct: float  # mean of predicted / measured - 1
    mape_pct: float

    def to_dict(self) -> dict:
        return {"n": self.n, "signed_pct": round(self.signed_pct, 2), "mape_pct": round(self.mape_pct, 2)}


@dataclass
class Report:
    path: str
    results: list[Result] = field(default_factory=list)

    @property
    def predicted(self) -> list[Result]:
        return [r for r in self.results if r.predicted is not None]

    @property
    def unexpressible(self) -> list[Result]:
        return [r for r in self.results if r.predicted is None]

    def stats(self, split: str, key=None) -> dict[str, Stats]:
        """Stats of the predicted points of one split, grouped by key(point) (None: one "all" group)."""
        groups: dict[str, list[float]] = {}
        for r in self.predicted:
            if r.point.split == split:
                groups.setdefault(key(r.point) if key else "all", []).append(r.err_pct)
        return {k: _stats(v) for k, v in sorted(groups.items())}

    def overall(self, split: str) -> Stats:
        return self.stats(split).get("all", Stats(0, math.nan, math.nan))

    def worst(self, split: str, n: int = WORST_SHOWN) -> list[Result]:
        return sorted((r for r in self.predicted if r.point.split == split), key=lambda r: -abs(r.err_pct))[:n]

    def to_dict(self) -> dict:
        def table(key) -> dict:
            return {s: {k: v.to_dict() for k, v in self.stats(s, key).items()} for s in SPLITS}

        return {
            "file": self.path,
            "overall": {s: self.overall(s).to_dict() for s in SPLITS},
            "by_source": table(lambda p: p.source),
            "by_class": table(lambda p: p.gpu_class),
            "by_metric": table(lambda p: p.metric),
            "points": [
                {
                    "point_id": r.point.point_id,
                    "source": r.point.source,
                    "split": r.point.split,
                    "class": r.point.gpu_class,
                    "metric": r.point.metric,
                    "measured": r.point.measured,
                    "predicted": r.predicted,
                    "unit": "bytes" if r.point.metric == "peak_memory" else "s",  # a throughput as its request time
                    "err_pct": None if r.predicted is None else round(r.err_pct, 2),
                    "not_expressible": r.reason or None,
                }
                for r in self.results
            ],
        }


def _stats(errs: list[float]) -> Stats:
    return Stats(len(errs), sum(errs) / len(errs), sum(abs(e) for e in errs) / len(errs))


# ---------------------------------------------------------------- loading


def _int(row: dict, col: str, where: str) -> int:
    text = row[col].strip()
    try:
        v = int(text)
    except ValueError:
        raise SimInputError(f"{where}: {col} must be a positive integer, got {text!r}") from None
    if v < 1:
        raise SimInputError(f"{where}: {col} must be a positive integer, got {v}")
    return v


def _choice(row: dict, col: str, valid, where: str) -> str:
    v = row[col].strip()
    if v not in valid:
        raise SimInputError(f"{where}: unknown {col} {v!r}; valid: {', '.join(valid)}")
    return v


def parse_row(row: dict, line: int, where: str, models: list[str], gpus: list[str]) -> Point:
    """One CSV row as a Point; anything kvq-sim cannot read is a SimInputError naming the file, line and column."""
    at = f"{where}:{line}"
    metric = _choice(row, "metric", tuple(UNITS), at)
    unit = row["unit"].strip()
    if unit not in UNITS[metric]:
        raise SimInputError(f"{at}: unit {unit!r} is not a unit of {metric}; valid: {', '.join(UNITS[metric])}")
    text = row["value"].strip()
    try:
        value = float(text)
    except ValueError:
        raise SimInputError(f"{at}: value must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise SimInputError(f"{at}: value must be a finite number > 0, got {text!r}")
    n = {c: _int(row, c, at) for c in ("gpu_count", "tp", "pp", "cp", "batch", "prompt_tokens", "output_tokens")}
    if n["tp"] * n["pp"] * n["cp"] != n["gpu_count"]:
        raise SimInputError(f"{at}: gpu_count {n['gpu_count']} is not tp * pp * cp = {n['tp'] * n['pp'] * n['cp']}")
    for col in ("point_id", "source", "citation"):
        if not row[col].strip():
            raise SimInputError(f"{at}: {col} is empty")
    return Point(
        point_id=row["point_id"].strip(),
        source=row["source"].strip(),
        split=_choice(row, "split", SPLITS, at),
        model=_choice(row, "model", models, at),
        gpu=_choice(row, "gpu", gpus, at),
        weight_precision=_choice(row, "weight_precision", tuple(WEIGHTS), at),
        activation_precision=_choice(row, "activation_precision", tuple(ACTIVATIONS), at),
        kv_precision=_choice(row, "kv_precision", tuple(KV), at),
        engine=_choice(row, "engine", tuple(ENGINES), at),
        metric=metric,
        value=value,
        unit=unit,
        line=line,
        **n,
    )


def load(path: str | Path = DEFAULT_CSV) -> list[Point]:
    """Every row of a published-measurements CSV, validated; one SimInputError for the first bad row."""
    from .hardware import hardware_names
    from .models import model_names

    path = Path(path)
    where = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SimInputError(f"{where}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise SimInputError(f"{where}: not UTF-8 text (byte {e.start})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise SimInputError(f"{where}: missing columns {', '.join(missing)}")
    models, gpus = model_names(), hardware_names()
    points, ids, split_of = [], set(), {}
    for row in reader:
        line = reader.line_num  # the row's last physical line (a quoted field may span lines)
        if None in row or any(v is None for v in row.values()):
            raise SimInputError(f"{where}:{line}: expected {len(reader.fieldnames)} fields")
        p = parse_row(row, line, where, models, gpus)
        if p.point_id in ids:
            raise SimInputError(f"{where}:{line}: point_id {p.point_id!r} given twice")
        if split_of.setdefault(p.source, p.split) != p.split:
            raise SimInputError(
                f"{where}:{line}: source {p.source!r} is in both splits; every point of a source must be in one"
            )
        ids.add(p.point_id)
        points.append(p)
    if not points:
        raise SimInputError(f"{where}: no rows")
    return points


# ---------------------------------------------------------------- prediction


def predict(p: Point, engines: dict | None = None, hardware: dict | None = None) -> Result:
    """kvq-sim's prediction of one point through the public API, or the reason it cannot express it.
    engines / hardware: preset name -> Engine, gpu name -> Hardware to use instead of the committed ones
    (the fits of kvq_sim.fitpresets evaluate candidates this way)."""
    from .api import deployment, generation_time
    from .engines import get_engine
    from .hardware import load_hardware
    from .latency import prefill_seconds
    from .memory import memory
    from .models import load_model

    if p.pp > 1:
        return Result(p, None, f"pipeline parallelism (pp={p.pp}) is not modelled")
    if p.tp > 1 and p.cp > 1:
        return Result(p, None, "tensor and context parallelism together are not modelled")
    name = ENGINES[p.engine]
    engine = (engines or {}).get(name) or get_engine(name)
    method, bits = KV[p.kv_precision]
    scheme = WEIGHTS[p.weight_precision]
    shape, hw = (
        load_model(p.model),
        (hardware or {}).get(p.gpu) or load_hardware(p.gpu),
    )  # a broken config is an error, not a point's reason
    try:
        dep = deployment(
            shape,
            hw,
            bits,
            method,
            scheme.bits,
            p.gpu_count,
            "cp" if p.cp > 1 else "tp",
            weight_scheme=scheme,
            activation_bits=ACTIVATIONS[p.activation_precision],
            engine=engine,
        )
    except SimInputError as e:
        return Result(p, None, str(e))
    context = p.prompt_tokens + p.output_tokens
    mb = memory(dep, p.batch, context)
    if p.metric == "peak_memory":
        return Result(p, float(mb.total_bytes - mb.reserve_bytes))
    if not mb.fits:
        need, have = mb.total_bytes / 2**30, mb.usable_bytes / 2**30
        return Result(p, None, f"does not fit kvq-sim's memory model: {need:.1f} GiB per GPU, {have:.1f} GiB usable")
    if p.output_tokens == 1:  # the prefill produces the first (only) token
        prefill_s = p.batch * prefill_seconds(dep, p.prompt_tokens) + engine.request_overhead_ms * 1e-3
        decode_s = 0.0
    else:
        g = generation_time(dep, p.batch, p.prompt_tokens, p.output_tokens - 1)
        prefill_s, decode_s = g.prefill_s, g.decode_s
    if p.metric == "first_token_latency":
        return Result(p, prefill_s)
    if p.metric == "decode_step_latency":
        if p.output_tokens == 1:
            return Result(p, None, "a decode step needs output_tokens >= 2")
        return Result(p, decode_s / (p.output_tokens - 1))
    return Result(p, prefill_s + decode_s)  # request latency, or a throughput as its request time


def validate(path: str | Path = DEFAULT_CSV) -> Report:
    rep = Report(display_path(Path(path)))
    rep.results = [predict(p) for p in load(path)]
    return rep


# ---------------------------------------------------------------- output


def _rows(stats: dict[str, Stats]) -> list[str]:
    return [f"| {k} | {s.n} | {s.signed_pct:+.1f} | {s.mape_pct:.1f} |" for k, s in stats.items()]


def _table(rep: Report, title: str, key) -> list[str]:
    out = [f"| {title} | n | signed mean error % | MAPE % |", "|---|---:|---:|---:|"]
    for split in SPLITS:
        out.append(f"| **{split}** | | | |")
        out += _rows(rep.stats(split, key))
    return out + [""]


def _fmt(p: Point, v: float) -> str:
    if p.metric == "peak_memory":
        return f"{v / 1e9:.2f} GB"
    if p.metric == "generation_throughput":  # ms per output token of one sequence
        return f"{1e3 * v / p.output_tokens:.2f} ms/token"
    return f"{v * 1e3:.1f} ms"


def render(rep: Report) -> str:
    """Markdown: overall, per source, per GPU/parallelism class and per metric, held-out and calibration apart;
    then the largest errors and every point kvq-sim cannot express (with the reason)."""
    out = [f"## kvq-sim validate --published {rep.path}", ""]
    out += ["| split | n | signed mean error % | MAPE % |", "|---|---:|---:|---:|"]
    for split in SPLITS:
        s = rep.overall(split)
        out.append(f"| {split} | {s.n} | {s.signed_pct:+.1f} | {s.mape_pct:.1f} |")
    out.append("")
    out += _table(rep, "source", lambda p: p.source)
    out += _table(rep, "GPU / parallelism", lambda p: p.gpu_class)
    out += _table(rep, "metric", lambda p: p.metric)
    out += ["Largest errors (positive: kvq-sim slower or larger than measured; throughput as ms per output token):", ""]
    for split in SPLITS:
        out += [
            f"| {split} point | source | class | metric | measured | predicted | error % |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for r in rep.worst(split):
            p = r.point
            out.append(
                f"| {p.point_id} | {p.source} | {p.gpu_class} | {p.metric} | {_fmt(p, p.measured)} | "
                f"{_fmt(p, r.predicted)} | {r.err_pct:+.1f} |"
            )
        out.append("")
    if rep.unexpressible:
        out += ["Not expressible in kvq-sim (not in the statistics):", ""]
        out += [f"- {r.point.point_id} ({r.point.split}): {r.reason}" for r in rep.unexpressible]
    else:
        out.append("Every point is expressible in kvq-sim.")
    return "\n".join(out)


def over_thresholds(rep: Report, max_mape: float | None, max_class_bias: float | None) -> list[str]:
    """The held-out thresholds a report exceeds, one line each (empty: none given or none exceeded)."""
    bad = []
    s = rep.overall("held_out")
    if max_mape is not None and not s.mape_pct <= max_mape:
        bad.append(f"held-out MAPE {s.mape_pct:.1f}% exceeds --max-mape {max_mape:g}%")
    if max_class_bias is not None:
        for k, c in rep.stats("held_out", lambda p: p.gpu_class).items():
            if not abs(c.signed_pct) <= max_class_bias:
                bad.append(f"held-out class {k}: signed mean error {c.signed_pct:+.1f}% beyond +-{max_class_bias:g}%")
    return bad
