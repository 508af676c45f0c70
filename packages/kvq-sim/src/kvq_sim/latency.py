"""Roofline decode-step and prefill time per GPU: bytes read and FLOPs per operator, plus collectives.

Each operator takes max(bytes / (bandwidth * efficiency), flops / (peak * efficiency)); the step adds a
launch overhead per kernel and the tensor-parallel all-reduces or context-parallel combines. The
efficiencies and overheads come from the hardware YAML's `calibration:` priors and the fit file it names.
A quantized KV cache is assumed to be read by a fused dequantize + attention kernel: it wins only by
reading fewer bytes (docs/references.md §5: fp16 decode already runs at 80-100% of bandwidth). When
`kvq-sim calibrate` has fitted the kvq kernel family of the deployment's format
(`calibration.attention_kernels`), attention takes that family's measured model instead
(`attention_kernel_us`: overhead + max(bandwidth, unpack)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .deployment import Deployment
from .grids import launch, wave_factor
from .hardware import Hardware, KernelFit
from .memory import kv_layer_groups, kv_tokens_per_gpu, linear_tensor_bytes, weight_bytes
from .weightgemv import dequant as gemv_dequant
from .weightgemv import ratio as gemv_ratio

# Kernels per layer in a decode step: 2 RMSNorms, qkv GEMV, RoPE + cache append, attention (+ split-KV
# combine), o_proj, gate/up GEMV, activation, down GEMV. Plus 4 per step: embedding, final norm, LM head,
# sampling.
KERNELS_PER_LAYER = 10
KERNELS_PER_STEP = 4
ALL_REDUCES_PER_LAYER = 2  # after o_proj and after down_proj (Megatron tensor parallelism)
BOUNDS = ("weights", "kv", "compute", "interconnect", "launch")
# The eager benchmark step (benchmarks/e2e_decode.py) launches many more, smaller kernels than a fused
# serving engine: torch.profiler on CPU counts 169 kernel-launching aten ops for 2 layers plus the final
# norm and head (RMSNorm 8 each, RoPE ~20 each for q and k, 2 cache appends, 4 GEMVs, SiLU, mul, adds).
EAGER_KERNELS_PER_LAYER = 80
EAGER_KERNELS_PER_STEP = 9  # final RMSNorm (8) + LM head


def attention_kernel_us(
    k: KernelFit, hbm_bandwidth_gb_s: float, bytes_read, kv_elements, q_elements, grid: GridTerms | None = None
):
    """Time of one decode-attention launch of a fitted family; array arguments broadcast.

    bytes_read: every cached byte read (codes, scales, zeros, residual); kv_elements = 2 * B * H_kv * T * D;
    q_elements = 2 * B * H_q * T * D; grid: the launch's program terms (`grid_terms`), None for a family
    without a grid model. E.g. kvq_fp16 (7 us, 0.93, no grid) at B=1, 32 heads, 64K tokens, 1.07 GB:
    7 + 1.07e9 / (0.93 * 3350e9) s = 7 + 345 = 352 us.
    """
    import numpy as np

    eff = k.bandwidth_efficiency
    fixed, wave = k.overhead_us, 1.0
    if grid is not None:
        split_us = (k.split_overhead_us + k.split_us_per_split * grid.splits) * grid.split
        fixed = fixed + k.program_us * grid.programs_per_sm + split_us
        wave = grid.wave
        if k.nosplit_bandwidth_efficiency > 0:
            eff = np.where(grid.split, k.bandwidth_efficiency, k.nosplit_bandwidth_efficiency)
    mem_us = bytes_read / (eff * hbm_bandwidth_gb_s * 1e3)  # GB/s * 1e3 = bytes/us
    cmp_us = (k.unpack_ps_per_kv_element * kv_elements + k.dot_ps_per_q_element * q_elements) * 1e-6
    return fixed + wave * np.maximum(mem_us, cmp_us)


@dataclass(frozen=True)
class GridTerms:
    """Per-launch grid inputs of attention_kernel_us; numpy arrays over batch (or scalars)."""

    programs_per_sm: object  # all programs (main + tail) / SMs
    wave: object  # ceil(w) / w over the main programs, 1 where not modelled
    split: object  # bool: the launch splits the context
    splits: object = 1  # the context's splits (1 where it is not split)


def grid_terms(k: KernelFit, sms: int, batch, q_heads: int, kv_heads: int, context: int, head_dim: int):
    """GridTerms of family `k` for each batch value, or None when `k` has no grid model."""
    import numpy as np

    if not k.grid:
        return None
    b = np.atleast_1d(np.asarray(batch, dtype=np.int64))
    per = [
        launch(k.grid, int(x), q_heads, kv_heads, context, head_dim, sms, k.block_tokens, k.split_waves,
               k.tail_programs_per_row, k.resident_programs_per_sm)
        for x in b
    ]  # fmt: skip
    shape = np.shape(batch)
    prog = np.array([(p.programs + p.tail_programs) / sms for p in per]).reshape(shape)
    wave = np.array([wave_factor(p.programs, sms, k.programs_per_sm) for p in per]).reshape(shape)
    split = np.array([p.split for p in per]).reshape(shape)
    splits = np.array([p.splits for p in per]).reshape(shape)
    return GridTerms(prog, wave, split, splits)


def remat_flops_per_token(dep: Deployment) -> int:
    """Extra FLOPs per cached token per layer per decode step the format declares (XQuant rematerializes
    K, V = X W_k, X W_v: 2 * hidden * 2 * kv_heads * head_dim); 0 for K/V-storing formats and for a
    kvq-core without the field. Under tensor parallelism each GPU rematerializes its own KV heads."""
    f = getattr(dep.kv_format, "remat_flops_per_token", 0)
    if callable(f):
        return int(f(dep.kv_heads_per_gpu, dep.model.head_dim, dep.model.hidden_size))
    return int(f)


def attention_family(dep: Deployment) -> str | None:
    """The kvq kernel family that reads this deployment's cache, or None when kvq has no kernel for it."""
    if dep.method == "fp16":
        return "kvq_fp16"
    kb, vb = dep.kv_bits
    if dep.method == "kivi" and kb == vb and float(kb).is_integer():
        m = dep.model
        return f"kvq_kivi_{int(kb)}b_{'mha' if m.num_attention_heads == m.num_key_value_heads else 'gqa'}"
    return None


