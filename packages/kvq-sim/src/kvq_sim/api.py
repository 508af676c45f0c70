"""Python API: `plan(...)` answers one sizing question as dataclasses; `sweep(...)` evaluates grids with numpy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .deployment import Deployment, deployment
from .engines import Engine
from .errors import SimInputError
from .hardware import GIB, Hardware, load_hardware
from .latency import (
    StepTime,
    attention_seconds,
    decode_step,
    decode_terms,
    prefill_seconds,
    remat_flops_per_token,
)
from .memory import MemoryBreakdown, memory
from .models import ModelShape, load_model
from .planner import MAX_BATCH, MAX_CONTEXT_TOKENS, check_weights_fit, max_batch, max_context
from .provenance import collectives_note, engine_note, term_sources
from .recipes import get_recipe

#: contexts at which the plan reports max batch (4K, 32K, 128K tokens)
PROBE_CONTEXTS = (4096, 32768, 131072)
#: context at which `kvq-sim list methods` reports average bits (KVQuant's 32K accounting point)
LIST_CONTEXT = 32768
#: a long generation's decode steps are summed exactly up to this many; beyond, the step time is evaluated
#: at this many + 1 evenly spaced steps and summed by the trapezoid rule (it is linear in context between
#: changes of the kernel's launch grid: llama-7b kivi-2 at batch 8, 1000 + 32000 tokens: equal to the exact
#: sum within 3e-10 on a100-80g and 1e-15 on h100-80g)
EXACT_DECODE_STEPS = 2048


@dataclass(frozen=True)
class GenerationTime:
    """One batch of requests of `prompt_tokens` prompt + `gen_tokens` generated tokens, served in lockstep:
    all prompts prefilled, then `gen_tokens` decode steps at context prompt + 1 .. prompt + gen_tokens."""

    prompt_tokens: int
    gen_tokens: int
    batch: int
    prefill_s: float  # all `batch` prompts, one after another (a shared prefix is prefilled once)
    decode_s: float  # the sum of the decode steps
    first_step_s: float  # decode step at prompt + 1 tokens
    last_step_s: float  # decode step at prompt + gen_tokens tokens
    exact_sum: bool  # every step evaluated (else trapezoid over EXACT_DECODE_STEPS + 1 of them)

    @property
    def request_s(self) -> float:
        """Time from arrival to last token of every request in the batch."""
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the whole request (prefill included)."""
        return self.batch * self.gen_tokens / self.request_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.gen_tokens / self.decode_s


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
    unbounded: bool  # a sliding window or an eviction budget caps the cache: any context fits
    fits: bool
    kv_avg_bits: float
    memory: MemoryBreakdown
    decode: StepTime | None
    prefill_s: float | None
    max_context_batch1: int | None
    fp16_max_context_batch1: int | None
    batch_rows: tuple[BatchRow, ...]
    assumptions: tuple[str, ...]
    recipe: str = ""
    activation_bits: int = 16
    weight_avg_bits: float = 16.0  # stored bits per linear weight, metadata included (llama-7b q_proj shape)
    shared_prefix_tokens: int = 0
    prefix_reads: str = "per-sequence"
    kv_remat_flops_per_token_layer: int = 0  # extra FLOPs per cached token per layer per decode step
    generation: GenerationTime | None = None
    cache_cap: str = ""  # what caps the cache when unbounded: "sliding window" or "<method> eviction"
    max_position_embeddings: int | None = None  # the model's trained context, when its config states it
    warnings: tuple[str, ...] = ()  # printed on stderr by the CLI: e.g. a context beyond the trained one
    term_sources: dict = field(default_factory=dict)  # step term -> where its efficiency comes from

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
        if self.generation is not None:
            g = self.generation
            d["generation"].update(
                request_s=g.request_s, tokens_per_s=g.tokens_per_s, decode_tokens_per_s=g.decode_tokens_per_s
            )
        return d


def _check_range(label: str, value: int | None, upper: int) -> None:
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= upper):
        raise SimInputError(f"{label} must be an integer in 1..{upper:,}, got {value!r}")


