"""How one stream (keys or values) of a layer is stored: `StreamFormat` and its option groups.

A `StreamFormat` holds the fields every quantized stream has (code width, grouping, metadata dtype,
full-precision window) and, for the methods that need more, one small frozen option group per
mechanism: `Outliers`, `TokenTiers`, `AgeSteps`, `ProductQuant`, `Rotation`, `LowRank`, `AbsmeanCodes`,
`ChannelShrink`. An absent group (None) stores nothing. An option group that needs its own codec names
it (`codec`), one that needs its own cache layout names that (`layout`), so the codec and the cache
layer of a stream follow from its data. Data only: no torch, no numpy.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Literal

Axis = Literal["token", "channel"]
Levels = Literal["uniform", "nonuniform", "float8_e4m3", "float8_e5m2", "product"]
Flush = Literal["block", "sliding"]
Importance = Literal["accumulated", "normalized"]
Layout = Literal["streaming", "tiered", "staircase"]

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

#: the codec of each kind of code levels; an option group with its own `codec` overrides "affine".
LEVEL_CODECS: dict[str, str] = {
    "uniform": "affine",
    "nonuniform": "nuq",
    "float8_e4m3": "fp8",
    "float8_e5m2": "fp8",
    "product": "pq",
}


def check_count(name: str, value, minimum: int = 0) -> int:
    """`value` as an int if it is an integer >= `minimum` (bool refused); else a ValueError naming `name`.

    >>> check_count("tokens", 5.5)
    Traceback (most recent call last):
    ValueError: tokens must be an integer >= 0, got 5.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value) -> None:
    """A ValueError naming `name` unless `value` is a finite real number (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _valid_bits() -> str:
    return ", ".join(map(str, SUPPORTED_BITS))


# -- option groups -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outliers:
    """Dense-and-sparse outliers (KVQuant, GEAR): elements of a token's H*D kept sparse in full precision, as
    (value, index) pairs plus per-token row metadata (arXiv:2401.18079, Appendix M).

    thresholds: "topk": exactly ``k = ceil(fraction * H * D)`` per token, the largest after normalisation
                (values, GEAR); "channel": every element beyond its channel's thresholds calibrated at the
                fraction / 2 and 1 - fraction / 2 percentiles (KVQuant keys), so the count per token varies
                and the format counts k per token, the expected count (`stream_bytes(..., outliers_held=n)`
                gives the bytes of n held).
    index_bits: bits of a flat index h * D + d; None: the fewest whole bytes addressing H*D (8 bits up to
                256 channels, else 16).
    pointer_bits: bits of a CSR row pointer, one per token plus one; None: no pointers where the count per
                token is fixed ("topk"), else a per-token count in the fewest whole bytes holding 0..H*D.
    """

    fraction: float
    value_bits: int = 16
    index_bits: int | None = 16
    pointer_bits: int | None = 32
    thresholds: str = "topk"

    def __post_init__(self) -> None:
        check_number("outlier fraction", self.fraction)
        if not 0.0 < self.fraction < 0.5:
            raise ValueError(f"outlier fraction must be in (0, 0.5), got {self.fraction}")
        check_count("outlier value_bits", self.value_bits, 1)
        for name in ("index_bits", "pointer_bits"):
            if getattr(self, name) is not None:
                check_count(f"outlier {name}", getattr(self, name), 1)
        if self.thresholds not in ("topk", "channel"):
            raise ValueError(f"outlier thresholds must be 'topk' or 'channel', got {self.thresholds!r}")

    def index_bits_for(self, elements: int) -> int:
        """Bits of one stored index into a token's `elements` (= H*D) values."""
        if self.index_bits is not None:
            return self.index_bits
        return 8 if elements <= 256 else 16

    def row_bytes(self, tokens: int, elements: int) -> int:
        """Bytes of the per-token row metadata (pointers or counts) of `tokens` tokens of `elements` values."""
        if not tokens:
            return 0
        if self.pointer_bits is not None:
            return (tokens + 1) * self.pointer_bits // 8
        if self.thresholds == "topk":
            return 0  # k per token: row r starts at r * k
        return tokens * (1 if elements < 256 else 2)  # counts 0..elements