def attention_seconds(dep: Deployment, batch, context: int, kv_bytes, attn_flops):
    """Decode attention of all layers on one GPU: the calibrated kernel family when there is one, else the
    roofline max(kv_bytes / kv bandwidth, flops / peak). `kv_bytes`, `attn_flops` come from decode_terms."""
    import numpy as np

    hw, m = dep.hardware, dep.model
    family = attention_family(dep)
    fit = hw.calibration.kernel(family) if family else None
    if fit is None:
        eff = _kv_efficiency(dep)
        return np.maximum(kv_bytes / (hw.hbm_bandwidth_gb_s * 1e9 * eff), attn_flops / _peak(hw))
    tokens = kv_tokens_per_gpu(dep, context)
    unpacked = batch * tokens  # cached tokens dequantized; a prefix read once per batch is unpacked once
    if dep.prefix_reads == "shared" and dep.prefix_tokens(context):
        p = kv_tokens_per_gpu(dep, dep.prefix_tokens(context))
        unpacked = batch * (tokens - p) + p
    per_layer = attention_kernel_us(
        fit,
        hw.hbm_bandwidth_gb_s,
        kv_bytes / m.num_hidden_layers,
        2 * dep.kv_heads_per_gpu * unpacked * m.head_dim,
        2 * batch * dep.heads_per_gpu * tokens * m.head_dim,
        grid_terms(fit, hw.sm_count, batch, dep.heads_per_gpu, dep.kv_heads_per_gpu, tokens, m.head_dim),
    )
    return m.num_hidden_layers * per_layer * 1e-6


def eager_step_us(hw: Hardware, weight_read_bytes: float, layers: int, attention_us_per_layer: float) -> float:
    """One step of the eager benchmark (benchmarks/e2e_decode.py): GEMVs stream the weights at the fitted
    weight_gemv efficiency, attention per layer from its kernel family, and every other kernel
    (EAGER_KERNELS_PER_LAYER per layer) costs kernel_launch_overhead_us."""
    cal = hw.calibration
    gemv_us = weight_read_bytes / (hw.hbm_bandwidth_gb_s * 1e3 * cal.weight_bandwidth_efficiency)
    kernels = layers * EAGER_KERNELS_PER_LAYER + EAGER_KERNELS_PER_STEP
    return gemv_us + layers * attention_us_per_layer + kernels * cal.kernel_launch_overhead_us


def weight_efficiency(dep: Deployment, tokens):
    """Fraction of HBM bandwidth the weight GEMVs of `tokens` tokens each (int or numpy array) stream at: the
    fp16 GEMV efficiency, times the measured quantized/fp16 ratio of the scheme's kernel when it names one
    (kvq_sim.weightgemv). E.g. int4 on h100-80g at batch 1: 0.9101 * 0.6733 = 0.613."""
    eff = dep.hardware.calibration.weight_bandwidth_efficiency
    kernel = applied_gemv_kernel(dep)
    return eff * gemv_ratio(kernel, tokens) if kernel else eff


