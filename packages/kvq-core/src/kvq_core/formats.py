"""Exact storage formats of quantized KV caches: what is stored, and how many bytes it takes.

This module is data only and imports neither torch nor numpy, so the simulator (`kvq_sim`) and the
CLI can read it instantly. The quantizers in `kvq_core` store exactly the tensors described here; a
test holds `KVFormat.bytes(...)` equal to the summed `nbytes` of every tensor a cache holds.

Layout (one layer, one sequence; H = kv heads, T = tokens, D = head_dim):

- codes        uint8 ``[H, Tq, packed_row_bytes(bits, D)]``: every quantized token's D codes are
               packed along the channel axis (see `packed_row_bytes`), for both per-token and
               per-channel quantization, so a decode kernel streams one row per token.
- scales/zeros per-token  (``axis="token"``):   ``[H, Tq, ceil(D / G)]``
               per-channel (``axis="channel"``): ``[H, ceil(Tq / G), D]``, or ``[H, 1, D]`` when
               ``group_size is None`` (static per-channel scale from calibration, as KVQuant keys)
               symmetric formats store no zeros.
- outliers     per token row: ``k = ceil(outlier_fraction * H * D)`` (value, index) pairs and one
               row pointer per token plus one (CSR for values, one column per token for keys in
               CSC; KVQuant, arXiv:2401.18079, Appendix M accounting).
- residual     fp16 ``[H, R_t, D]``: full-precision recent tokens (KIVI, SKVQ windows).
- sinks        fp16 ``[H, S, D]``: the first S tokens kept in full precision.
- shared       per layer, not per sequence: the nuq codebook ``[2**bits]`` fp16, the static
               per-channel scales, channel-reorder indices int16 ``[H, D]``, an fp8 tensor scale,
               product-quantization codebooks ``[D / d_sub, 2**(bits * d_sub), d_sub]`` fp16.
- salient      token tiers (ZipCache, MiKV, heavy-hitter eviction): of the Tq body tokens,
               n_hi = salient_count(Tq) per head are stored at `salient_bits` (fp16 ``[H, n_hi, D]`` at
               16, else per-token codes + scale/zero), the other Tq - n_hi at `bits` (0 = evicted);
               per-layer fp16 channel normalisers ``[H, D]`` (ZipCache's channel-separable
               quantization); fp32 attention scores ``[H, n]`` per scored token (`scores`: one tensor
               for K and V, half of its bytes counted in each stream so `stream_bytes` stays exact).
- lowrank      fp16 factors of the quantization error per compressed chunk of C tokens and head:
               A ``[C, r]`` and B ``[D, r]`` (GEAR, arXiv:2403.05527).

- X caches     XQuant / XQuant-CL (`KVFormat.cache_input`): one per-token stream of the layer input,
               ``hidden_size`` channels per token (`key` describes it), instead of K and V;
               `KVFormat.remat_flops_per_token` is the matmul cost of rebuilding K and V from it.
- merged pairs MiniCache (`KVFormat.merge_depth_fraction`): per deep layer pair and stream, an fp16
               direction ``[H, T, D]``, fp16 magnitudes ``[2, H, T]`` and n retained tokens
               ``[2, H, n, D]`` fp16 + int32 indices ``[n]`` (`pair_breakdown`, `model_bytes`).

Fields added for the issue-8 methods (product codes, rotation, low-rank residual) default to
"absent", so a format that does not set them has exactly the bytes it had before.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Literal

Axis = Literal["token", "channel"]
Levels = Literal["uniform", "nonuniform", "float8_e4m3", "float8_e5m2", "product"]
Flush = Literal["block", "sliding"]
Importance = Literal["", "accumulated", "normalized"]
CacheInput = Literal["kv", "x", "x-delta"]

#: bytes of one stored metadata element, by dtype name.
DTYPE_BYTES: dict[str, int] = {
    "fp32": 4,
    "fp16": 2,
    "bf16": 2,
    "fp8_e4m3": 1,
    "e8m0": 1,
}  # e8m0: a power-of-two scale (shared exponent)

#: bit widths that pack into integer containers; 1.5 means ternary {0, 1, 2} (5 trits per byte).
SUPPORTED_BITS: tuple[float, ...] = (1, 1.5, 2, 3, 4, 5, 6, 7, 8)

TERNARY = 1.5
TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256
FULL_PRECISION_BYTES = 2  # residual window, sinks and outlier values are fp16
SCORE_BYTES = 4  # fp32 accumulated attention per (token, kv head) of token-tier formats


def check_count(name: str, value, minimum: int = 0) -> int:
    """`value` as an int if it is an integer >= `minimum` (bool refused); else a ValueError naming `name`.

    >>> check_count("tokens", 5.5)
    Traceback (most recent call last):
    ValueError: tokens must be an integer >= 0, got 5.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def bit_planes(bits: int) -> tuple[int, ...]:
    """Plane widths of a `bits`-wide code, low-order bits first: 3 -> (2, 1), 7 -> (4, 2, 1).

    8 is a single byte plane. Every other width is split into power-of-two planes, each packed
    densely, so 3-bit codes cost exactly 3 bits (8 codes in 3 bytes) with no wasted container bits.
    The widest plane holds the low-order bits: for 3 bits, plane 0 holds bits 0-1, plane 1 bit 2.
    """
    if bits == 8:
        return (8,)
    if not (isinstance(bits, int) and 1 <= bits <= 7):
        raise ValueError(f"bits must be an integer in 1..8 for bit planes, got {bits!r}")
    return tuple(w for w in (4, 2, 1) if bits & w)


def packed_row_bytes(bits: float, n: int) -> int:
    """Bytes that `n` codes of width `bits` occupy when packed along one row.

    >>> packed_row_bytes(2, 128), packed_row_bytes(3, 128), packed_row_bytes(1.5, 128)
    (32, 48, 26)
    """
    check_count("row length", n, 0)
    if bits == TERNARY:
        return math.ceil(n / TRITS_PER_BYTE)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}; valid: {', '.join(map(str, SUPPORTED_BITS))}")
    return sum(math.ceil(n * w / 8) for w in bit_planes(int(bits)))