def assumptions(dep: Deployment) -> tuple[str, ...]:
    """Plain-language assumptions a user needs to read the numbers."""
    hw, f = dep.hardware, dep.kv_format
    w = dep.weights.name
    cal = {"calibrated": "calibrated efficiencies", "uncalibrated priors": "UNCALIBRATED prior efficiencies"}.get(
        hw.calibration.status, f"efficiencies {hw.calibration.status} (not measured on this GPU)"
    )
    par = {"tp": "tensor parallel (heads, MLP and vocab split)", "cp": "context parallel (tokens split)"}
    extra = []
    if dep.activation_bits != 16:
        extra.append(
            f"activations: {dep.activation_bits}-bit GEMM inputs, linear layers at the INT8 tensor-core peak "
            f"({hw.int8_dense_tops:,.0f} TOPS dense); activation memory still counted at fp16 (conservative)"
        )
    if dep.shared_prefix_tokens:
        reads = "once per sequence (paged attention)" if dep.prefix_reads == "per-sequence" else "once per batch"
        extra.append(
            f"shared prefix: the first {dep.shared_prefix_tokens:,} tokens of every sequence stored once per GPU; "
            f"decode attention reads it {reads}"
        )
    return (
        (
            f"weights: {w}; embeddings and LM head fp16",
            *extra,
            f"usable memory per GPU: {hw.usable_memory_gib:.2f} GiB, minus {hw.reserve_bytes / GIB:.2f} GiB CUDA context"
            " + workspace reserve",
            f"KV format {f.name}: codes, scales/zeros, outliers, fp16 residual window and sinks, per-layer shared"
            " tensors all counted (kvq-core formats)",
            "allocator: tensors > 1 MiB rounded up to 2 MiB, smaller to 512 B; fragmentation not modelled",
            f"activations: max(decode step, one {dep.prefill_chunk_tokens}-token prefill chunk); fused dequantization",
            f"parallelism: {dep.gpus} GPU(s), {par[dep.parallel]}" if dep.gpus > 1 else "parallelism: 1 GPU",
            f"latency: roofline with {cal} ({hw.source_file})",
        )
        + ((collectives_note(dep),) if dep.gpus > 1 else ())
        + ((f"engine {engine_note(dep.engine)}",) if dep.engine else ())
    )