def applied_gemv_kernel(dep: Deployment) -> str:
    """The measured kernel whose ratio costs this deployment's weights, "" for none: a kernel measured as a
    separate dequantize pass (int8: 2.2-2.5x the fp16 time, the 5 bytes moved per weight of an int8 read, a bf16
    write and its read) applies only to engines that dequantize separately (engines.separate_dequant)."""
    kernel = dep.weights.gemv_kernel
    if kernel and gemv_dequant(kernel) == "separate" and not (dep.engine and dep.engine.separate_dequant):
        return ""
    return kernel


def _kv_efficiency(dep: Deployment) -> float:
    cal = dep.hardware.calibration
    return cal.kv_fp16_bandwidth_efficiency if dep.method == "fp16" else cal.kv_quantized_bandwidth_efficiency


def _peak(hw: Hardware) -> float:
    return hw.fp16_dense_tflops * 1e12 * hw.calibration.tensor_core_efficiency


def _gemm_peak(dep: Deployment) -> float:
    """Linear-layer FLOP/s: fp16 tensor cores, or INT8 ones when activations are 8 (or 4) bits (W4A8 GEMMs
    run on INT8 tensor cores after the int4 -> int8 unpack, QServe sec. 4.1; A100 624 vs 312 dense)."""
    hw = dep.hardware
    if dep.activation_bits == 16:
        return _peak(hw)
    return hw.int8_dense_tops * 1e12 * hw.calibration.tensor_core_efficiency


@dataclass(frozen=True)
class StepTime:
    """Time of one decode step on one GPU, split by the resource each part waits on."""

    batch: int
    context: int
    weights_s: float  # operators bounded by reading weights
    kv_s: float  # attention bounded by reading the KV cache (codes + metadata + residual + sinks)
    compute_s: float  # operators bounded by tensor-core FLOP/s
    interconnect_s: float  # all-reduce (tp) or partial-attention combine (cp)
    launch_s: float
    weight_read_bytes: int
    kv_read_bytes: int
    flops: float

    @property
    def step_s(self) -> float:
        return self.weights_s + self.kv_s + self.compute_s + self.interconnect_s + self.launch_s

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second for the whole deployment: one token per sequence per step."""
        return self.batch / self.step_s

    @property
    def bound(self) -> str:
        """The resource that takes the largest share of the step."""
        parts = dict(zip(BOUNDS, (self.weights_s, self.kv_s, self.compute_s, self.interconnect_s, self.launch_s)))
        return max(parts, key=parts.get)


def _expected_experts(experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a batch touches under uniform routing: E * (1 - (1 - k/E)^B)."""
    return experts * (1 - (1 - top_k / experts) ** batch)


def _split(bytes_: float, flops: float, bw: float, peak: float) -> tuple[float, float]:
    """(memory seconds, compute seconds) of one operator: only the larger of the two counts."""
    t_mem, t_cmp = bytes_ / bw, flops / peak
    return (t_mem, 0.0) if t_mem >= t_cmp else (0.0, t_cmp)


@dataclass(frozen=True)
class DecodeTerms:
    """Raw roofline inputs of a decode step; fields are numbers or numpy arrays over batch."""

    weight_bytes: object
    gemm_flops: object
    kv_bytes: object
    attn_flops: object
    weight_bw: object  # bytes/s after efficiency (over batch when a quantized kernel's ratio depends on it)
    kv_bw: float
    peak_flops: float  # FLOP/s after efficiency
    interconnect_s: object
    launch_s: float
    gemm_peak_flops: float = 0.0  # FLOP/s of the linear layers after efficiency (INT8 peak with A8); 0: peak_flops


def layout(dep: Deployment) -> str:
    """The multi-GPU layout a collective fit is looked up by: "tp2", "cp4"; "tp1" on one GPU."""
    return f"{dep.parallel}{dep.gpus}" if dep.gpus > 1 else "tp1"


def collective_terms(dep: Deployment, batch) -> tuple[int, object]:
    """(collective calls, bytes each GPU sends) of one decode step. Tensor parallelism: two ring all-reduces of
    the [batch, hidden] fp16 activations per layer, 2 (N - 1) / N of the message each. Context parallelism: one
    all-gather per layer of the fp32 partial attention state (output, max, sum per head), (N - 1) messages."""
    m, layers = dep.model, dep.model.num_hidden_layers
    if dep.tp > 1:
        msg = batch * m.hidden_size * 2
        return layers * ALL_REDUCES_PER_LAYER, layers * ALL_REDUCES_PER_LAYER * 2 * (dep.tp - 1) / dep.tp * msg
    if dep.cp > 1:
        msg = batch * dep.heads_per_gpu * (m.head_dim + 2) * 4
        return layers, layers * (dep.cp - 1) * msg
    return 0, 0