@dataclass(frozen=True)
class TokenTiers:
    """Token tiers by attention score (ZipCache, MiKV, heavy-hitter eviction).

    importance: "accumulated" (H2O heavy hitters: the high tier is fp16 and re-selected as scores grow;
                losers drop to the stream's `bits`) or "normalized" (ZipCache: each token's tier is
                chosen once, when it leaves the window, by its mean attention).
    fraction:   share of body tokens in the high tier (ceil), or
    budget:     a fixed number of high-tier body tokens per head (overrides the fraction).
    bits:       bits of the high tier (16 = fp16). The stream's `bits` = 0 evicts the low tier.
    channel_normalize: divide channels by a per-layer fp16 normaliser before per-token codes
                (ZipCache's channel-separable token-wise quantization).
    """

    layout: ClassVar[Layout] = "tiered"

    importance: Importance
    fraction: float = 0.0
    budget: int = 0
    bits: float = 16
    channel_normalize: bool = False

    def __post_init__(self) -> None:
        if self.importance not in ("accumulated", "normalized"):
            raise ValueError(f"importance must be 'accumulated' or 'normalized', got {self.importance!r}")
        check_number("salient fraction", self.fraction)
        check_number("salient bits", self.bits)
        check_count("salient budget", self.budget, 0)
        if self.bits == 0:
            raise ValueError("the high tier cannot be evicted (salient bits = 0)")
        if self.bits not in (*SUPPORTED_BITS, 16):
            raise ValueError(f"salient bits {self.bits!r} unsupported; valid: {_valid_bits()}, 16")
        if self.importance == "accumulated" and self.bits != 16:
            raise ValueError("heavy-hitter tiers re-select the high tier as scores grow, so it must be fp16 (16)")
        if not (0 < self.fraction <= 1 or self.budget > 0):
            raise ValueError("token tiers need salient fraction in (0, 1] or budget >= 1")


@dataclass(frozen=True)
class AgeSteps:
    """Staircase precision by age: ((n_1, b_1), (n_2, b_2), ...): past the window, the newest n_1 body
    tokens are stored per token at b_1 bits, the next n_2 at b_2, ..., all older ones at the stream's
    `bits`; a token steps down as it ages."""

    layout: ClassVar[Layout] = "staircase"

    steps: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        for n, b in self.steps:
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 or b not in (*SUPPORTED_BITS, 16):
                raise ValueError(f"age step ({n}, {b}) needs n >= 1 and bits in {SUPPORTED_BITS} or 16")


@dataclass(frozen=True)
class ProductQuant:
    """Product quantization (MILLION), with ``levels="product"``: each head vector is split into
    D / subspace_dims subspaces, each stored as one code of ``bits * subspace_dims`` bits that indexes
    a per-layer k-means codebook. The stream's `bits` stays bits per element."""

    codec: ClassVar[str] = "pq"

    subspace_dims: int

    def __post_init__(self) -> None:
        check_count("pq subspace_dims", self.subspace_dims, 1)


@dataclass(frozen=True)
class Rotation:
    """A fast Walsh-Hadamard rotation across the token's heads, after the channel reorder, before
    quantization (RotateKV); orthogonal, no bytes."""

    codec: ClassVar[str] = "rotate"


@dataclass(frozen=True)
class LowRank:
    """Rank-`rank` fp16 factors of the quantization error, one pair per chunk of `residual_tokens`
    tokens and head (GEAR); the stream needs block flush."""

    codec: ClassVar[str] = "gear"

    rank: int

    def __post_init__(self) -> None:
        check_count("lowrank rank", self.rank, 1)


