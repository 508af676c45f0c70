"""Python API: `plan(...)` answers one sizing question as dataclasses; `sweep(...)` evaluates grids with numpy."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .deployment import Deployment, resolve_method
from .errors import SimInputError
from .hardware import GIB, Hardware, load_hardware
from .latency import StepTime, attention_seconds, decode_step, decode_terms, prefill_seconds
from .memory import MemoryBreakdown, memory
from .models import ModelShape, load_model
from .planner import MAX_BATCH, MAX_CONTEXT_TOKENS, check_weights_fit, max_batch, max_context

#: contexts at which the plan reports max batch (4K, 32K, 128K tokens)
PROBE_CONTEXTS = (4096, 32768, 131072)
#: context at which `kvq-sim list methods` reports average bits (KVQuant's 32K accounting point)
LIST_CONTEXT = 32768


@dataclass(frozen=True)
class BatchRow:
    """Max batch at one context, for the method and for fp16 KV on the same deployment."""

    context: int
    max_batch: int | None
    fp16_max_batch: int | None


@dataclass(frozen=True)
class PlanResult:
    """Everything `kvq-sim plan` prints: the answer point, its memory and decode time, and comparisons."""

    model: str
    gpu: str
    method: str
    bits: str
    kv_format: str
    weight_bits: int
    gpus: int
    parallel: str
    question: str
    batch: int
    context: int
    unbounded: bool  # a sliding window caps the cache: any context fits
    fits: bool
    kv_avg_bits: float
    memory: MemoryBreakdown
    decode: StepTime | None
    prefill_s: float | None
    max_context_batch1: int | None
    fp16_max_context_batch1: int | None
    batch_rows: tuple[BatchRow, ...]
    assumptions: tuple[str, ...]

    @property
    def context_gain_over_fp16(self) -> float | None:
        a, b = self.max_context_batch1, self.fp16_max_context_batch1
        return None if a is None or not b else a / b

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"]["kv_bytes"] = self.memory.kv_bytes
        d["memory"]["total_bytes"] = self.memory.total_bytes
        if self.decode is not None:
            d["decode"].update(
                step_s=self.decode.step_s, tokens_per_s=self.decode.tokens_per_s, bound=self.decode.bound
            )
        d["context_gain_over_fp16"] = self.context_gain_over_fp16
        return d


def deployment(
    model: str | ModelShape,
    gpu: str | Hardware,
    bits: str | float | None = None,
    method: str | None = None,
    weight_bits: int = 16,
    gpus: int | None = None,
    parallel: str = "tp",
) -> Deployment:
    """Build a validated Deployment from names (or loaded configs) as the CLI takes them."""
    shape = model if isinstance(model, ModelShape) else load_model(model)
    hw = gpu if isinstance(gpu, Hardware) else load_hardware(gpu)
    name, kv, fmt = resolve_method(method, bits)
    return Deployment(shape, hw, name, kv, fmt, weight_bits, hw.gpus if gpus is None else gpus, parallel)


def _check_range(label: str, value: int | None, upper: int) -> None:
    if value is not None and not (isinstance(value, int) and 1 <= value <= upper):
        raise SimInputError(f"{label} must be an integer in 1..{upper:,}, got {value!r}")


def assumptions(dep: Deployment) -> tuple[str, ...]:
    """Plain-language assumptions a user needs to read the numbers."""
    hw, f = dep.hardware, dep.kv_format
    w = {16: "fp16", 8: "int8, per-row fp16 scale", 4: "int4, group 128 fp16 scale+zero"}[dep.weight_bits]
    cal = "calibrated" if hw.calibration.calibrated else "UNCALIBRATED priors"
    par = {"tp": "tensor parallel (heads, MLP and vocab split)", "cp": "context parallel (tokens split)"}
    return (
        f"weights: {w}; embeddings and LM head fp16",
        f"usable memory per GPU: {hw.usable_memory_gib:.2f} GiB, minus {hw.reserve_bytes / GIB:.2f} GiB CUDA context"
        " + workspace reserve",
        f"KV format {f.name}: codes, scales/zeros, outliers, fp16 residual window and sinks, per-layer shared"
        " tensors all counted (kvq-core formats)",
        "allocator: tensors > 1 MiB rounded up to 2 MiB, smaller to 512 B; fragmentation not modelled",
        f"activations: max(decode step, one {dep.prefill_chunk_tokens}-token prefill chunk); fused dequantization",
        f"parallelism: {dep.gpus} GPU(s), {par[dep.parallel]}" if dep.gpus > 1 else "parallelism: 1 GPU",
        f"latency: roofline with {cal} efficiencies ({hw.source_file})",
    )


def plan(
    model: str | ModelShape,
    gpu: str | Hardware,
    bits: str | float | None = None,
    method: str | None = None,
    weight_bits: int = 16,
    context: int | None = None,
    batch: int | None = None,
    gpus: int | None = None,
    parallel: str = "tp",
    prompt: int | None = None,
    generate: int | None = None,
    probe_contexts: tuple[int, ...] = PROBE_CONTEXTS,
) -> PlanResult:
    """Answer a sizing question: with context and batch, does it fit; with one of them, the max of the other."""
    _check_range("context", context, MAX_CONTEXT_TOKENS)
    _check_range("batch", batch, MAX_BATCH)
    _check_range("prompt", prompt, MAX_CONTEXT_TOKENS)
    _check_range("generate", generate, MAX_CONTEXT_TOKENS)
    if (prompt is None) != (generate is None):
        raise SimInputError("give both --prompt and --generate (a workload), or neither")
    if prompt is not None:
        if context is not None:
            raise SimInputError("give either --context or --prompt/--generate, not both")
        context = prompt + generate
    dep = deployment(model, gpu, bits, method, weight_bits, gpus, parallel)
    check_weights_fit(dep)
    base = dep.with_method("fp16")

    unbounded = False
    if context is not None and batch is not None:
        question = f"does batch {batch} x {context:,} tokens fit?"
    elif context is not None:
        question = f"max batch at {context:,} tokens"
        batch = max_batch(dep, context)
        if batch is None:
            raise SimInputError(f"more than {MAX_BATCH:,} sequences fit: not a meaningful plan")
    else:
        batch = batch or 1
        question = f"max context at batch {batch}"
        context = max_context(dep, batch)
        if context is None:
            unbounded, context = True, dep.model.sliding_window or MAX_CONTEXT_TOKENS
    point_batch = max(batch, 1)  # report the memory of one sequence when none fits
    mb = memory(dep, point_batch, max(context, 1))
    fmt, kvh, d = dep.kv_format, dep.kv_heads_per_gpu, dep.model.head_dim
    tokens = max(mb.kv_tokens_per_gpu, 1)
    return PlanResult(
        model=dep.model.name,
        gpu=dep.hardware.name,
        method=dep.method,
        bits=dep.bits_label,
        kv_format=fmt.name,
        weight_bits=dep.weight_bits,
        gpus=dep.gpus,
        parallel=dep.parallel,
        question=question,
        batch=batch,
        context=context,
        unbounded=unbounded,
        fits=bool(mb.fits) and batch > 0 and context > 0,
        kv_avg_bits=fmt.avg_bits(tokens, kvh, d),
        memory=mb,
        decode=decode_step(dep, point_batch, max(context, 1)) if mb.fits else None,
        prefill_s=prefill_seconds(dep, prompt) if prompt is not None else None,
        max_context_batch1=max_context(dep, 1),
        fp16_max_context_batch1=max_context(base, 1),
        batch_rows=tuple(BatchRow(c, max_batch(dep, c), max_batch(base, c)) for c in probe_contexts),
        assumptions=assumptions(dep),
    )


@dataclass(frozen=True)
class SweepResult:
    """Flat numpy columns, one row per (model, gpu, method, context, batch) point."""

    columns: dict

    def __len__(self) -> int:
        return len(self.columns["batch"])

    def to_dataframe(self):
        """The sweep as a pandas DataFrame (pandas is imported only here)."""
        import pandas as pd

        return pd.DataFrame(self.columns)


def sweep(
    models: list[str],
    gpus: list[str],
    methods: list[tuple[str, str | float | None]],
    contexts: list[int],
    batches: list[int],
    weight_bits: int = 16,
) -> SweepResult:
    """Memory, fit and decode-step time of single-GPU deployments over a grid; batches are vectorised and
    each (model, method, context) reads kvq-core once. Equal to `memory` / `decode_step` point by point."""
    import numpy as np

    b = np.asarray(batches, dtype=np.int64)
    n = len(b)
    cols: dict[str, list] = {k: [] for k in ("model", "gpu", "method", "bits", "context")}
    arrays: dict[str, list] = {k: [] for k in ("batch", "total_bytes", "kv_bytes", "fits", "step_s")}
    hws = [load_hardware(g) for g in gpus]
    for mname in models:
        shape = load_model(mname)
        for meth, bits in methods:
            # Single-GPU bytes and FLOPs do not depend on the GPU: evaluate each context once, then
            # apply each GPU's reserve, capacity, bandwidths and efficiencies.
            deps = [deployment(shape, hw, bits, meth, weight_bits, 1, "tp") for hw in hws]
            per_context = []
            for c in contexts:
                mb = memory(deps[0], b, c)
                t = decode_terms(deps[0], b, c)
                per_context.append((c, mb.total_bytes - mb.reserve_bytes, mb.kv_bytes, t))
            for gname, dep in zip(gpus, deps):
                g = decode_terms(dep, 1, contexts[0])  # this GPU's bandwidths, peak and launch cost
                for c, used, kv, t in per_context:
                    total = used + dep.hardware.reserve_bytes
                    step = (
                        np.maximum(t.weight_bytes / g.weight_bw, t.gemm_flops / g.peak_flops)
                        + attention_seconds(dep, b, c, t.kv_bytes, t.attn_flops)
                        + g.launch_s
                    )
                    cols["model"].append(mname)
                    cols["gpu"].append(gname)
                    cols["method"].append(dep.method)
                    cols["bits"].append(dep.bits_label)
                    cols["context"].append(c)
                    arrays["batch"].append(b)
                    arrays["total_bytes"].append(total)
                    arrays["kv_bytes"].append(kv)
                    arrays["fits"].append(total <= dep.hardware.usable_memory_bytes)
                    arrays["step_s"].append(step)
    out = {k: np.repeat(np.asarray(v), n) for k, v in cols.items()}
    out.update({k: np.concatenate(v) for k, v in arrays.items()})
    return SweepResult(out)