def plan(
    model: str | ModelShape,
    gpu: str | Hardware,
    bits: str | float | None = None,
    method: str | None = None,
    weight_bits: int | None = None,
    context: int | None = None,
    batch: int | None = None,
    gpus: int | None = None,
    parallel: str = "tp",
    prompt: int | None = None,
    generate: int | None = None,
    probe_contexts: tuple[int, ...] = PROBE_CONTEXTS,
    recipe: str | None = None,
    shared_prefix_tokens: int = 0,
    prefix_reads: str = "per-sequence",
    gen_tokens: int | None = None,
    strict_context: bool = False,
    engine: str | Engine | None = None,
) -> PlanResult:
    """Answer a sizing question: with context and batch, does it fit; with one of them, the max of the other.

    recipe: a serving recipe (recipes.RECIPES) setting weights, activations and the KV method + bits;
    shared_prefix_tokens: of every sequence's context, a prefix stored once (SCBench shared context);
    gen_tokens: with `prompt`, a long-generation workload: size for prompt + gen_tokens and time the request;
    strict_context: refuse a context (or prompt + generation) beyond the model's max_position_embeddings
    instead of planning it with a warning. A max context found by the search is an answer, not a request:
    beyond max_position_embeddings it always comes with a warning.
    """
    _check_range("context", context, MAX_CONTEXT_TOKENS)
    _check_range("batch", batch, MAX_BATCH)
    _check_range("prompt", prompt, MAX_CONTEXT_TOKENS)
    _check_range("generate", generate, MAX_CONTEXT_TOKENS)
    _check_range("gen-tokens", gen_tokens, MAX_CONTEXT_TOKENS)
    if not (
        isinstance(shared_prefix_tokens, int)
        and not isinstance(shared_prefix_tokens, bool)
        and 0 <= shared_prefix_tokens <= MAX_CONTEXT_TOKENS
    ):
        raise SimInputError(
            f"shared-prefix-tokens must be an integer in 0..{MAX_CONTEXT_TOKENS:,}, got {shared_prefix_tokens!r}"
        )
    if gen_tokens is not None:
        if generate is not None:
            raise SimInputError("give either --generate or --gen-tokens, not both")
        if prompt is None:
            raise SimInputError("--gen-tokens needs --prompt (the prompt length)")
        generate = gen_tokens
    if (prompt is None) != (generate is None):
        raise SimInputError("give both --prompt and --generate (a workload), or neither")
    if prompt is not None:
        if context is not None:
            raise SimInputError("give either --context or --prompt/--generate, not both")
        context = prompt + generate
        if context > MAX_CONTEXT_TOKENS:
            raise SimInputError(
                f"prompt + generated tokens = {context:,} exceeds the context limit of {MAX_CONTEXT_TOKENS:,} tokens"
            )
    if shared_prefix_tokens:
        limit, what = (prompt, "--prompt") if prompt is not None else (context, "--context")
        if limit is not None and shared_prefix_tokens > limit:
            raise SimInputError(f"shared prefix of {shared_prefix_tokens:,} tokens exceeds {what} {limit:,}")
    elif prefix_reads != "per-sequence":
        raise SimInputError("--prefix-reads needs --shared-prefix-tokens")
    scheme, activation_bits = None, 16
    if recipe is not None:
        r = get_recipe(recipe)
        if method is not None or bits is not None:
            raise SimInputError(
                f"--recipe {r.name} sets the KV method and bits ({r.kv_method} {r.kv_bits}); drop --method/--bits"
            )
        if weight_bits is not None and weight_bits != r.weights.bits:
            raise SimInputError(f"--recipe {r.name} has {r.weights.bits}-bit weights; drop --weight-bits {weight_bits}")
        method, bits, weight_bits = r.kv_method, r.kv_bits, r.weights.bits
        scheme, activation_bits = r.weights, r.activation_bits
    weight_bits = 16 if weight_bits is None else weight_bits
    dep = deployment(
        model,
        gpu,
        bits,
        method,
        weight_bits,
        gpus,
        parallel,
        weight_scheme=scheme,
        activation_bits=activation_bits,
        shared_prefix_tokens=shared_prefix_tokens,
        prefix_reads=prefix_reads,
        engine=engine,
    )
    check_weights_fit(dep)
    base = dep.with_method("fp16")
    positions, warnings = dep.model.max_position_embeddings, []
    if context is not None and positions is not None and context > positions:
        beyond = (
            f"{context:,} tokens per sequence exceed {dep.model.name}'s max_position_embeddings ({positions:,}), "
            "the longest context it was trained for"
        )
        if strict_context:
            raise SimInputError(f"{beyond} (--strict-context refuses it)")
        warnings.append(f"{beyond}: memory planned as asked, quality there unknown")

    unbounded, cap = False, ""
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
        if context is not None and 0 < context < shared_prefix_tokens:
            raise SimInputError(
                f"shared prefix of {shared_prefix_tokens:,} tokens does not fit: at most {context:,} tokens per "
                f"sequence fit at batch {batch:,} ({dep.model.name}, KV {dep.method} {dep.bits_label}-bit)"
            )
        if context == 0:
            most = max_batch(dep, 1)
            raise SimInputError(
                f"batch {batch:,} does not fit {dep.hardware.name} even at 1 token per sequence: "
                f"at most {most:,} sequences fit ({dep.model.name}, KV {dep.method} {dep.bits_label}-bit)"
            )
        if context is None:
            if dep.cache_cap is None:  # nothing caps the cache, yet 2^34 tokens fit: no real GPU does this
                raise SimInputError(f"more than {MAX_CONTEXT_TOKENS:,} tokens fit: not a meaningful plan")
            unbounded, (context, cap) = True, dep.cache_cap
            if positions is not None:
                warnings.append(
                    f"any context fits in memory ({cap} caps the cache), but {dep.model.name} was trained for "
                    f"at most {positions:,} tokens (max_position_embeddings)"
                )
        elif positions is not None and context > positions:
            warnings.append(
                f"the max context {context:,} tokens is what memory holds; {dep.model.name} was trained for at "
                f"most {positions:,} tokens (max_position_embeddings)"
            )
    point_batch = max(batch, 1)  # report the memory of one sequence when none fits
    mb = memory(dep, point_batch, max(context, 1))
    fmt = dep.kv_format
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
        kv_avg_bits=_avg_bits(dep, tokens),
        memory=mb,
        decode=decode_step(dep, point_batch, max(context, 1)) if mb.fits else None,
        prefill_s=prefill_seconds(dep, prompt) if prompt is not None else None,
        max_context_batch1=max_context(dep, 1),
        fp16_max_context_batch1=max_context(base, 1),
        batch_rows=tuple(BatchRow(c, max_batch(dep, c), max_batch(base, c)) for c in probe_contexts),
        assumptions=assumptions(dep),
        recipe=recipe or "",
        activation_bits=dep.activation_bits,
        weight_avg_bits=dep.weights.avg_bits(dep.model.q_size, dep.model.hidden_size),
        shared_prefix_tokens=dep.shared_prefix_tokens,
        prefix_reads=dep.prefix_reads,
        kv_remat_flops_per_token_layer=remat_flops_per_token(dep),
        generation=generation_time(dep, batch, prompt, gen_tokens) if gen_tokens and mb.fits and batch else None,
        cache_cap=cap,
        max_position_embeddings=positions,
        warnings=tuple(warnings),
        term_sources=term_sources(dep),
    )