@dataclass(frozen=True)
class AbsmeanCodes:
    """1-bit / ternary symmetric codes whose per-group scale is mean |x| (BitNet-style, VidKV) instead of
    max |x|, per channel over groups of tokens.

    mixed_fraction: this share of each head's channels, the widest-range ("anomalous") ones from
                    calibration, is stored at `mixed_bits` (asymmetric, scale + zero per group).
    fft:            the other channels of each token are stored as their D' real orthonormal rFFT
                    coefficients (VidKV's 1-bit + FFT keys).
    """

    codec: ClassVar[str] = "vidkv"

    mixed_fraction: float = 0.0
    mixed_bits: float = 2
    fft: bool = False

    def __post_init__(self) -> None:
        check_number("mixed_fraction", self.mixed_fraction)
        check_number("mixed_bits", self.mixed_bits)
        if not 0 <= self.mixed_fraction < 1 or self.mixed_bits not in SUPPORTED_BITS:
            raise ValueError(f"mixed_fraction must be in [0, 1) and mixed_bits in {SUPPORTED_BITS}")


@dataclass(frozen=True)
class ChannelShrink:
    """Channel shrinking (CSKV): each token's H*D vector is stored as its r = floor(fraction * H * D)
    coordinates (fp16, the stream's `bits` = 16) in a per-layer basis ``[H*D, r]`` fp16 from the
    calibration SVD; decode multiplies back."""

    codec: ClassVar[str] = "cskv"

    fraction: float

    def __post_init__(self) -> None:
        check_number("latent fraction", self.fraction)
        if not 0 < self.fraction < 1:
            raise ValueError(f"latent fraction must be in (0, 1), got {self.fraction}")


#: StreamFormat's option-group fields and their types.
_OPTIONS: dict[str, type] = {
    "outliers": Outliers,
    "tiers": TokenTiers,
    "steps": AgeSteps,
    "pq": ProductQuant,
    "rotation": Rotation,
    "lowrank": LowRank,
    "absmean": AbsmeanCodes,
    "shrink": ChannelShrink,
}


