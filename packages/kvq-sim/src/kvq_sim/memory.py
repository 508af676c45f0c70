"""Per-GPU memory at (batch, context): weights, KV cache from kvq-core formats, activations, reserve, rounding.

Every KV byte comes from `kvq_core.formats` (codes, scales, zeros, outliers, residual window, sinks, shared
per-layer tensors); nothing here re-derives them. Per GPU, for L layers:

    kv      = L * (batch * per_sequence(tokens_per_gpu, kv_heads_per_gpu) + shared)
    with a shared prefix of P tokens (SCBench's shared context, stored once per GPU for the batch):
    kv      = L * (batch * per_sequence(T - P) + per_sequence(P) + shared)
    (per_sequence(T - P): each sequence's own tokens as a sequence of their own; see kv_layer_parts).
    total   = weights + kv + max(decode activations, one prefill chunk's activations) + allocator rounding
    fits   <=> total <= usable_memory_bytes - (cuda_context_mib + framework_workspace_mib)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

from kvq_core.formats import ByteBreakdown, stream_bytes

from .deployment import Deployment
from .recipes import WEIGHT_SCHEMES, WeightScheme

MIB = 1 << 20
# PyTorch's CUDA caching allocator rounds requests above 1 MiB up to a multiple of 2 MiB (kRoundLarge)
# and smaller ones to 512 B (kMinBlockSize); each tensor is one request. Fragmentation is not modelled.
LARGE_ALLOC_BYTES = 1 * MIB
LARGE_ROUND_BYTES = 2 * MIB
SMALL_ROUND_BYTES = 512
# Split-KV decode writes partial (output, max, sum) per 512-token partition (vLLM paged attention v2).
SPLIT_KV_PARTITION_TOKENS = 512
# The per-sequence fields of a ByteBreakdown, each one tensor per stream per layer ([batch, ...]).
KV_FIELDS = tuple(f.name for f in fields(ByteBreakdown) if f.name != "shared")


def alloc_bytes(n):
    """Bytes the caching allocator reserves for an `n`-byte tensor (0 stays 0); n may be a numpy array."""
    step = SMALL_ROUND_BYTES + (LARGE_ROUND_BYTES - SMALL_ROUND_BYTES) * (n > LARGE_ALLOC_BYTES)
    return -(-n // step) * step


def _max(a, b):
    """max(a, b) for ints or numpy int arrays alike (exact: a + b + |a - b| is even)."""
    return (a + b + abs(a - b)) // 2


@lru_cache(maxsize=256)
def weight_bytes(dep: Deployment) -> tuple[int, int]:
    """(exact, allocator-rounded) bytes of the weights one GPU holds."""
    tensors = weight_tensors(dep)
    return sum(tensors), sum(map(alloc_bytes, tensors))


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU at one (batch, context); `kv_*` parts are exact format bytes, rounding is separate."""

    batch: int
    context: int
    kv_tokens_per_gpu: int
    weights_bytes: int
    kv_codes_bytes: int
    kv_scales_zeros_bytes: int
    kv_outliers_bytes: int
    kv_full_precision_bytes: int  # residual window + sinks (fp16)
    kv_shared_bytes: int  # per-layer codebooks, static scales, reorder indices
    activation_bytes: int
    allocator_rounding_bytes: int
    reserve_bytes: int  # CUDA context + framework workspace
    usable_bytes: int  # the GPU's usable memory (total_memory)
    kv_shared_prefix_bytes: int = 0  # the shared prefix, all its parts, stored once for the batch
    kv_tiers_bytes: int = 0  # low-rank factors, salient-token tier, attention scores, retained tokens

    @property
    def kv_bytes(self) -> int:
        return (
            self.kv_codes_bytes
            + self.kv_scales_zeros_bytes
            + self.kv_outliers_bytes
            + self.kv_full_precision_bytes
            + self.kv_shared_bytes
            + self.kv_shared_prefix_bytes
            + self.kv_tiers_bytes
        )

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.kv_bytes
            + self.activation_bytes
            + self.allocator_rounding_bytes
            + self.reserve_bytes
        )

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes


