"""Exact byte counts: packed code rows (`packed_row_bytes`) and one stream's bytes (`stream_bytes`).

Layout (one layer, one sequence; H = kv heads, T = tokens, D = head_dim):

- codes        uint8 ``[H, Tq, packed_row_bytes(bits, D)]``: every quantized token's D codes are
               packed along the channel axis (see `packed_row_bytes`), for both per-token and
               per-channel quantization, so a decode kernel streams one row per token.
- scales/zeros per-token  (``axis="token"``):   ``[H, Tq, ceil(D / G)]``
               per-channel (``axis="channel"``): ``[H, ceil(Tq / G), D]``, or ``[H, 1, D]`` when
               ``group_size is None`` (static per-channel scale from calibration, as KVQuant keys)
               symmetric formats store no zeros.
- outliers     per token row: ``k = ceil(outliers.fraction * H * D)`` (value, index) pairs (the expected
               count for per-channel thresholds; `outliers_held` gives the held count) and the row
               metadata: one pointer per token plus one, or a count per token, or none (`Outliers`).
- residual     fp16 ``[H, R_t, D]``: full-precision recent tokens (KIVI, SKVQ windows).
- sinks        fp16 ``[H, S, D]``: the first S tokens kept in full precision.
- shared       per layer, not per sequence: the nuq codebook ``[2**bits]`` fp16, the static
               per-channel scales, channel-reorder indices int16 ``[H, D]``, an fp8 tensor scale,
               product-quantization codebooks ``[D / d_sub, 2**(bits * d_sub), d_sub]`` fp16.
- salient      token tiers (ZipCache, MiKV, heavy-hitter eviction): of the Tq body tokens,
               n_hi = salient_count(Tq) per head are stored at `tiers.bits` (fp16 ``[H, n_hi, D]`` at
               16, else per-token codes + scale/zero), the other Tq - n_hi at `bits` (0 = evicted);
               per-layer fp16 channel normalisers ``[H, D]`` (ZipCache's channel-separable
               quantization); fp32 attention scores ``[H, n]`` per scored token (`scores`: one tensor
               for K and V, half of its bytes counted in each stream so `stream_bytes` stays exact).
- lowrank      fp16 factors of the quantization error per compressed chunk of C tokens and head:
               A ``[C, r]`` and B ``[D, r]`` (GEAR, arXiv:2403.05527).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .stream import (
    DTYPE_BYTES,
    FULL_PRECISION_BYTES,
    SCORE_BYTES,
    SUPPORTED_BITS,
    TERNARY,
    TRITS_PER_BYTE,
    StreamFormat,
    check_count,
)


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


def stream_bytes(
    fmt: StreamFormat, tokens: int, kv_heads: int, head_dim: int, sink_tokens: int, outliers_held: int | None = None
) -> ByteBreakdown:
    """Exact bytes of one stream (K or V) of one layer holding `tokens` tokens of one sequence.

    outliers_held: sparse outliers held, for formats whose count per token varies (`Outliers.thresholds`
    "channel"); None: k per quantized token.
    """
    tokens = check_count("tokens", tokens, 0)
    h, d = check_count("kv_heads", kv_heads, 1), check_count("head_dim", head_dim, 1)
    sink_tokens = check_count("sink_tokens", sink_tokens, 0)
    sinks = min(tokens, sink_tokens)
    rest = tokens - sinks
    if not fmt.quantized:
        return ByteBreakdown(residual=tokens * h * d * FULL_PRECISION_BYTES)
    if fmt.tiers is not None:
        return _tiered_bytes(fmt, rest, h, d, sinks)
    if fmt.steps is not None:
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
    if fmt.shrink is not None:
        r = fmt.latent_dims(h, d)
        return ByteBreakdown(
            codes=tq * r * FULL_PRECISION_BYTES,  # fp16 latent coordinates per token
            residual=resid * h * d * FULL_PRECISION_BYTES,
            sinks=sinks * h * d * FULL_PRECISION_BYTES,
            shared=h * d * r * FULL_PRECISION_BYTES if tq else 0,  # the basis [H*D, r]
        )
    if fmt.absmean is not None and fmt.absmean.mixed_fraction:
        k = fmt.mixed_channels(d)
        blocks = math.ceil(tq / fmt.group_size)
        return ByteBreakdown(
            codes=h * tq * (packed_row_bytes(fmt.absmean.mixed_bits, k) + packed_row_bytes(fmt.bits, d - k)),
            scales=blocks * h * d * meta,  # k anomalous channels + d - k (FFT) coefficients, one scale each
            zeros=blocks * h * k * meta,  # the anomalous channels are asymmetric
            residual=resid * h * d * FULL_PRECISION_BYTES,
            sinks=sinks * h * d * FULL_PRECISION_BYTES,
            shared=h * d * 2 if (tq and fmt.reorder_channels) else 0,
        )
    if tq and fmt.pq is not None:
        shared += d * 2**fmt.pq_code_bits * FULL_PRECISION_BYTES  # [D / d_sub, 2**code_bits, d_sub]
        codes = h * tq * packed_row_bytes(fmt.pq_code_bits, fmt.pq_subspaces(d))
    else:
        codes = h * tq * packed_row_bytes(fmt.bits, d)
    lowrank = 0
    if fmt.lowrank is not None:
        chunk = fmt.residual_tokens  # block flush: tq is a whole number of chunks
        lowrank = (tq // chunk) * h * fmt.lowrank.rank * (chunk + d) * FULL_PRECISION_BYTES
    out = fmt.outliers
    n_out = tq * k if outliers_held is None else outliers_held
    return ByteBreakdown(
        codes=codes,
        lowrank=lowrank,
        scales=groups * meta,
        zeros=0 if fmt.symmetric else groups * meta,
        outlier_values=n_out * out.value_bits // 8 if out else 0,
        outlier_indices=n_out * out.index_bits_for(h * d) // 8 if out else 0,
        outlier_pointers=out.row_bytes(tq, h * d) if k else 0,
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
    hi_codes, hi_meta = _token_codes_bytes(fmt, fmt.tiers.bits, n_hi, h, d)
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
        shared=h * d * FULL_PRECISION_BYTES if (tq and fmt.tiers.channel_normalize) else 0,
    )


def _staircase_bytes(fmt: StreamFormat, rest: int, h: int, d: int, sinks: int) -> ByteBreakdown:
    resid = fmt.residual_count(rest)
    left = rest - resid
    codes = meta = 0
    for n, b in (*fmt.steps.steps, (left, fmt.bits)):  # newest first; the last step takes all older tokens
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
