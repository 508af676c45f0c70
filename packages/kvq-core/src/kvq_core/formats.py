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
               per-channel scales, channel-reorder indices int16 ``[H, D]``, an fp8 tensor scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

Axis = Literal["token", "channel"]
Levels = Literal["uniform", "nonuniform", "float8_e4m3", "float8_e5m2"]
Flush = Literal["block", "sliding"]

#: bytes of one stored metadata element, by dtype name.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8_e4m3": 1}

#: bit widths that pack into integer containers; 1.5 means ternary {0, 1, 2} (5 trits per byte).
SUPPORTED_BITS: tuple[float, ...] = (1, 1.5, 2, 3, 4, 5, 6, 7, 8)

TERNARY = 1.5
TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256
FULL_PRECISION_BYTES = 2  # residual window, sinks and outlier values are fp16


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
    if n < 0:
        raise ValueError(f"row length must be >= 0, got {n}")
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

    def __post_init__(self) -> None:
        if self.bits != 16 and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit width {self.bits!r}; valid: {', '.join(map(str, SUPPORTED_BITS))}, 16")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"axis must be 'token' or 'channel', got {self.axis!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None, got {self.group_size}")
        if self.scale_dtype not in DTYPE_BYTES:
            raise ValueError(f"scale_dtype must be one of {sorted(DTYPE_BYTES)}, got {self.scale_dtype!r}")
        if self.levels not in ("uniform", "nonuniform", "float8_e4m3", "float8_e5m2"):
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

    @property
    def quantized(self) -> bool:
        return self.bits != 16

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
        if self.levels in ("float8_e4m3", "float8_e5m2"):
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
    shared: int = 0  # codebooks, static scales, reorder indices, fp8 tensor scales: once per layer

    @property
    def metadata(self) -> int:
        return self.scales + self.zeros

    @property
    def outliers(self) -> int:
        return self.outlier_values + self.outlier_indices + self.outlier_pointers

    @property
    def per_sequence(self) -> int:
        return self.codes + self.metadata + self.outliers + self.residual + self.sinks

    @property
    def total(self) -> int:
        return self.per_sequence + self.shared

    def __add__(self, other: ByteBreakdown) -> ByteBreakdown:
        return ByteBreakdown(**{f: getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__})


def stream_bytes(fmt: StreamFormat, tokens: int, kv_heads: int, head_dim: int, sink_tokens: int) -> ByteBreakdown:
    """Exact bytes of one stream (K or V) of one layer holding `tokens` tokens of one sequence."""
    if tokens < 0 or kv_heads < 1 or head_dim < 1:
        raise ValueError(f"need tokens >= 0, kv_heads >= 1, head_dim >= 1; got {tokens}, {kv_heads}, {head_dim}")
    h, d = kv_heads, head_dim
    sinks = min(tokens, sink_tokens)
    rest = tokens - sinks
    if not fmt.quantized:
        return ByteBreakdown(residual=tokens * h * d * FULL_PRECISION_BYTES)
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
    return ByteBreakdown(
        codes=h * tq * packed_row_bytes(fmt.bits, d),
        scales=groups * meta,
        zeros=0 if fmt.symmetric else groups * meta,
        outlier_values=tq * k * fmt.outlier_value_bits // 8,
        outlier_indices=tq * k * fmt.outlier_index_bits // 8,
        outlier_pointers=(tq + 1) * fmt.outlier_pointer_bits // 8 if k and tq else 0,
        residual=resid * h * d * FULL_PRECISION_BYTES,
        sinks=sinks * h * d * FULL_PRECISION_BYTES,
        shared=shared,
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

    def __post_init__(self) -> None:
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")

    def breakdown(self, tokens: int, kv_heads: int, head_dim: int) -> ByteBreakdown:
        """Byte breakdown of one layer holding `tokens` tokens of one sequence (K + V)."""
        return stream_bytes(self.key, tokens, kv_heads, head_dim, self.sink_tokens) + stream_bytes(
            self.value, tokens, kv_heads, head_dim, self.sink_tokens
        )

    def bytes(self, tokens: int, kv_heads: int, head_dim: int) -> int:
        """Exact bytes of one layer's K and V for one sequence of `tokens` tokens, shared data included."""
        return self.breakdown(tokens, kv_heads, head_dim).total

    def avg_bits(self, tokens: int, kv_heads: int, head_dim: int) -> float:
        """Average stored bits per K/V element at this context, all metadata included."""
        if tokens < 1:
            raise ValueError("avg_bits needs tokens >= 1")
        return 8 * self.bytes(tokens, kv_heads, head_dim) / (2 * tokens * kv_heads * head_dim)

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
    if isinstance(spec, tuple):
        k, v = spec
        return float(k), float(v)
    if isinstance(spec, (int, float)):
        return float(spec), float(spec)
    s = str(spec).strip().lower()
    try:
        if s.startswith("k") and "v" in s:
            k, v = s[1:].split("v", 1)
            return float(k), float(v)
        return float(s), float(s)
    except ValueError:
        raise ValueError(
            f"cannot read bits {spec!r}: use a number (e.g. 2) or 'k<bits>v<bits>' (e.g. k2v1.5)"
        ) from None


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
            "reordered channels, clipped per-token groups of 128, fp8 metadata, 128-token window, 5 sinks",
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

    return KVFormat(
        f"skvq-{bits_label((key_bits, value_bits))}",
        stream(key_bits),
        stream(value_bits),
        sink_tokens=sink_tokens,
        citation=METHODS["skvq"].citation,
    )


def get_format(method: str, bits: str | float | tuple | None = None) -> KVFormat:
    """The format of a named method at the given bits (e.g. `get_format("kivi", 2)`).

    Raises ValueError listing the valid names / bit widths for an unknown method or bits.
    """
    if method not in METHODS:
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