def collective_seconds(fit, calls, nbytes):
    """Seconds of `calls` collective calls moving `nbytes` in all (per GPU; numbers or numpy arrays) under a
    layout's measured fit: its latency per call plus its bytes per second, for calls of any size. Beyond the
    largest call the fit saw (`max_call_bytes`) this extrapolates: kvq's 12 TP2 steps at batch 32-1024 (up to
    16 MiB a call, reports/measurements/multigpu_decode_h100_tp2_large_batch.csv) come out at 13.0% MAPE that
    way, and its 13 rows at 24.2% (too fast from batch 256) with the datasheet link charged beyond the fitted
    calls."""
    return calls * fit.latency_us * 1e-6 + (nbytes / (fit.bandwidth_gb_s * 1e9) if fit.bandwidth_gb_s else 0)


def prior_collective_seconds(hw: Hardware, gpus: int, calls, nbytes):
    """The same without a measured fit: the datasheet link at the calibrated efficiency, and a latency per call
    of `interconnect_latency_us` plus `interconnect_hop_latency_us` per GPU beyond the first."""
    call_us = hw.interconnect_latency_us + hw.interconnect_hop_latency_us * (gpus - 1)
    return calls * call_us * 1e-6 + nbytes / hw.link_bandwidth_bytes_s


def decode_terms(dep: Deployment, batch, context: int) -> DecodeTerms:
    """Bytes, FLOPs and fixed costs of one decode step; `batch` may be an int or a numpy array."""
    hw, cal, m = dep.hardware, dep.hardware.calibration, dep.model
    hbm = hw.hbm_bandwidth_gb_s * 1e9
    layers = m.num_hidden_layers

    # Weights: attention projections always; MoE reads only the experts the batch routes to. The expert
    # matrices of every layer (one layer's sum times the layer count) are what routing can skip.
    all_weights = weight_bytes(dep)[0]
    expert_bytes = layers * sum(
        lin.count * sum(linear_tensor_bytes(*_shard(dep, lin), dep.weights)) for lin in m.linears() if lin.count > 1
    )
    touched = _expected_experts(m.num_local_experts, m.num_experts_per_tok, batch) if m.is_moe else 1
    w_bytes = all_weights - expert_bytes + expert_bytes * touched / m.num_local_experts
    if m.tie_word_embeddings:
        w_bytes = w_bytes + 2 * math.ceil(m.vocab_size / dep.tp) * m.hidden_size  # table read as embed and head
    active_linear = (m.active_params - m.embedding_params - layers * m.layer_small_params) / dep.tp
    head_params = m.vocab_size * m.hidden_size / dep.tp

    # Attention: every cached byte of the format, once per step, per layer. A shared prefix is read once
    # per sequence (paged attention) unless prefix_reads == "shared" (a cascade kernel reads it once).
    # A merged layer pair (MiniCache) is read by both its layers: the shared direction (codes) twice.
    tokens = kv_tokens_per_gpu(dep, context)
    kv_bytes = 0
    for g in kv_layer_groups(dep, context):
        prefix_reads = g.prefix_bytes if dep.prefix_reads == "shared" else batch * g.prefix_bytes
        twice = g.key.codes + g.value.codes if g.merged_pair else 0
        per_seq = g.key.per_sequence + g.value.per_sequence + twice
        kv_bytes += g.layers * (batch * per_seq + g.key.shared + g.value.shared + prefix_reads)
    eff = _kv_efficiency(dep)

    calls, comm_bytes = collective_terms(dep, batch)
    fit = hw.collective(layout(dep))
    if fit is None:
        comm = prior_collective_seconds(hw, dep.gpus, calls, comm_bytes)
    else:
        comm = collective_seconds(fit, calls, comm_bytes)
    return DecodeTerms(
        weight_bytes=w_bytes,
        gemm_flops=2 * batch * (active_linear + head_params),
        kv_bytes=kv_bytes,
        # q.k and p.v over the tokens still cached (all but an evicting format's dropped ones), plus any
        # rematerialization of K and V from them (XQuant)
        attn_flops=layers
        * batch
        * dep.kv_format.stored_tokens(tokens)
        * (4 * dep.heads_per_gpu * m.head_dim + remat_flops_per_token(dep)),
        weight_bw=hbm * weight_efficiency(dep, batch),
        kv_bw=hbm * eff,
        peak_flops=hw.fp16_dense_tflops * 1e12 * cal.tensor_core_efficiency,
        interconnect_s=comm,
        launch_s=(layers * KERNELS_PER_LAYER + KERNELS_PER_STEP) * cal.kernel_launch_overhead_us * 1e-6,
        gemm_peak_flops=_gemm_peak(dep),
    )