@dataclass(frozen=True)
class StreamFormat:
    """How one of the two streams (keys or values) of a layer is stored.

    bits:              code width, 1-8 or 1.5 (ternary), or 16 for an unquantized stream.
    axis:              "token": each token's channels are grouped (per-token quantization);
                       "channel": each channel is grouped over tokens (per-channel, KIVI keys).
    group_size:        elements per group along the grouped axis; None = whole head_dim
                       (token axis) or one static calibrated scale per channel (channel axis).
    symmetric:         no zero point stored.
    levels:            "uniform" affine grid, "nonuniform" codebook of 2**bits fp16 levels per
                       layer (KVQuant nuq), or "float8_*" fp8 codes with one fp32 scale per layer.
    scale_dtype:       dtype of scales and zeros ("fp16", "bf16", "fp8_e4m3", "fp32").
    outlier_fraction:  fraction of each token's H*D elements kept sparse in full precision.
    residual_tokens:   full-precision recent tokens; `flush` says how they leave the window:
                       "block" (KIVI keys: quantized R at a time when R have accumulated) or
                       "sliding" (the oldest token is quantized as each new one arrives).
    reorder_channels:  int16 channel permutation per head stored once per layer (SKVQ).
    clip_ratio:        min/max shrink factor before quantization (SKVQ); no bytes.
    groups_span_heads: per-token groups run over the token's whole H*D vector (after reordering)
                       instead of within each head: SKVQ groups, KVQuant per-token value scales.
    pq_subspace_dims:  with levels="product": each head vector is split into D / pq_subspace_dims
                       subspaces, each stored as one code of ``bits * pq_subspace_dims`` bits that
                       indexes a per-layer k-means codebook (MILLION). `bits` stays bits/element.
    rotate:            a fast Walsh-Hadamard rotation (after `reorder_channels`, across the token's
                       heads) is applied before quantization (RotateKV); orthogonal, no bytes.
    lowrank_rank:      rank r of fp16 factors of the quantization error, one pair per chunk of
                       `residual_tokens` tokens and head (GEAR); needs block flush.
    importance:        token tiers by attention score: "accumulated" (H2O heavy hitters: the
                       high tier is fp16 and re-selected as scores grow; losers drop to `bits`)
                       or "normalized" (ZipCache: each token's tier is chosen once, when it leaves
                       the window, by its mean attention); "" = no tiers.
    salient_fraction:  share of body tokens in the high tier (ceil), or
    salient_budget:    a fixed number of high-tier body tokens per head (overrides the fraction).
    salient_bits:      bits of the high tier (16 = fp16). `bits` = 0 evicts the low tier.
    channel_normalize: divide channels by a per-layer fp16 normaliser before per-token codes
                       (ZipCache's channel-separable token-wise quantization).
    absmean:           1-bit / ternary symmetric codes whose per-group scale is mean |x| (BitNet-style,
                       VidKV) instead of max |x|; no bytes.
    mixed_fraction:    per-channel streams only (VidKV keys): this share of each head's channels, the
                       widest-range ("anomalous") ones from calibration, is stored at `mixed_bits`
                       (asymmetric, scale + zero per group); the others at `bits` (symmetric, scale).
    fft:               the non-anomalous channels of each token are stored as their D' real
                       orthonormal rFFT coefficients (VidKV's 1-bit + FFT keys).
    latent_fraction:   channel shrinking (CSKV): each token's H*D vector is stored as its
                       r = floor(f * H * D) coordinates (fp16, `bits` = 16) in a per-layer basis
                       ``[H*D, r]`` fp16 from the calibration SVD; decode multiplies back.
    age_steps:         staircase precision by age: ((n_1, b_1), (n_2, b_2), ...): past the window,
                       the newest n_1 body tokens are stored per token at b_1 bits, the next n_2 at
                       b_2, ..., all older ones at `bits`; a token steps down as it ages.
    """

    bits: float = 16
    axis: Axis = "token"
    group_size: int | None = None
    symmetric: bool = False
    levels: Levels = "uniform"
    scale_dtype: str = "fp16"
    outlier_fraction: float = 0.0
    outlier_value_bits: int = 16
    outlier_index_bits: int = 16
    outlier_pointer_bits: int = 32
    residual_tokens: int = 0
    flush: Flush = "sliding"
    reorder_channels: bool = False
    clip_ratio: float = 1.0
    groups_span_heads: bool = False
    pq_subspace_dims: int = 0
    rotate: bool = False
    lowrank_rank: int = 0
    importance: Importance = ""
    salient_fraction: float = 0.0
    salient_budget: int = 0
    salient_bits: float = 16
    channel_normalize: bool = False
    age_steps: tuple[tuple[int, float], ...] = ()
    absmean: bool = False
    mixed_fraction: float = 0.0
    mixed_bits: float = 2
    fft: bool = False
    latent_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("bits", "salient_bits", "mixed_bits", "outlier_fraction", "clip_ratio", "salient_fraction"):
            _check_number(name, getattr(self, name))
        for name in ("residual_tokens", "pq_subspace_dims", "lowrank_rank", "salient_budget"):
            check_count(name, getattr(self, name), 0)
        if self.group_size is not None:
            check_count("group_size", self.group_size, 1)
        if self.importance:
            self._check_tiers()
        elif self.bits != 16 and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit width {self.bits!r}; valid: {', '.join(map(str, SUPPORTED_BITS))}, 16")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"axis must be 'token' or 'channel', got {self.axis!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None, got {self.group_size}")
        if self.scale_dtype not in DTYPE_BYTES:
            raise ValueError(f"scale_dtype must be one of {sorted(DTYPE_BYTES)}, got {self.scale_dtype!r}")
        if self.levels not in ("uniform", "nonuniform", "float8_e4m3", "float8_e5m2", "product"):
            raise ValueError(f"unknown levels {self.levels!r}")
        if self.levels.startswith("float8") and self.bits != 8:
            raise ValueError(f"{self.levels} codes are 8 bits, got bits={self.bits}")
        if self.levels == "nonuniform" and self.bits == TERNARY:
            raise ValueError("a non-uniform codebook needs integer bits")
        if self.bits == 16 and self.levels != "uniform":
            raise ValueError(f"an unquantized (16-bit) stream has no {self.levels} codes")
        if not 0.0 <= self.outlier_fraction < 0.5:
            raise ValueError(f"outlier_fraction must be in [0, 0.5), got {self.outlier_fraction}")
        if self.residual_tokens < 0:
            raise ValueError(f"residual_tokens must be >= 0, got {self.residual_tokens}")
        if self.flush not in ("block", "sliding"):
            raise ValueError(f"flush must be 'block' or 'sliding', got {self.flush!r}")
        if self.flush == "block" and self.residual_tokens and self.axis == "channel" and self.group_size:
            if self.residual_tokens % self.group_size:
                raise ValueError(
                    f"block flush needs residual_tokens ({self.residual_tokens}) to be a multiple of "
                    f"group_size ({self.group_size})"
                )
        if self.groups_span_heads and self.axis != "token":
            raise ValueError("groups_span_heads applies to per-token (axis='token') streams")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if (self.levels == "product") != (self.pq_subspace_dims > 0):
            raise ValueError("product quantization needs levels='product' and pq_subspace_dims >= 1 together")
        if self.pq_subspace_dims and self.pq_code_bits not in range(1, 9):
            raise ValueError(
                f"product codes must be 1..8 bits: bits ({self.bits}) x pq_subspace_dims "
                f"({self.pq_subspace_dims}) = {self.bits * self.pq_subspace_dims}"
            )
        if self.absmean or self.mixed_fraction or self.fft:
            if self.axis != "channel" or not self.group_size or self.levels != "uniform" or self.outlier_fraction:
                raise ValueError("absmean / mixed channels / fft are per-channel uniform formats with groups (VidKV)")
            if not 0 <= self.mixed_fraction < 1 or self.mixed_bits not in SUPPORTED_BITS:
                raise ValueError(f"mixed_fraction must be in [0, 1) and mixed_bits in {SUPPORTED_BITS}")
            if self.absmean and (self.bits not in (1, TERNARY) or not self.symmetric):
                raise ValueError("absmean codes are symmetric 1-bit or ternary (1.5)")
        if self.age_steps:
            for n, b in self.age_steps:
                if n < 1 or b not in (*SUPPORTED_BITS, 16):
                    raise ValueError(f"age step ({n}, {b}) needs n >= 1 and bits in {SUPPORTED_BITS} or 16")
            if self.tiered or self.axis != "token" or self.flush != "sliding" or self.outlier_fraction:
                raise ValueError("age steps store per-token codes with a sliding window, without tiers or outliers")
            if self.reorder_channels or self.groups_span_heads or self.levels != "uniform":
                raise ValueError("age steps use plain uniform per-token codes per head")
        if self.latent_fraction:
            if not 0 < self.latent_fraction < 1 or self.bits != 16 or self.axis != "token":
                raise ValueError("channel shrinking stores fp16 (bits=16) per-token latents, latent_fraction in (0, 1)")
        if self.lowrank_rank < 0:
            raise ValueError(f"lowrank_rank must be >= 0, got {self.lowrank_rank}")
        if self.lowrank_rank and not (self.flush == "block" and self.residual_tokens):
            raise ValueError("a low-rank residual is fitted per flushed chunk: needs flush='block' and residual_tokens")

    def _check_tiers(self) -> None:
        if self.importance not in ("accumulated", "normalized"):
            raise ValueError(f"importance must be 'accumulated' or 'normalized', got {self.importance!r}")
        for name, b in (("bits", self.bits), ("salient_bits", self.salient_bits)):
            if b not in (0, *SUPPORTED_BITS, 16):
                raise ValueError(
                    f"{name} {b!r} unsupported; valid: 0 (evicted), {', '.join(map(str, SUPPORTED_BITS))}, 16"
                )
        if self.salient_bits == 0:
            raise ValueError("the high tier cannot be evicted (salient_bits=0)")
        if self.importance == "accumulated" and self.salient_bits != 16:
            raise ValueError("heavy-hitter tiers re-select the high tier as scores grow, so it must be fp16 (16)")
        if not (0 < self.salient_fraction <= 1 or self.salient_budget > 0):
            raise ValueError("token tiers need salient_fraction in (0, 1] or salient_budget >= 1")
        if (
            self.axis != "token"
            or self.flush != "sliding"
            or self.outlier_fraction
            or self.reorder_channels
            or self.groups_span_heads
            or self.levels != "uniform"
        ):
            raise ValueError("token tiers store per-token uniform codes per head with a sliding window only")

    @property
    def tiered(self) -> bool:
        return bool(self.importance)

    def salient_count(self, body_tokens: int) -> int:
        """High-tier tokens per head among `body_tokens` quantized tokens: min(T, budget) or ceil(f * T)."""
        check_count("body_tokens", body_tokens, 0)
        if self.salient_budget:
            return min(body_tokens, self.salient_budget)
        f = Fraction(self.salient_fraction).limit_denominator(10**6)  # exact ceil: 0.2 * 5 is 1, not 2
        return min(body_tokens, -(-body_tokens * f.numerator // f.denominator))

    def scored_tokens(self, body_tokens: int, residual: int) -> int:
        """Tokens per head whose fp32 attention score is kept: the window (+ the fp16 heavy hitters)."""
        if not self.tiered:
            return 0
        return residual + (self.salient_count(body_tokens) if self.importance == "accumulated" else 0)

    def mixed_channels(self, head_dim: int) -> int:
        """Channels per head stored at `mixed_bits` (VidKV's anomalous channels): floor(fraction * D)."""
        return math.floor(round(self.mixed_fraction * head_dim, 6))

    @property
    def pq_code_bits(self) -> int:
        """Bits of one product-quantization code (one subspace of one head of one token)."""
        return int(self.bits * self.pq_subspace_dims) if self.pq_subspace_dims else 0

    def pq_subspaces(self, head_dim: int) -> int:
        if head_dim % self.pq_subspace_dims:
            raise ValueError(f"head_dim {head_dim} is not a multiple of pq_subspace_dims {self.pq_subspace_dims}")
        return head_dim // self.pq_subspace_dims

    @property
    def quantized(self) -> bool:
        """Whether tokens leave the fp16 window into a compressed body (codes, or CSKV's fp16 latents)."""
        return self.bits != 16 or self.latent_fraction > 0

    def latent_dims(self, kv_heads: int, head_dim: int) -> int:
        """CSKV rank r: floor(latent_fraction * H * D), at least 1."""
        return max(1, math.floor(round(self.latent_fraction * kv_heads * head_dim, 6)))

    @property
    def num_levels(self) -> int:
        return 3 if self.bits == TERNARY else 2 ** int(self.bits)

    def residual_count(self, tokens: int) -> int:
        """Full-precision tokens held after `tokens` (past the sinks) have entered the stream."""
        r = self.residual_tokens
        if not self.quantized or r == 0:
            return tokens if not self.quantized else 0
        return tokens % r if self.flush == "block" else min(tokens, r)

    def outliers_per_token(self, kv_heads: int, head_dim: int) -> int:
        return math.ceil(self.outlier_fraction * kv_heads * head_dim) if self.outlier_fraction else 0

    def num_groups(self, quantized_tokens: int, kv_heads: int, head_dim: int) -> int:
        """Scale (and zero) entries per sequence for `quantized_tokens` tokens, all heads."""
        if self.levels in ("float8_e4m3", "float8_e5m2", "product"):
            return 0
        if self.axis == "token":
            row = kv_heads * head_dim if self.groups_span_heads else head_dim
            per_token = math.ceil(row / (self.group_size or row))
            return quantized_tokens * per_token * (1 if self.groups_span_heads else kv_heads)
        if self.group_size is None:
            return 0  # static per-channel scales are shared per layer
        return math.ceil(quantized_tokens / self.group_size) * head_dim * kv_heads


@dataclass(frozen=True)
class ByteBreakdown:
    """Bytes of one layer's K and V for one sequence (`per_sequence`) plus per-layer `shared` bytes."""

    codes: int = 0
    scales: int = 0
    zeros: int = 0
    outlier_values: int = 0
    outlier_indices: int = 0
    outlier_pointers: int = 0
    residual: int = 0
    sinks: int = 0
    lowrank: int = 0  # GEAR's fp16 error factors, per sequence
    salient: int = 0  # high-tier tokens (ZipCache / MiKV / heavy hitters): fp16 or codes + scale/zero
    scores: int = 0  # fp32 attention scores of tiered formats: shared by K and V, half counted in each stream
    retained: int = 0  # MiniCache: unmerged fp16 tokens + their int32 indices
    shared: int = 0  # codebooks, static scales, reorder indices, fp8 tensor scales: once per layer

    @property
    def metadata(self) -> int:
        return self.scales + self.zeros

    @property
    def outliers(self) -> int:
        return self.outlier_values + self.outlier_indices + self.outlier_pointers

    @property
    def per_sequence(self) -> int:
        return (
            self.codes
            + self.metadata
            + self.outliers
            + self.residual
            + self.sinks
            + self.lowrank
            + self.salient
            + self.scores
            + self.retained
        )

    @property
    def total(self) -> int:
        return self.per_sequence + self.shared

    def __add__(self, other: ByteBreakdown) -> ByteBreakdown:
        return ByteBreakdown(**{f: getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__})


def stream_bytes(fmt: StreamFormat, tokens: int, kv_heads: int, head_dim: int, sink_tokens: int) -> ByteBreakdown:
    """Exact bytes of one stream (K or V) of one layer holding `tokens` tokens of one sequence."""
    tokens = check_count("tokens", tokens, 0)
    h, d = check_count("kv_heads", kv_heads, 1), check_count("head_dim", head_dim, 1)
    sink_tokens = check_count("sink_tokens", sink_tokens, 0)
    sinks = min(tokens, sink_tokens)
    rest = tokens - sinks
    if not fmt.quantized:
        return ByteBreakdown(residual=tokens * h * d * FULL_PRECISION_BYTES)
    if fmt.tiered:
        return _tiered_bytes(fmt, rest, h, d, sinks)
    if fmt.age_steps:
        return _staircase_bytes(fmt, rest, h, d, sinks)
    resid = fmt.residual_count(rest)
    tq = rest - resid
    meta = DTYPE_BYTES[fmt.scale_dtype]
    groups = fmt.num_groups(tq, h, d)
    k = fmt.outliers_per_token(h, d)
    shared = 0  # per-layer tensors exist once anything is quantized
    if tq and fmt.levels == "nonuniform":
        shared += fmt.num_levels * FULL_PRECISION_BYTES
    if tq and fmt.levels.startswith("float8"):
        shared += DTYPE_BYTES["fp32"]
    if tq and fmt.axis == "channel" and fmt.group_size is None:
        shared += h * d * meta * (1 if fmt.symmetric else 2)
    if tq and fmt.reorder_channels:
        shared += h * d * 2
    if fmt.latent_fraction:
        r = fmt.latent_dims(h, d)
        return ByteBreakdown(
            codes=tq * r * FULL_PRECISION_BYTES,  # fp16 latent coordinates per token
            residual=resid * h * d * FULL_PRECISION_BYTES,
            sinks=sinks * h * d * FULL_PRECISION_BYTES,
            shared=h * d * r * FULL_PRECISION_BYTES if tq else 0,  # the basis [H*D, r]
        )
    if fmt.mixed_fraction:
        k = fmt.mixed_channels(d)
        blocks = math.ceil(tq / fmt.group_size)
        return ByteBreakdown(
            codes=h * tq * (packed_row_bytes(fmt.mixed_bits, k) + packed_row_bytes(fmt.bits, d - k)),
            scales=blocks * h * d * meta,  # k anomalous channels + d - k (FFT) coefficients, one scale each
            zeros=blocks * h * k * meta,  # the anomalous channels are asymmetric
            residual=resid * h * d * FULL_PRECISION_BYTES,
            sinks=sinks * h * d * FULL_PRECISION_BYTES,
            shared=h * d * 2 if (tq and fmt.reorder_channels) else 0,
        )
    if tq and fmt.levels == "product":
        shared += d * 2**fmt.pq_code_bits * FULL_PRECISION_BYTES  # [D / d_sub, 2**code_bits, d_sub]
        codes = h * tq * packed_row_bytes(fmt.pq_code_bits, fmt.pq_subspaces(d))
    else:
        codes = h * tq * packed_row_bytes(fmt.bits, d)
    lowrank = 0
    if fmt.lowrank_rank:
        chunk = fmt.residual_tokens  # block flush: tq is a whole number of chunks
        lowrank = (tq // chunk) * h * fmt.lowrank_rank * (chunk + d) * FULL_PRECISION_BYTES
    return ByteBreakdown(
        codes=codes,
        lowrank=lowrank,
        scales=groups * meta,
        zeros=0 if fmt.symmetric else groups * meta,
        outlier_values=tq * k * fmt.outlier_value_bits // 8,
        outlier_indices=tq * k * fmt.outlier_index_bits // 8,
        outlier_pointers=(tq + 1) * fmt.outlier_pointer_bits // 8 if k and tq else 0,
        residual=resid * h * d * FULL_PRECISION_BYTES,
        sinks=sinks * h * d * FULL_PRECISION_BYTES,
        shared=shared,
    )


def _token_codes_bytes(fmt: StreamFormat, bits: float, tokens: int, h: int, d: int) -> tuple[int, int]:
    """(code bytes, scale + zero bytes) of `tokens` per-token codes per head, or fp16 rows at 16 bits."""
    if bits == 0 or tokens == 0:
        return 0, 0
    if bits == 16:
        return tokens * h * d * FULL_PRECISION_BYTES, 0
    groups = tokens * h * math.ceil(d / (fmt.group_size or d))
    return h * tokens * packed_row_bytes(bits, d), groups * DTYPE_BYTES[fmt.scale_dtype] * (1 if fmt.symmetric else 2)


def _tiered_bytes(fmt: StreamFormat, rest: int, h: int, d: int, sinks: int) -> ByteBreakdown:
    resid = fmt.residual_count(rest)
    tq = rest - resid
    n_hi = fmt.salient_count(tq)
    hi_codes, hi_meta = _token_codes_bytes(fmt, fmt.salient_bits, n_hi, h, d)
    lo_codes, lo_meta = _token_codes_bytes(fmt, fmt.bits, tq - n_hi, h, d)
    meta = 1 if fmt.symmetric else 2
    return ByteBreakdown(
        codes=lo_codes,
        scales=lo_meta // meta,
        zeros=lo_meta - lo_meta // meta,
        salient=hi_codes + hi_meta,
        scores=fmt.scored_tokens(tq, resid) * h * SCORE_BYTES // 2,  # K and V share one fp32 tensor
        residual=resid * h * d * FULL_PRECISION_BYTES,
        sinks=sinks * h * d * FULL_PRECISION_BYTES,
        shared=h * d * FULL_PRECISION_BYTES if (tq and fmt.channel_normalize) else 0,
    )


def _staircase_bytes(fmt: StreamFormat, rest: int, h: int, d: int, sinks: int) -> ByteBreakdown:
    resid = fmt.residual_count(rest)
    left = rest - resid
    codes = meta = 0
    for n, b in (*fmt.age_steps, (left, fmt.bits)):  # newest first; the last step takes all older tokens
        c, m = _token_codes_bytes(fmt, b, min(left, n), h, d)
        codes, meta, left = codes + c, meta + m, left - min(left, n)
    per = 1 if fmt.symmetric else 2
    return ByteBreakdown(
        codes=codes,
        scales=meta // per,
        zeros=meta - meta // per,
        residual=resid * h * d * FULL_PRECISION_BYTES,
        sinks=sinks * h * d * FULL_PRECISION_BYTES,
    )


@dataclass(frozen=True)
class KVFormat:
    """How a layer's keys and values are stored; the single source of truth for byte counts."""

    name: str
    key: StreamFormat
    value: StreamFormat
    sink_tokens: int = 0
    pre_rope_keys: bool = False
    citation: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    cache_input: CacheInput = "kv"
    merge_depth_fraction: float = 0.0
    retain_fraction: float = 0.0

    # cache_input:          what a layer stores. "kv": K and V (every method but XQuant). "x": the
    #                       layer input X (post-RMSNorm, `hidden_size` channels per token) from which
    #                       K = X W_k and V = X W_v are rematerialized at every decode step (XQuant);
    #                       "x-delta": the quantized difference of the pre-norm residual stream from
    #                       the previous layer's reconstruction (XQuant-CL). X formats store one
    #                       stream, described by `key` (`value` is the same object, counted once),
    #                       of one "head" of `hidden_size` channels.
    # merge_depth_fraction: MiniCache: this share of the layers, the deepest ones, is merged in
    #                       adjacent pairs (see `merge_pairs`); 0 = no merging.
    # retain_fraction:      MiniCache: the share of tokens per pair and stream kept unmerged, at which
    #                       `bytes` is stated; a cache holds a data-dependent count (`retained=`).

    def __post_init__(self) -> None:
        check_count("sink_tokens", self.sink_tokens, 0)
        if not isinstance(self.key, StreamFormat) or not isinstance(self.value, StreamFormat):
            raise ValueError("key and value must be StreamFormat descriptions")
        if self.cache_input not in ("kv", "x", "x-delta"):
            raise ValueError(f"cache_input must be 'kv', 'x' or 'x-delta', got {self.cache_input!r}")
        if not 0.0 <= self.merge_depth_fraction <= 1.0 or not 0.0 <= self.retain_fraction <= 1.0:
            raise ValueError("merge_depth_fraction and retain_fraction must be in [0, 1]")
        if self.merge_depth_fraction and (self.key.quantized or self.value.quantized or self.cache_input != "kv"):
            raise ValueError("cross-layer merging is implemented for fp16 K/V streams only")
        tiers = ("importance", "salient_fraction", "salient_budget", "residual_tokens")
        if self.key.tiered != self.value.tiered or any(
            getattr(self.key, t) != getattr(self.value, t) for t in tiers if self.key.tiered
        ):
            raise ValueError(f"K and V must select the same tokens: equal {', '.join(tiers)} in both streams")

    def breakdown(self, tokens: int, kv_heads: int, head_dim: int, hidden_size: int | None = None) -> ByteBreakdown:
        """Byte breakdown of one layer holding `tokens` tokens of one sequence (K + V).

        X formats (`cache_input` "x" / "x-delta") store `hidden_size` channels per token; without it
        they assume multi-head attention, hidden_size = kv_heads * head_dim (exact for llama-7b; a GQA
        caller must pass it: SmolLM2 stores 576 X channels where K + V have 2 x 3 x 64 = 384).
        Merging formats (MiniCache) give one layer of the merged region at `retain_fraction`: half
        of `pair_breakdown`; `model_bytes` adds the unmerged layers.
        """
        if self.cache_input != "kv":
            check_count("kv_heads", kv_heads, 1)
            check_count("head_dim", head_dim, 1)
            hidden = kv_heads * head_dim if hidden_size is None else check_count("hidden_size", hidden_size, 1)
            return stream_bytes(self.key, tokens, 1, hidden, self.sink_tokens)
        if self.merge_depth_fraction:
            n = math.ceil(self.retain_fraction * check_count("tokens", tokens, 0))
            pair = self.pair_breakdown(tokens, kv_heads, head_dim, n, n)
            return ByteBreakdown(**{f: getattr(pair, f) // 2 for f in pair.__dataclass_fields__})  # all even
        return self._kv_breakdown(tokens, kv_heads, head_dim)

    def _kv_breakdown(self, tokens: int, kv_heads: int, head_dim: int) -> ByteBreakdown:
        return stream_bytes(self.key, tokens, kv_heads, head_dim, self.sink_tokens) + stream_bytes(
            self.value, tokens, kv_heads, head_dim, self.sink_tokens
        )

    def merge_pairs(self, num_layers: int) -> tuple[tuple[int, int], ...]:
        """Adjacent layer pairs merged by MiniCache: (S, S+1), (S+2, S+3), ... from
        S = num_layers - floor(merge_depth_fraction * num_layers); an odd last layer stays unmerged.

        >>> get_format("minicache", 16).merge_pairs(30)[:2]   # SmolLM2: S = 15
        ((15, 16), (17, 18))
        """
        check_count("num_layers", num_layers, 1)
        if not self.merge_depth_fraction:
            return ()
        pairs = self.extra.get("pairs")
        if pairs is not None:  # chosen on calibration text (`cache_minicache.calibrate_pairs`)
            pairs = tuple((int(a), int(b)) for a, b in pairs)
            flat = [i for p in pairs for i in p]
            if (
                any(b != a + 1 for a, b in pairs)
                or len(set(flat)) != len(flat)
                or any(not 0 <= i < num_layers for i in flat)
            ):
                raise ValueError(f"{self.name}: pairs {pairs} are not disjoint adjacent layers of {num_layers}")
            return tuple(sorted(pairs))
        start = num_layers - math.floor(self.merge_depth_fraction * num_layers)
        return tuple((i, i + 1) for i in range(start, num_layers - 1, 2))

    def pair_breakdown(
        self, tokens: int, kv_heads: int, head_dim: int, retained_k: int, retained_v: int
    ) -> ByteBreakdown:
        """Exact bytes of one merged layer pair (MiniCache) for one sequence, per stream (K, V):

        codes     the shared SLERP direction, fp16 ``[H, T, D]``;
        scales    the per-token magnitudes of both layers, fp16 ``[2, H, T]``;
        retained  n unmerged tokens of both layers, fp16 ``[2, H, n, D]``, and their int32 indices ``[n]``.
        """
        tokens = check_count("tokens", tokens, 0)
        h, d = check_count("kv_heads", kv_heads, 1), check_count("head_dim", head_dim, 1)
        out = ByteBreakdown()
        for n in (retained_k, retained_v):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= tokens:
                raise ValueError(f"retained tokens must be in [0, {tokens}], got {n}")
            out = out + ByteBreakdown(
                codes=h * tokens * d * FULL_PRECISION_BYTES,
                scales=2 * h * tokens * FULL_PRECISION_BYTES,
                retained=2 * h * n * d * FULL_PRECISION_BYTES + n * 4,
            )
        return out

    def model_bytes(
        self,
        tokens: int,
        kv_heads: int,
        head_dim: int,
        num_layers: int,
        hidden_size: int | None = None,
        retained: dict[tuple[int, int], tuple[int, int]] | None = None,
    ) -> int:
        """Exact bytes of all `num_layers` layers for one sequence.

        retained: MiniCache's actual unmerged counts per pair, {(l, l+1): (n_k, n_v)}; default: every
        pair at `retain_fraction` (ceil). Unmerged layers are stored as `key` / `value` say (fp16).
        """
        check_count("num_layers", num_layers, 1)
        if not self.merge_depth_fraction:
            return num_layers * self.bytes(tokens, kv_heads, head_dim, hidden_size)
        pairs = self.merge_pairs(num_layers)  # may be () when calibration merged no pair
        n = math.ceil(self.retain_fraction * tokens)
        total = (num_layers - 2 * len(pairs)) * self._kv_breakdown(tokens, kv_heads, head_dim).total
        for p in pairs:
            nk, nv = (retained or {}).get(p, (n, n))
            total += self.pair_breakdown(tokens, kv_heads, head_dim, nk, nv).total
        return total

    def remat_flops_per_token(self, kv_heads: int, head_dim: int, hidden_size: int | None = None) -> int:
        """Extra FLOPs per cached token per layer per decode step to rematerialize K and V: 0 for
        K/V-storing formats; for X formats 2 * hidden_size * (k_out + v_out), k_out = v_out =
        kv_heads * head_dim (the X W_k and X W_v matmuls; RMSNorm, RoPE and XQuant-CL's delta
        accumulation are elementwise and not counted). llama-7b: 2 * 4096 * 8192 = 67.1 MFLOP.
        """
        check_count("kv_heads", kv_heads, 1)
        check_count("head_dim", head_dim, 1)
        if self.cache_input == "kv":
            return 0
        hidden = kv_heads * head_dim if hidden_size is None else check_count("hidden_size", hidden_size, 1)
        return 2 * hidden * 2 * kv_heads * head_dim

    def stored_tokens(self, tokens: int) -> int:
        """Tokens per head a layer still holds after `tokens` arrived (fewer than `tokens` only with eviction)."""
        k = self.key
        check_count("tokens", tokens, 0)
        if not (k.tiered and k.bits == 0):
            return tokens
        sinks = min(tokens, self.sink_tokens)
        resid = k.residual_count(tokens - sinks)
        return sinks + resid + k.salient_count(tokens - sinks - resid)

    def bytes(self, tokens: int, kv_heads: int, head_dim: int, hidden_size: int | None = None) -> int:
        """Exact bytes of one layer's K and V for one sequence of `tokens` tokens, shared data included."""
        return self.breakdown(tokens, kv_heads, head_dim, hidden_size).total

    def avg_bits(self, tokens: int, kv_heads: int, head_dim: int, hidden_size: int | None = None) -> float:
        """Average stored bits per K/V element at this context, all metadata included.

        X formats are charged per K/V element too (their bytes over 2 * tokens * kv_heads * head_dim),
        so 4-bit XQuant on SmolLM2 (576 X channels for 384 K/V channels) is ~6.4 bits, not 4.25.
        """
        check_count("tokens", tokens, 1)
        return 8 * self.bytes(tokens, kv_heads, head_dim, hidden_size) / (2 * tokens * kv_heads * head_dim)

    def with_(self, **changes) -> KVFormat:
        return replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Presets: the formats of the methods kvq-core implements, by name. Bits are looked up exactly.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A named method: which (key_bits, value_bits) it supports and how to build its format."""

    name: str
    citation: str
    bits: tuple[tuple[float, float], ...]
    default_bits: tuple[float, float]
    summary: str


def parse_bits(spec: str | float | int | tuple) -> tuple[float, float]:
    """'2' -> (2, 2); 'k2v1.5' -> (2, 1.5); (4, 2) -> (4, 2)."""
    if isinstance(spec, bool):
        raise ValueError(f"cannot read bits {spec!r}: use a number (e.g. 2) or 'k<bits>v<bits>' (e.g. k2v1.5)")
    if isinstance(spec, tuple):
        if len(spec) != 2 or not all(
            isinstance(b, numbers.Real) and not isinstance(b, bool) and math.isfinite(b) for b in spec
        ):
            raise ValueError(f"cannot read bits {spec!r}: a tuple must be (key_bits, value_bits), e.g. (2, 1.5)")
        return float(spec[0]), float(spec[1])
    # a number is read as its text, so a non-finite one gets the same error as unreadable text
    s = str(float(spec) if isinstance(spec, numbers.Real) else spec).strip().lower()
    try:
        if s.startswith("k") and "v" in s:
            k, v = s[1:].split("v", 1)
            kv = float(k), float(v)
        else:
            kv = float(s), float(s)
    except ValueError:
        kv = (math.nan, math.nan)
    if not all(math.isfinite(b) for b in kv):
        raise ValueError(f"cannot read bits {spec!r}: use a number (e.g. 2) or 'k<bits>v<bits>' (e.g. k2v1.5)")
    return kv


def _fmt_bits(b: float) -> str:
    return str(int(b)) if float(b).is_integer() else str(b)


def bits_label(kv_bits: tuple[float, float]) -> str:
    k, v = kv_bits
    return _fmt_bits(k) if k == v else f"k{_fmt_bits(k)}v{_fmt_bits(v)}"


_FP16 = StreamFormat()

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec("fp16", "unquantized baseline", ((16, 16),), (16, 16), "fp16 K and V"),
        MethodSpec(
            "int",
            "QServe KV4 (arXiv:2405.04532) / LMDeploy KV int8/int4",
            ((8, 8), (4, 4), (2, 2), (3, 3)),
            (4, 4),
            "per-token per-head asymmetric, fp16 scale and zero (4.25 / 8.25 bits)",
        ),
        MethodSpec("fp8-e4m3", "vLLM fp8 KV cache", ((8, 8),), (8, 8), "fp8 e4m3 codes, one fp32 scale per tensor"),
        MethodSpec("fp8-e5m2", "vLLM fp8 KV cache", ((8, 8),), (8, 8), "fp8 e5m2 codes, one fp32 scale per tensor"),
        MethodSpec(
            "kivi",
            "KIVI (Liu et al., ICML 2024, arXiv:2402.02750)",
            ((2, 2), (3, 3), (4, 4), (8, 8)),
            (2, 2),
            "per-channel keys / per-token values, groups of 32, fp16 residual of 128",
        ),
        MethodSpec(
            "kvquant",
            "KVQuant (Hooper et al., NeurIPS 2024, arXiv:2401.18079)",
            ((2, 2), (3, 3), (4, 4)),
            (3, 3),
            "pre-RoPE per-channel keys, per-token values, nuq codebooks, 1% sparse outliers, 1 sink",
        ),
        MethodSpec(
            "kvquant-dense",
            "KVQuant without dense-and-sparse outliers (arXiv:2401.18079)",
            ((2, 2), (3, 3), (4, 4)),
            (3, 3),
            "as kvquant, no outliers",
        ),
        MethodSpec(
            "skvq",
            "SKVQ (Duanmu et al., COLM 2024, arXiv:2405.06219)",
            ((2, 1.5), (2, 2), (3, 3), (4, 4), (8, 8)),
            (2, 1.5),
            "pre-RoPE keys, reordered channels, clipped per-token groups of 128, fp8 metadata, 128-token window, 5 sinks",
        ),
        MethodSpec(
            "million",
            "MILLION (Wang et al., DAC 2025, arXiv:2504.03661)",
            ((4, 4), (2, 2)),
            (4, 4),
            "product quantization: 8-bit codes per 2 (4-bit) or 4 (2-bit) channels, k-means codebooks, "
            "fp16 window of 128",
        ),
        MethodSpec(
            "rotatekv",
            "RotateKV (Su et al., IJCAI 2025, arXiv:2501.16383)",
            ((2, 2), (3, 3), (4, 4)),
            (2, 2),
            "pre-RoPE keys, outlier-aware reorder + Hadamard across heads, per-token codes, 1 fp16 sink",
        ),
        MethodSpec(
            "gear",
            "GEAR (Kang et al., arXiv:2403.05527)",
            ((2, 2), (4, 4)),
            (2, 2),
            "KIVI-style codes (G=64) + rank-2 fp16 error per 64-token chunk + 2% fp16 outliers",
        ),
        MethodSpec(
            "bfp",
            "Accurate Block Quantization in LLMs with Outliers (Trukhanov & Soloveychik, arXiv:2403.20137)",
            ((4, 4), (4, 8), (8, 8)),
            (4, 4),
            "block floating point: sign-magnitude codes + one 8-bit shared exponent per 32 channels of a token; "
            "key channels rearranged so outliers share blocks",
        ),
        MethodSpec(
            "staircase",
            "staircase adaptive quantization (SAQ), Li, arXiv:2410.18441",
            ((2, 2), (3, 3), (4, 4)),
            (2, 2),
            "age-based precision: fp16 window of 128, then 512 tokens at 8 bits, 2048 at 4 bits, older at "
            "the named bits (per token per head, fp16 scale and zero)",
        ),
        MethodSpec(
            "vidkv",
            "VidKV (Tao et al., arXiv:2503.16257)",
            ((1.5, 1.5), (1.25, 1.5)),
            (1.5, 1.5),
            "keys: anomalous channels (k-1 share) 2-bit, the rest 1-bit rFFT coefficients; values ternary "
            "(1.58-bit) per channel, absmean scales; groups of 32 tokens, fp16 window of 128",
        ),
        MethodSpec(
            "cskv",
            "CSKV (Wang et al., arXiv:2409.10593), training-free channel shrinking",
            ((4, 4), (8, 8)),
            (4, 4),
            "K and V shrunk to 1/4 (4) or 1/2 (8) of their channels by a calibration SVD basis, fp16 latents, "
            "fp16 window of 128",
        ),
        MethodSpec(
            "zipcache",
            "ZipCache (He et al., NeurIPS 2024, arXiv:2405.14256)",
            ((2, 2),),
            (2, 2),
            "salient 40% of tokens (normalized attention) at 4 bits, rest 2 bits, channel-separable "
            "per-token codes, fp16 window of 128",
        ),
        MethodSpec(
            "mikv",
            "MiKV: No Token Left Behind (Yang et al., arXiv:2402.18096)",
            ((2, 2), (3, 3), (4, 4)),
            (2, 2),
            "heavy hitters (20% by accumulated attention) fp16, the rest at low bits instead of evicted, "
            "fp16 window of 128",
        ),
        MethodSpec(
            "h2o",
            "H2O (Zhang et al., NeurIPS 2023, arXiv:2306.14048); fixed budget as Scissorhands (arXiv:2305.17118)",
            ((0, 0),),
            (0, 0),
            "eviction: 2048 heavy hitters (accumulated attention) + 128 recent tokens kept fp16, the rest dropped",
        ),
        MethodSpec(
            "xquant",
            "XQuant (Tomar et al., arXiv:2508.10395)",
            ((2, 2), (3, 3), (4, 4), (8, 8)),
            (4, 4),
            "caches the post-norm layer input X (per token, groups of 128, fp16 scale/zero) and "
            "rematerializes K = X W_k, V = X W_v each step; smaller than K+V only where hidden_size < "
            "2 x kv_heads x head_dim (MHA), bits here for an MHA layer",
        ),
        MethodSpec(
            "xquant-cl",
            "XQuant-CL (Tomar et al., arXiv:2508.10395)",
            ((2, 2), (3, 3), (4, 4), (8, 8)),
            (3, 3),
            "as xquant, but each layer stores the quantized delta of its pre-norm input from the previous "
            "layer's reconstruction (an accumulator); bits here for an MHA layer",
        ),
        MethodSpec(
            "minicache",
            "MiniCache (Liu et al., NeurIPS 2024, arXiv:2405.14366)",
            ((16, 16),),
            (16, 16),
            "fp16; the deeper half of the layers merged in adjacent pairs (SLERP direction shared, per-layer "
            "token magnitudes), 10% most distinct tokens kept unmerged; bits here for a merged layer",
        ),
    ]
}

DEFAULT_METHOD_FOR_BITS = "kivi"  # a bare `--bits` means KIVI (fp16 for 16, int for 8)


def _int_format(bits: float) -> KVFormat:
    s = StreamFormat(bits=bits, axis="token", group_size=None)
    return KVFormat(f"int{_fmt_bits(bits)}", s, s, citation=METHODS["int"].citation)


def kivi_format(bits: float = 2, group_size: int = 32, residual_tokens: int = 128) -> KVFormat:
    key = StreamFormat(bits=bits, axis="channel", group_size=group_size, residual_tokens=residual_tokens, flush="block")
    val = StreamFormat(bits=bits, axis="token", group_size=group_size, residual_tokens=residual_tokens, flush="sliding")
    return KVFormat(
        f"kivi-{_fmt_bits(bits)}",
        key,
        val,
        citation=METHODS["kivi"].citation,
        extra={"group_size": group_size, "residual_tokens": residual_tokens},
    )


def kvquant_format(bits: float = 3, outlier_fraction: float = 0.01, sink_tokens: int = 1) -> KVFormat:
    key = StreamFormat(
        bits=bits, axis="channel", group_size=None, levels="nonuniform", outlier_fraction=outlier_fraction
    )
    val = StreamFormat(
        bits=bits,
        axis="token",
        group_size=None,
        levels="nonuniform",
        outlier_fraction=outlier_fraction,
        groups_span_heads=True,
    )
    name = f"kvquant-nuq{_fmt_bits(bits)}" + (f"-{outlier_fraction * 100:g}%" if outlier_fraction else "")
    return KVFormat(name, key, val, sink_tokens=sink_tokens, pre_rope_keys=True, citation=METHODS["kvquant"].citation)


def skvq_format(
    key_bits: float = 2,
    value_bits: float = 1.5,
    group_size: int = 128,
    window: int = 128,
    sink_tokens: int = 5,
    scale_dtype: str = "fp8_e4m3",
    clip_ratio: float = 0.95,
) -> KVFormat:
    def stream(b: float) -> StreamFormat:
        return StreamFormat(
            bits=b,
            axis="token",
            group_size=group_size,
            scale_dtype=scale_dtype,
            residual_tokens=window,
            flush="sliding",
            reorder_channels=True,
            clip_ratio=clip_ratio,
            groups_span_heads=True,
        )

    # Keys are quantized before RoPE (pre_rope_keys): the official SKVQ code's headline configuration
    # is "k2-v2-w128-g128-reorder-pre_rope-clip-sink5", and its channel statistics for the reorder are
    # taken at k_proj's output, i.e. pre-RoPE. Measured on SmolLM2-135M (decode protocol, k2v1.5):
    # 17.2 post-RoPE vs 14.7 pre-RoPE. No bytes: RoPE is re-applied after dequantization.
    return KVFormat(
        f"skvq-{bits_label((key_bits, value_bits))}",
        stream(key_bits),
        stream(value_bits),
        sink_tokens=sink_tokens,
        pre_rope_keys=True,
        citation=METHODS["skvq"].citation,
    )


def million_format(bits: float = 4, window: int = 128) -> KVFormat:
    """MILLION: d_sub = 8 / bits channels per 8-bit code (M = 64 for D = 128 at 4 bits, M = 32 at 2 bits).

    The fp16 window is flushed `window` tokens at a time, as MILLION's residual buffer (128 = head_dim).
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"MILLION uses 8-bit codes over 8 / bits channels: bits must divide 8, got {bits}")
    s = StreamFormat(
        bits=bits, levels="product", pq_subspace_dims=int(8 // bits), residual_tokens=window, flush="block"
    )
    return KVFormat(f"million-{_fmt_bits(bits)}", s, s, citation=METHODS["million"].citation)


def rotatekv_format(bits: float = 2, sink_tokens: int = 1) -> KVFormat:
    """RotateKV: per-token codes after reorder + grouped-head Hadamard; keys pre-RoPE; fp16 sink token(s)."""
    s = StreamFormat(bits=bits, axis="token", group_size=None, reorder_channels=True, rotate=True)
    return KVFormat(
        f"rotatekv-{_fmt_bits(bits)}",
        s,
        s,
        sink_tokens=sink_tokens,
        pre_rope_keys=True,
        citation=METHODS["rotatekv"].citation,
    )


def gear_format(bits: float = 2, chunk: int = 64, rank: int = 2, outlier_fraction: float = 0.02) -> KVFormat:
    """GEAR over KIVI-style quantization: buffer of `chunk` tokens, rank-`rank` error, 2% outliers."""

    def stream(axis: Axis) -> StreamFormat:
        return StreamFormat(
            bits=bits,
            axis=axis,
            group_size=chunk,
            outlier_fraction=outlier_fraction,
            residual_tokens=chunk,
            flush="block",
            lowrank_rank=rank,
        )

    return KVFormat(
        f"gear-{_fmt_bits(bits)}",
        stream("channel"),
        stream("token"),
        citation=METHODS["gear"].citation,
        extra={"chunk": chunk, "rank": rank},
    )


def bfp_format(key_bits: float = 4, value_bits: float = 4, block: int = 32) -> KVFormat:
    """Block floating point: per token, blocks of `block` channels share a power-of-two scale (e8m0 exponent).

    Codes are symmetric (sign-magnitude: 2**bits - 1 levels). Key channels are rearranged per head from
    calibration (outlier channels gathered into the same blocks, the paper's compile-time permutation
    of W_q / W_k rows; stored int16 here, where kvq cannot fold it into the weights).
    """

    def stream(b: float, reorder: bool) -> StreamFormat:
        return StreamFormat(
            bits=b, axis="token", group_size=block, symmetric=True, scale_dtype="e8m0", reorder_channels=reorder
        )

    return KVFormat(
        f"bfp-{bits_label((key_bits, value_bits))}",
        stream(key_bits, True),
        stream(value_bits, False),
        citation=METHODS["bfp"].citation,
    )


def staircase_format(bits: float = 2, window: int = 128, steps: tuple = ((512, 8), (2048, 4))) -> KVFormat:
    """Older tokens at fewer bits: steps at or below `bits` are dropped (the 4-bit variant is 8 -> 4)."""
    steps = tuple((n, b) for n, b in steps if b > bits)
    s = StreamFormat(bits=bits, axis="token", residual_tokens=window, age_steps=steps)
    return KVFormat(f"staircase-{_fmt_bits(bits)}", s, s, citation=METHODS["staircase"].citation)


def vidkv_format(key_bits: float = 1.5, group_size: int = 32, window: int = 128) -> KVFormat:
    """VidKV: key_bits = 1 + the share of 2-bit anomalous channels (VidKV's `difficult_ratio`)."""
    if not 1 <= key_bits < 2:
        raise ValueError(f"VidKV key bits are 1.x (1 + share of 2-bit channels), got {key_bits}")
    common = dict(axis="channel", group_size=group_size, residual_tokens=window, flush="block", symmetric=True)
    key = StreamFormat(
        bits=1, absmean=True, mixed_fraction=key_bits - 1, mixed_bits=2, fft=True, reorder_channels=True, **common
    )
    value = StreamFormat(bits=TERNARY, absmean=True, **common)
    return KVFormat(
        f"vidkv-{bits_label((key_bits, 1.58))}",
        key,
        value,
        citation=METHODS["vidkv"].citation,
        extra={"group_size": group_size, "residual_tokens": window},
    )


def cskv_format(bits: float = 4, window: int = 128) -> KVFormat:
    """CSKV: fp16 latents of rank bits / 16 x H*D (4 -> a quarter of the channels), a full-precision window."""
    s = StreamFormat(bits=16, axis="token", latent_fraction=bits / 16, residual_tokens=window, flush="sliding")
    return KVFormat(f"cskv-{_fmt_bits(bits)}", s, s, citation=METHODS["cskv"].citation)


def zipcache_format(
    bits: float = 2, salient_bits: float = 4, salient_fraction: float = 0.4, window: int = 128
) -> KVFormat:
    """ZipCache: tiers chosen once per token by normalized attention; channel-separable per-token codes."""
    s = StreamFormat(
        bits=bits,
        axis="token",
        residual_tokens=window,
        importance="normalized",
        salient_fraction=salient_fraction,
        salient_bits=salient_bits,
        channel_normalize=True,
    )
    return KVFormat(
        f"zipcache-{_fmt_bits(salient_bits)}/{_fmt_bits(bits)}", s, s, citation=METHODS["zipcache"].citation
    )


def mikv_format(bits: float = 2, salient_fraction: float = 0.2, window: int = 128) -> KVFormat:
    """MiKV: fp16 heavy hitters (H2O selection), the other tokens kept at `bits` instead of evicted.

    Keys get a per-layer channel normaliser before their per-token codes (MiKV's outlier-aware balancing
    of key channels); values are quantized per token directly.
    """

    def stream(normalize: bool) -> StreamFormat:
        return StreamFormat(
            bits=bits,
            axis="token",
            residual_tokens=window,
            importance="accumulated",
            salient_fraction=salient_fraction,
            channel_normalize=normalize,
        )

    return KVFormat(f"mikv-{_fmt_bits(bits)}", stream(True), stream(False), citation=METHODS["mikv"].citation)


def h2o_format(budget: int = 2048, window: int = 128, sink_tokens: int = 0) -> KVFormat:
    """Heavy-hitter eviction at a fixed budget: `budget` fp16 heavy hitters + `window` recent tokens per head."""
    s = StreamFormat(bits=0, axis="token", residual_tokens=window, importance="accumulated", salient_budget=budget)
    return KVFormat(f"h2o-{budget}+{window}", s, s, sink_tokens=sink_tokens, citation=METHODS["h2o"].citation)


def xquant_format(bits: float = 4, group_size: int = 128, cross_layer: bool = False) -> KVFormat:
    """XQuant / XQuant-CL: one per-token stream of X (hidden_size channels), asymmetric, fp16 scale/zero.

    X is quantized uniformly per token (arXiv:2508.10395); kvq groups each token's channels by 128, the
    group width of its other per-token formats (0.25 bits of metadata per element). XQuant-CL stores
    every layer's delta at the same width (layer 0's delta is its whole input), so every layer has the
    same bytes. The paper's SVD down-projection for GQA models is not implemented.
    """
    s = StreamFormat(bits=bits, axis="token", group_size=group_size)
    name = "xquant-cl" if cross_layer else "xquant"
    return KVFormat(
        f"{name}-{_fmt_bits(bits)}",
        s,
        s,
        citation=METHODS[name].citation,
        cache_input="x-delta" if cross_layer else "x",
        extra={"group_size": group_size},
    )


def minicache_format(
    merge_depth_fraction: float = 0.5,
    retain_fraction: float = 0.1,
    slerp_t: float = 0.6,
    pairs: tuple[tuple[int, int], ...] | None = None,
) -> KVFormat:
    """MiniCache over an fp16 cache: layers from L - floor(f * L) on merged in pairs (arXiv:2405.14366).

    slerp_t: the interpolation weight of the upper layer's direction (the paper's t = 0.6); no bytes.
    retain_fraction: the stated share of unmerged tokens (the paper picks them by a threshold on the
    angular distance; kvq's cache sets that threshold at the prefill's (1 - f) quantile).
    pairs: the merged layer pairs given explicitly (``((l, l + 1), ...)``, e.g. chosen on calibration
    text by `cache_minicache.calibrate_pairs`) instead of every pair of the deepest f; () merges none.
    The name lists them: ``minicache-L24+28`` merges (24, 25) and (28, 29).
    """
    name = f"minicache-{merge_depth_fraction:g}"
    extra: dict = {"slerp_t": slerp_t}
    if pairs is not None:
        pairs = tuple(sorted((int(a), int(b)) for a, b in pairs))
        name = "minicache-L" + ("+".join(str(a) for a, _ in pairs) or "none")
        extra["pairs"] = pairs
    return KVFormat(
        name,
        _FP16,
        _FP16,
        citation=METHODS["minicache"].citation,
        merge_depth_fraction=merge_depth_fraction,
        retain_fraction=retain_fraction,
        extra=extra,
    )


def get_format(method: str, bits: str | float | tuple | None = None) -> KVFormat:
    """The format of a named method at the given bits (e.g. `get_format("kivi", 2)`).

    Raises ValueError listing the valid names / bit widths for an unknown method or bits.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    spec = METHODS[method]
    kv = spec.default_bits if bits is None else parse_bits(bits)
    if kv not in spec.bits:
        raise ValueError(
            f"method {method!r} has no {bits_label(kv)}-bit variant; valid bits: "
            + ", ".join(bits_label(b) for b in spec.bits)
        )
    kb, vb = kv
    if method == "fp16":
        return KVFormat("fp16", _FP16, _FP16)
    if method == "int":
        return _int_format(kb)
    if method.startswith("fp8-"):
        s = StreamFormat(bits=8, levels=f"float8_{method[4:]}", axis="token")
        return KVFormat(method, s, s, citation=spec.citation)
    if method == "kivi":
        return kivi_format(kb)
    if method == "kvquant":
        return kvquant_format(kb, 0.01)
    if method == "kvquant-dense":
        return kvquant_format(kb, 0.0)
    if method == "skvq":
        return skvq_format(kb, vb)
    if method == "million":
        return million_format(kb)
    if method == "rotatekv":
        return rotatekv_format(kb)
    if method == "gear":
        return gear_format(kb)
    if method == "bfp":
        return bfp_format(kb, vb)
    if method == "staircase":
        return staircase_format(kb)
    if method == "vidkv":
        return vidkv_format(kb)
    if method == "cskv":
        return cskv_format(kb)
    if method == "zipcache":
        return zipcache_format(kb)
    if method == "mikv":
        return mikv_format(kb)
    if method == "h2o":
        return h2o_format()
    if method in ("xquant", "xquant-cl"):
        return xquant_format(kb, cross_layer=method == "xquant-cl")
    if method == "minicache":
        return minicache_format()
    raise AssertionError(method)  # every METHODS entry is handled above


def method_for_bits(bits: str | float) -> str:
    """The documented default method for a bare `--bits`: fp16 at 16, KIVI where it has the width, else int."""
    kv = parse_bits(bits)
    if kv == (16, 16):
        return "fp16"
    if kv in METHODS[DEFAULT_METHOD_FOR_BITS].bits:
        return DEFAULT_METHOD_FOR_BITS
    for name, spec in METHODS.items():
        if kv in spec.bits:
            return name
    valid = sorted({bits_label(b) for s in METHODS.values() for b in s.bits}, key=lambda x: (len(x), x))
    raise ValueError(f"no method stores {bits_label(kv)}-bit KV; valid bits: {', '.join(valid)}")