def _avg_bits(dep: Deployment, tokens: int) -> float:
    """The format's average bits per K/V element on one GPU; X-cache formats (XQuant) store `hidden_size`
    channels per token, which kvq-core needs to be told for GQA models; merging formats average all layers."""
    f, kvh, d = dep.kv_format, dep.kv_heads_per_gpu, dep.model.head_dim
    layers = dep.model.num_hidden_layers
    if getattr(f, "merge_pairs", None) and f.merge_pairs(layers):  # MiniCache: the whole model's average
        return 8 * f.model_bytes(tokens, kvh, d, layers) / (2 * tokens * kvh * d * layers)
    if getattr(f, "cache_input", "kv") != "kv":
        return f.avg_bits(tokens, kvh, d, dep.model.hidden_size)
    return f.avg_bits(tokens, kvh, d)


def generation_time(dep: Deployment, batch: int, prompt: int, gen_tokens: int) -> GenerationTime:
    """Prefill of `batch` prompts plus the sum of `gen_tokens` decode steps as the context grows.

    sum_{i=1..M} step(prompt + i): exact for M <= EXACT_DECODE_STEPS; else the trapezoid rule over
    EXACT_DECODE_STEPS + 1 evenly spaced steps, with the end correction (f(1) + f(M)) / 2 that turns an
    integral into a sum of integer points. With a shared prefix of P tokens the prefix is prefilled once:
    prefill(prompt) + (batch - 1) * (prefill(prompt) - prefill(P)).
    """
    import numpy as np

    def step(i: int) -> float:
        return decode_step(dep, batch, prompt + i).step_s

    if gen_tokens <= EXACT_DECODE_STEPS:
        times = [step(i) for i in range(1, gen_tokens + 1)]
        decode_s, first, last = float(sum(times)), times[0], times[-1]
    else:
        xs = np.unique(np.linspace(1, gen_tokens, EXACT_DECODE_STEPS + 1).round().astype(np.int64))
        ys = np.array([step(int(i)) for i in xs])
        integral = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))
        decode_s, first, last = integral + (ys[0] + ys[-1]) / 2, float(ys[0]), float(ys[-1])
    one = prefill_seconds(dep, prompt)
    p = dep.prefix_tokens(prompt)
    prefill_s = one + (batch - 1) * (one - (prefill_seconds(dep, p) if p else 0.0))
    if dep.engine is not None:  # once per request, before its first token
        prefill_s += dep.engine.request_overhead_ms * 1e-3
    return GenerationTime(
        prompt_tokens=prompt,
        gen_tokens=gen_tokens,
        batch=batch,
        prefill_s=prefill_s,
        decode_s=decode_s,
        first_step_s=first,
        last_step_s=last,
        exact_sum=gen_tokens <= EXACT_DECODE_STEPS,
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
                g = decode_terms(dep, b, contexts[0])  # this GPU's bandwidths (per batch), peak and launch cost
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