def decode_step(dep: Deployment, batch: int, context: int) -> StepTime:
    """One decode step of `batch` sequences at `context` tokens on one GPU (all GPUs do the same work)."""
    t = decode_terms(dep, batch, context)
    w_mem, w_cmp = _split(t.weight_bytes, t.gemm_flops, t.weight_bw, t.gemm_peak_flops or t.peak_flops)
    kv_mem, kv_cmp = _split(t.kv_bytes, t.attn_flops, t.kv_bw, t.peak_flops)
    if attention_family(dep) and dep.hardware.calibration.kernel(attention_family(dep)):
        kv_mem, kv_cmp = float(attention_seconds(dep, batch, context, t.kv_bytes, t.attn_flops)), 0.0
    # A measured multi-GPU layout scales the sharded operators by what its fit found (smaller GEMVs and fewer
    # heads per GPU reach less bandwidth than the single-GPU fit predicts).
    fit = dep.hardware.collective(layout(dep)) if dep.gpus > 1 else None
    scale = fit.shard_scale if fit is not None else 1.0
    return StepTime(
        batch=batch,
        context=context,
        weights_s=w_mem * scale,
        kv_s=kv_mem * scale,
        compute_s=(w_cmp + kv_cmp) * scale,
        interconnect_s=t.interconnect_s,
        launch_s=t.launch_s * scale + (dep.engine.step_s(dep.model.num_hidden_layers) if dep.engine else 0.0),
        weight_read_bytes=int(t.weight_bytes),
        kv_read_bytes=t.kv_bytes,
        flops=t.gemm_flops + t.attn_flops,
    )


def _shard(dep: Deployment, lin) -> tuple[int, int]:
    """[out, in] of one expert matrix on one GPU under tensor parallelism."""
    if lin.split == "out":
        return math.ceil(lin.out_features / dep.tp), lin.in_features
    return lin.out_features, math.ceil(lin.in_features / dep.tp)


def prefill_seconds(dep: Deployment, prompt: int) -> float:
    """First-order time to prefill one `prompt`-token sequence in chunks, per GPU (compute or weight bound).

    FLOPs: 2 * prompt * active linear params (split by tp, or tokens split by cp) plus causal attention
    4 * heads * head_dim * prompt^2 / 2 per layer; bytes: the weights once per chunk, at the weight kernel's
    efficiency for a chunk of tokens.
    """
    m, hw, cal = dep.model, dep.hardware, dep.hardware.calibration
    chunks = math.ceil(prompt / dep.prefill_chunk_tokens)
    linear = m.active_params - m.embedding_params + m.vocab_size * m.hidden_size
    flops = (2 * prompt * linear + m.num_hidden_layers * 2 * m.num_attention_heads * m.head_dim * prompt**2) / dep.gpus
    # at the fp16 peak whatever the activation bits: an INT8/FP8 peak made the calibration part's 8-bit rows
    # worse (QServe W4A8 MAPE 18.4 -> 37.7%, TensorRT-LLM H200 FP8 TP1 17.6 -> 26.9%)
    t_cmp = flops / (hw.fp16_dense_tflops * 1e12 * cal.tensor_core_efficiency)
    eff = weight_efficiency(dep, min(prompt, dep.prefill_chunk_tokens))
    t_mem = chunks * weight_bytes(dep)[0] / (hw.hbm_bandwidth_gb_s * 1e9 * eff)
    comm = 0.0
    if dep.tp > 1:
        msg = min(prompt, dep.prefill_chunk_tokens) * m.hidden_size * 2
        call_us = hw.interconnect_latency_us + hw.interconnect_hop_latency_us * (dep.tp - 1)
        per = call_us * 1e-6 + 2 * (dep.tp - 1) / dep.tp * msg / hw.link_bandwidth_bytes_s
        comm = chunks * m.num_hidden_layers * ALL_REDUCES_PER_LAYER * per
    engine_s = dep.engine.prefill_s(m.num_hidden_layers) if dep.engine else 0.0
    return max(t_cmp, t_mem) + comm + engine_s