@dataclass(frozen=True)
class StreamFormat:
    """How one of the two streams (keys or values) of a layer is stored.

    bits:              code width, 1-8 or 1.5 (ternary), or 16 for an unquantized stream (0 with
                       `tiers`: the low tier is evicted).
    axis:              "token": each token's channels are grouped (per-token quantization);
                       "channel": each channel is grouped over tokens (per-channel, KIVI keys).
    group_size:        elements per group along the grouped axis; None = whole head_dim
                       (token axis) or one static calibrated scale per channel (channel axis).
    symmetric:         no zero point stored.
    levels:            "uniform" affine grid, "nonuniform" codebook of 2**bits fp16 levels per
                       layer (KVQuant nuq), "float8_*" fp8 codes with one fp32 scale per layer, or
                       "product" codes (with `pq`).
    scale_dtype:       dtype of scales and zeros ("fp16", "bf16", "fp8_e4m3", "fp32", "e8m0").
    residual_tokens:   full-precision recent tokens; `flush` says how they leave the window:
                       "block" (KIVI keys: quantized R at a time when R have accumulated) or
                       "sliding" (the oldest token is quantized as each new one arrives).
    reorder_channels:  int16 channel permutation per head stored once per layer (SKVQ).
    clip_ratio:        min/max shrink factor before quantization (SKVQ); no bytes.
    groups_span_heads: per-token groups run over the token's whole H*D vector (after reordering)
                       instead of within each head: SKVQ groups, KVQuant per-token value scales.

    Option groups (None = absent): `outliers` (`Outliers`), `tiers` (`TokenTiers`), `steps`
    (`AgeSteps`), `pq` (`ProductQuant`), `rotation` (`Rotation`), `lowrank` (`LowRank`), `absmean`
    (`AbsmeanCodes`), `shrink` (`ChannelShrink`).
    """

    bits: float = 16
    axis: Axis = "token"
    group_size: int | None = None
    symmetric: bool = False
    levels: Levels = "uniform"
    scale_dtype: str = "fp16"
    residual_tokens: int = 0
    flush: Flush = "sliding"
    reorder_channels: bool = False
    clip_ratio: float = 1.0
    groups_span_heads: bool = False
    outliers: Outliers | None = None
    tiers: TokenTiers | None = None
    steps: AgeSteps | None = None
    pq: ProductQuant | None = None
    rotation: Rotation | None = None
    lowrank: LowRank | None = None
    absmean: AbsmeanCodes | None = None
    shrink: ChannelShrink | None = None

    def __post_init__(self) -> None:
        for name in ("bits", "clip_ratio"):
            check_number(name, getattr(self, name))
        check_count("residual_tokens", self.residual_tokens, 0)
        if self.group_size is not None:
            check_count("group_size", self.group_size, 1)
        for name, kind in _OPTIONS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{name} must be a {kind.__name__} or None, got {type(value).__name__}")
        if self.tiers is not None:
            if self.bits not in (0, *SUPPORTED_BITS, 16):
                raise ValueError(f"bits {self.bits!r} unsupported; valid: 0 (evicted), {_valid_bits()}, 16")
        elif self.bits != 16 and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit width {self.bits!r}; valid: {_valid_bits()}, 16")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"axis must be 'token' or 'channel', got {self.axis!r}")
        if self.scale_dtype not in DTYPE_BYTES:
            raise ValueError(f"scale_dtype must be one of {sorted(DTYPE_BYTES)}, got {self.scale_dtype!r}")
        if self.levels not in LEVEL_CODECS:
            raise ValueError(f"unknown levels {self.levels!r}")
        if self.levels.startswith("float8") and self.bits != 8:
            raise ValueError(f"{self.levels} codes are 8 bits, got bits={self.bits}")
        if self.levels == "nonuniform" and self.bits == TERNARY:
            raise ValueError("a non-uniform codebook needs integer bits")
        if self.bits == 16 and self.levels != "uniform":
            raise ValueError(f"an unquantized (16-bit) stream has no {self.levels} codes")
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
        if (self.levels == "product") != (self.pq is not None):
            raise ValueError("product quantization needs levels='product' and pq=ProductQuant(...) together")
        if self.pq is not None and self.pq_code_bits not in range(1, 9):
            raise ValueError(
                f"product codes must be 1..8 bits: bits ({self.bits}) x pq subspace_dims "
                f"({self.pq.subspace_dims}) = {self.bits * self.pq.subspace_dims}"
            )
        self._check_options()
        self.codec  # noqa: B018  (refuses option groups that need different codecs)
        self.layout  # noqa: B018

    def _check_options(self) -> None:
        plain_tokens = self.axis == "token" and self.outliers is None and not self.reorder_channels
        if self.tiers is not None:
            if not plain_tokens or self.flush != "sliding" or self.groups_span_heads or self.levels != "uniform":
                raise ValueError("token tiers store per-token uniform codes per head with a sliding window only")
        if self.steps is not None:
            if self.axis != "token" or self.flush != "sliding" or self.outliers is not None:
                raise ValueError("age steps store per-token codes with a sliding window, without tiers or outliers")
            if self.reorder_channels or self.groups_span_heads or self.levels != "uniform":
                raise ValueError("age steps use plain uniform per-token codes per head")
        if self.absmean is not None:
            if self.axis != "channel" or not self.group_size or self.levels != "uniform" or self.outliers:
                raise ValueError("absmean codes are per-channel uniform formats with groups (VidKV)")
            if self.bits not in (1, TERNARY) or not self.symmetric:
                raise ValueError("absmean codes are symmetric 1-bit or ternary (1.5)")
        if self.rotation is not None and (self.axis != "token" or self.groups_span_heads or not self.reorder_channels):
            raise ValueError(
                "a rotation runs after the channel reorder on per-token rows per head: needs reorder_channels"
            )
        if self.shrink is not None and (self.bits != 16 or self.axis != "token"):
            raise ValueError("channel shrinking stores fp16 (bits=16) per-token latents")
        if self.lowrank is not None and not (self.flush == "block" and self.residual_tokens):
            raise ValueError("a low-rank residual is fitted per flushed chunk: needs flush='block' and residual_tokens")

    def _options(self) -> tuple:
        return tuple(o for o in (getattr(self, n) for n in _OPTIONS) if o is not None)

    @property
    def codec(self) -> str:
        """Name of the codec that stores this stream: by `levels`, or by the option group that needs its own."""
        named = {LEVEL_CODECS[self.levels], *(type(o).codec for o in self._options() if hasattr(type(o), "codec"))}
        if len(named) > 1:
            named.discard("affine")  # the uniform grid yields to an option group with its own codec
        if len(named) > 1:
            raise ValueError(f"levels {self.levels!r} and the option groups need different codecs: {sorted(named)}")
        return named.pop()

    @property
    def layout(self) -> Layout:
        """How the stream's tokens are held: "streaming" (sinks, body, window), or the layout of its
        `tiers` ("tiered") or `steps` ("staircase")."""
        named = {type(o).layout for o in self._options() if hasattr(type(o), "layout")}
        if len(named) > 1:
            raise ValueError(f"options need different layouts: {sorted(named)}")
        return named.pop() if named else "streaming"

    @property
    def tiered(self) -> bool:
        return self.tiers is not None

    @property
    def quantized(self) -> bool:
        """Whether tokens leave the fp16 window into a compressed body (codes, or CSKV's fp16 latents)."""
        return self.bits != 16 or self.shrink is not None

    @property
    def num_levels(self) -> int:
        return 3 if self.bits == TERNARY else 2 ** int(self.bits)

    def salient_count(self, body_tokens: int) -> int:
        """High-tier tokens per head among `body_tokens` quantized tokens: min(T, budget) or ceil(f * T)."""
        check_count("body_tokens", body_tokens, 0)
        if self.tiers.budget:
            return min(body_tokens, self.tiers.budget)
        f = Fraction(self.tiers.fraction).limit_denominator(10**6)  # exact ceil: 0.2 * 5 is 1, not 2
        return min(body_tokens, -(-body_tokens * f.numerator // f.denominator))

    def scored_tokens(self, body_tokens: int, residual: int) -> int:
        """Tokens per head whose fp32 attention score is kept: the window (+ the fp16 heavy hitters)."""
        if self.tiers is None:
            return 0
        return residual + (self.salient_count(body_tokens) if self.tiers.importance == "accumulated" else 0)

    def mixed_channels(self, head_dim: int) -> int:
        """Channels per head stored at `absmean.mixed_bits` (VidKV's anomalous channels): floor(fraction * D)."""
        return math.floor(round(self.absmean.mixed_fraction * head_dim, 6)) if self.absmean else 0

    @property
    def pq_code_bits(self) -> int:
        """Bits of one product-quantization code (one subspace of one head of one token)."""
        return int(self.bits * self.pq.subspace_dims) if self.pq else 0

    def pq_subspaces(self, head_dim: int) -> int:
        if head_dim % self.pq.subspace_dims:
            raise ValueError(f"head_dim {head_dim} is not a multiple of pq subspace_dims {self.pq.subspace_dims}")
        return head_dim // self.pq.subspace_dims

    def latent_dims(self, kv_heads: int, head_dim: int) -> int:
        """CSKV rank r: floor(shrink.fraction * H * D), at least 1."""
        return max(1, math.floor(round(self.shrink.fraction * kv_heads * head_dim, 6)))

    def residual_count(self, tokens: int) -> int:
        """Full-precision tokens held after `tokens` (past the sinks) have entered the stream."""
        r = self.residual_tokens
        if not self.quantized or r == 0:
            return tokens if not self.quantized else 0
        return tokens % r if self.flush == "block" else min(tokens, r)

    def outliers_per_token(self, kv_heads: int, head_dim: int) -> int:
        return math.ceil(self.outliers.fraction * kv_heads * head_dim) if self.outliers else 0

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