def linear_tensor_bytes(out_features: int, in_features: int, weights: int | WeightScheme) -> tuple[int, ...]:
    """Bytes of the tensors holding one [out, in] weight, by a weight scheme or a --weight-bits preset:
    16-bit (w); 8-bit (codes, per-row fp16 scale); 4- and 2-bit (packed codes, fp16 scale and zero per
    128-input group). See recipes.WeightScheme."""
    scheme = weights if isinstance(weights, WeightScheme) else WEIGHT_SCHEMES[weights]
    return scheme.linear_tensor_bytes(out_features, in_features)


def weight_tensors(dep: Deployment) -> list[int]:
    """Bytes of every weight tensor one GPU holds (MoE experts fused per projection, as vLLM stores them).

    Embedding and LM head stay 16-bit at every weight precision (GPTQ/AWQ convention) and are split by
    vocabulary under tensor parallelism; norms, router and biases stay 16-bit and replicated.
    """
    m, tp = dep.model, dep.tp
    tensors: list[int] = []
    per_layer: list[int] = []
    for lin in m.linears():
        out_f, in_f = lin.out_features, lin.in_features
        if lin.name in ("q_proj", "o_proj"):
            heads = dep.heads_per_gpu * m.head_dim
            out_f, in_f = (heads, in_f) if lin.name == "q_proj" else (out_f, heads)
        elif lin.name in ("k_proj", "v_proj"):
            out_f = dep.kv_heads_per_gpu * m.head_dim  # replicated heads when tp > kv heads
        elif lin.split == "out":
            out_f = math.ceil(out_f / tp)
        elif lin.split == "in":
            in_f = math.ceil(in_f / tp)
        per_layer += [lin.count * b for b in linear_tensor_bytes(out_f, in_f, dep.weights)]
    per_layer += [2 * m.hidden_size] * 2  # input and post-attention RMSNorm
    if m.is_moe:
        per_layer.append(2 * m.hidden_size * m.num_local_experts)  # router
    if m.attention_bias:
        per_layer.append(2 * (dep.heads_per_gpu + 2 * dep.kv_heads_per_gpu) * m.head_dim)
    tensors += per_layer * m.num_hidden_layers
    vocab_shard = 2 * math.ceil(m.vocab_size / tp) * m.hidden_size
    tensors += [vocab_shard] * (1 if m.tie_word_embeddings else 2)
    tensors.append(2 * m.hidden_size)  # final norm
    return tensors


def kv_tokens_per_gpu(dep: Deployment, context: int) -> int:
    """Tokens of one sequence one GPU's cache holds: the window cap, then the context-parallel shard.

    Each context-parallel shard is stored as its own stream (its own sinks and residual window), which
    overcounts by at most (cp - 1) * (sinks + window) full-precision tokens: a conservative choice.
    """
    return -(-dep.model.kv_tokens(context) // dep.cp)


def kv_layer_streams(dep: Deployment, tokens: int) -> tuple[ByteBreakdown, ByteBreakdown]:
    """Exact (key, value) bytes of one layer, one sequence, on one GPU, straight from kvq-core.

    Formats that cache the layer input X instead of K and V (XQuant: `cache_input` "x" / "x-delta",
    read with getattr so older kvq-core works) store one stream of `hidden_size` channels per token,
    returned as the key with an empty value. Every tensor-parallel GPU needs all of X to
    rematerialize its own K/V heads, so X is replicated, not split by tp.
    """
    f, h, d = dep.kv_format, dep.kv_heads_per_gpu, dep.model.head_dim
    if getattr(f, "cache_input", "kv") != "kv":
        return stream_bytes(f.key, tokens, 1, dep.model.hidden_size, f.sink_tokens), ByteBreakdown()
    return (
        stream_bytes(f.key, tokens, h, d, f.sink_tokens),
        stream_bytes(f.value, tokens, h, d, f.sink_tokens),
    )


@dataclass(frozen=True)
class LayerGroup:
    """`layers` layers (or merged layer pairs) that store the same bytes per GPU: private per-sequence
    key and value streams, and the shared prefix stored once (`prefix_bytes`)."""

    layers: int
    key: ByteBreakdown
    value: ByteBreakdown
    prefix_bytes: int
    merged_pair: bool = False  # a MiniCache pair: both layers read the shared direction (codes)


def _half(b: ByteBreakdown) -> ByteBreakdown:
    return ByteBreakdown(**{f.name: getattr(b, f.name) // 2 for f in fields(ByteBreakdown)})


def _pair_stream(dep: Deployment, tokens: int) -> ByteBreakdown:
    """One stream (K or V) of a merged layer pair at the format's retain_fraction: half of pair_breakdown,
    whose K and V halves are equal (kvq-core states every field is even)."""
    f, h, d = dep.kv_format, dep.kv_heads_per_gpu, dep.model.head_dim
    n = math.ceil(f.retain_fraction * tokens)
    return _half(f.pair_breakdown(tokens, h, d, n, n))


def kv_layer_groups(dep: Deployment, context: int) -> tuple[LayerGroup, ...]:
    """The model's layers on one GPU grouped by what they store at `context` tokens.

    One group of all layers for every format but cross-layer merging (MiniCache, read with getattr so
    older kvq-core works): there, the unmerged layers as `kv_layer_parts`, plus one group of merged pairs,
    each pair storing one shared direction, both layers' magnitudes and retained tokens
    (KVFormat.pair_breakdown); the sum equals kvq-core's `model_bytes`.
    """
    layers = dep.model.num_hidden_layers
    merge = getattr(dep.kv_format, "merge_pairs", None)
    pairs = len(merge(layers)) if merge else 0
    key, value, prefix = kv_layer_parts(dep, context)
    groups = [LayerGroup(layers - 2 * pairs, key, value, prefix)]
    if pairs:
        p = dep.prefix_tokens(context)
        own = _pair_stream(dep, kv_tokens_per_gpu(dep, context - p))
        shared = _pair_stream(dep, kv_tokens_per_gpu(dep, p)).per_sequence * 2 if p else 0
        groups.append(LayerGroup(pairs, own, own, shared, merged_pair=True))
    return tuple(g for g in groups if g.layers)


def kv_layer_parts(dep: Deployment, context: int) -> tuple[ByteBreakdown, ByteBreakdown, int]:
    """(private key, private value, shared-prefix bytes) of one layer on one GPU at `context` tokens.

    Without a shared prefix the private parts are the whole sequence (`kv_layer_streams`) and the prefix
    is 0 bytes. With P prefix tokens, the prefix is stored once as its own P-token sequence (codes, scales,
    its sinks and window: a prefix-cache block set is immutable) and each sequence privately holds the
    remaining T - P tokens as a sequence of their own (with their own residual window). At batch 1 this
    overcounts by at most one window + sinks: conservative, and never a negative part.
    """
    p = dep.prefix_tokens(context)
    key, value = kv_layer_streams(dep, kv_tokens_per_gpu(dep, context - p) if p else kv_tokens_per_gpu(dep, context))
    if not p:
        return key, value, 0
    pk, pv = kv_layer_streams(dep, kv_tokens_per_gpu(dep, p))
    return key, value, pk.per_sequence + pv.per_sequence


def activation_terms(dep: Deployment, context: int) -> tuple[int, int]:
    """(decode bytes per sequence, one prefill chunk's bytes) of transient activations on one GPU.

    Decode, per sequence (fp16 unless noted):  2 * (2*hidden + 2*q + 2*kv + 3*top_k*ffn/tp)
        (residual + normed hidden, q and attention output, new k and v, gate/up/activated MLP)
        + 4 * vocab/tp                                  fp32 logits
        + 4 * heads/tp * ceil(T/512) * (head_dim + 2)   fp32 split-KV partials (output, max, sum), T the
                                                        tokens the cache holds (an eviction budget caps it)
    Prefill of one chunk of C = min(chunk, context) tokens: the same fp16 buffers for C tokens (the
    chunk's fp16 K and V wait there before quantization) and fp32 logits of its last token; flash
    attention keeps no C x T scores. Fused dequantization is assumed: no fp16 copy of the cache.
    """
    m = dep.model
    q = dep.heads_per_gpu * m.head_dim
    kv = dep.kv_heads_per_gpu * m.head_dim
    ffn = math.ceil(m.intermediate_size / dep.tp) * m.num_experts_per_tok
    vocab = math.ceil(m.vocab_size / dep.tp)
    per_token = 2 * (2 * m.hidden_size + 2 * q + 2 * kv + 3 * ffn)
    # partials cover the tokens the cache still holds: an evicting format (H2O) reads its budget, not the context
    partitions = -(-dep.kv_format.stored_tokens(kv_tokens_per_gpu(dep, context)) // SPLIT_KV_PARTITION_TOKENS)
    decode = per_token + 4 * vocab + 4 * dep.heads_per_gpu * partitions * (m.head_dim + 2)
    chunk = min(dep.prefill_chunk_tokens, context)
    prefill = chunk * per_token + 4 * vocab
    return decode, prefill


def memory(dep: Deployment, batch, context: int) -> MemoryBreakdown:
    """Per-GPU memory holding `batch` sequences of `context` tokens each (batch may be a numpy int array)."""
    weights_exact, weights_alloc = weight_bytes(dep)
    usable = dep.hardware.usable_memory_bytes
    if dep.engine is not None:  # a paged engine allocates whole blocks and keeps a share of memory back
        block = dep.engine.kv_block_tokens
        context = -(-context // block) * block
        usable = int(usable * (1 - dep.engine.memory_reserve_fraction))
    tokens = kv_tokens_per_gpu(dep, context)
    groups = kv_layer_groups(dep, context)
    kv_alloc = kv_exact = 0
    parts = dict.fromkeys(("codes", "metadata", "outliers", "full", "shared", "prefix", "tiers"), 0)
    for g in groups:
        per_seq = g.key + g.value
        kv_alloc += g.layers * (
            sum(alloc_bytes(batch * getattr(s, f)) for s in (g.key, g.value) for f in KV_FIELDS)
            + alloc_bytes(g.key.shared)
            + alloc_bytes(g.value.shared)
            + alloc_bytes(g.prefix_bytes)
        )
        kv_exact += g.layers * (batch * per_seq.per_sequence + per_seq.shared + g.prefix_bytes)
        listed = per_seq.codes + per_seq.metadata + per_seq.outliers + per_seq.residual + per_seq.sinks
        parts["codes"] += g.layers * batch * per_seq.codes
        parts["metadata"] += g.layers * batch * per_seq.metadata
        parts["outliers"] += g.layers * batch * per_seq.outliers
        parts["full"] += g.layers * batch * (per_seq.residual + per_seq.sinks)
        parts["shared"] += g.layers * per_seq.shared
        parts["prefix"] += g.layers * g.prefix_bytes
        parts["tiers"] += g.layers * batch * (per_seq.per_sequence - listed)
    decode, prefill = activation_terms(dep, context)
    return MemoryBreakdown(
        batch=batch,
        context=context,
        kv_tokens_per_gpu=tokens,
        weights_bytes=weights_exact,
        kv_codes_bytes=parts["codes"],
        kv_scales_zeros_bytes=parts["metadata"],
        kv_outliers_bytes=parts["outliers"],
        kv_full_precision_bytes=parts["full"],
        kv_shared_bytes=parts["shared"],
        activation_bytes=_max(batch * decode, prefill),
        allocator_rounding_bytes=weights_alloc - weights_exact + kv_alloc - kv_exact,
        reserve_bytes=dep.hardware.reserve_bytes,
        usable_bytes=usable,
        kv_shared_prefix_bytes=parts["prefix"],
        kv_tiers_bytes=parts["tiers"],
    )
