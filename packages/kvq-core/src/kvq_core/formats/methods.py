"""The methods kvq implements, one declarative `Method` entry each, and the format builders they use.

Everything else follows from an entry: `get_format` builds its `KVFormat`, the format names the codec
of each stream (`StreamFormat.codec`, resolved by `kvq_core.codecs.make_codec`) and the cache layer
that holds it (`KVFormat.layer`, resolved by `kvq_core.cache` and `kvq_core.hf_cache`), and the
simulator lists `METHODS` as they are. Adding a method is adding an entry here (and a codec module
when no existing codec stores it). Bits are looked up exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .kv import KVFormat, LayerKind
from .stream import (
    TERNARY,
    AbsmeanCodes,
    AgeSteps,
    Axis,
    ChannelShrink,
    LowRank,
    Outliers,
    ProductQuant,
    Rotation,
    StreamFormat,
    TokenTiers,
)

Streams = Literal["none", "keys", "values", "both"]
Kernel = Literal["", "kivi"]


@dataclass(frozen=True)
class Calibration:
    """Per-layer state a method fits before it serves: on which streams, from what data.

    Every codec with such state fits it on the first block it stores (the prefill) when no calibration
    was loaded, so calibration improves a method but never gates it.
    """

    streams: Streams = "none"
    data: str = ""


NO_CALIBRATION = Calibration()


@dataclass(frozen=True)
class Method:
    """A named method: its citation, the (key_bits, value_bits) it stores, how to build its format.

    build:       (key_bits, value_bits) -> the method's `KVFormat` at those bits.
    calibration: what per-layer state it fits (`Calibration`).
    kernel:      the fused kernel layout that runs it ("kivi": `kvq_kernels.hf_attention.kivi_params`),
                 or "" for the torch reference path only.
    """

    name: str
    citation: str
    summary: str
    bits: tuple[tuple[float, float], ...]
    default_bits: tuple[float, float]
    build: Callable[[float, float], KVFormat]
    calibration: Calibration = NO_CALIBRATION
    kernel: Kernel = ""

    def format(self, bits: str | float | tuple | None = None) -> KVFormat:
        """The format at `bits` (default `default_bits`); ValueError listing the valid bits otherwise."""
        kv = self.default_bits if bits is None else parse_bits(bits)
        if kv not in self.bits:
            raise ValueError(
                f"method {self.name!r} has no {bits_label(kv)}-bit variant; valid bits: "
                + ", ".join(bits_label(b) for b in self.bits)
            )
        return self.build(*kv)

    @property
    def codecs(self) -> tuple[str | None, str | None]:
        """The codec of the key and the value stream (None: stored unquantized)."""
        fmt = self.format()
        return tuple(s.codec if s.quantized else None for s in (fmt.key, fmt.value))

    @property
    def layer(self) -> LayerKind:
        """The cache layer kind that holds the method (`KVFormat.layer`)."""
        return self.format().layer


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


# -- format builders ---------------------------------------------------------------------------------

_FP16 = StreamFormat()


def _citation(method: str) -> str:
    return METHODS[method].citation


def fp16_format() -> KVFormat:
    return KVFormat("fp16", _FP16, _FP16)


def int_format(bits: float) -> KVFormat:
    """Per-token per-head asymmetric codes with an fp16 scale and zero per token and head."""
    s = StreamFormat(bits=bits, axis="token", group_size=None)
    return KVFormat(f"int{_fmt_bits(bits)}", s, s, citation=_citation("int"))


def fp8_format(levels: str) -> KVFormat:
    """fp8 codes ("float8_e4m3" or "float8_e5m2") with one fp32 scale per tensor and layer."""
    s = StreamFormat(bits=8, levels=levels, axis="token")
    name = "fp8-" + levels.removeprefix("float8_")
    return KVFormat(name, s, s, citation=_citation(name))


def kivi_format(bits: float = 2, group_size: int = 32, residual_tokens: int = 128) -> KVFormat:
    key = StreamFormat(bits=bits, axis="channel", group_size=group_size, residual_tokens=residual_tokens, flush="block")
    val = StreamFormat(bits=bits, axis="token", group_size=group_size, residual_tokens=residual_tokens, flush="sliding")
    return KVFormat(
        f"kivi-{_fmt_bits(bits)}",
        key,
        val,
        citation=_citation("kivi"),
        extra={"group_size": group_size, "residual_tokens": residual_tokens},
    )


def kvquant_format(bits: float = 3, outlier_fraction: float = 0.01, sink_tokens: int = 1, window: int = 0) -> KVFormat:
    """KVQuant: pre-RoPE keys per channel with static calibrated ranges, values per token, nuq codebooks.

    Outliers (`outlier_fraction` of the elements): keys keep every element beyond its channel's calibrated
    thresholds, values the top `outlier_fraction` of each token (the paper's online per-token thresholds);
    indices in the fewest whole bytes addressing a token's H*D channels, per-token counts for keys.
    window: the most recent tokens kept in fp16 (sliding), 0 for none as in the paper's main results.
    """
    key_out = val_out = None
    if outlier_fraction:
        key_out = Outliers(outlier_fraction, index_bits=None, pointer_bits=None, thresholds="channel")
        val_out = Outliers(outlier_fraction, index_bits=None, pointer_bits=None)
    key = StreamFormat(
        bits=bits, axis="channel", group_size=None, levels="nonuniform", outliers=key_out, residual_tokens=window
    )
    val = StreamFormat(
        bits=bits,
        axis="token",
        group_size=None,
        levels="nonuniform",
        outliers=val_out,
        groups_span_heads=True,
        residual_tokens=window,
    )
    name = f"kvquant-nuq{_fmt_bits(bits)}" + (f"-{outlier_fraction * 100:g}%" if outlier_fraction else "")
    name += f"-w{window}" if window else ""
    return KVFormat(name, key, val, sink_tokens=sink_tokens, pre_rope_keys=True, citation=_citation("kvquant"))


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
        citation=_citation("skvq"),
    )


def million_format(bits: float = 4, window: int = 128) -> KVFormat:
    """MILLION: d_sub = 8 / bits channels per 8-bit code (M = 64 for D = 128 at 4 bits, M = 32 at 2 bits).

    The fp16 window is flushed `window` tokens at a time, as MILLION's residual buffer (128 = head_dim).
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"MILLION uses 8-bit codes over 8 / bits channels: bits must divide 8, got {bits}")
    s = StreamFormat(
        bits=bits, levels="product", pq=ProductQuant(int(8 // bits)), residual_tokens=window, flush="block"
    )
    return KVFormat(f"million-{_fmt_bits(bits)}", s, s, citation=_citation("million"))


def rotatekv_format(bits: float = 2, sink_tokens: int = 1) -> KVFormat:
    """RotateKV: per-token codes after reorder + grouped-head Hadamard; keys pre-RoPE; fp16 sink token(s)."""
    s = StreamFormat(bits=bits, axis="token", group_size=None, reorder_channels=True, rotation=Rotation())
    return KVFormat(
        f"rotatekv-{_fmt_bits(bits)}",
        s,
        s,
        sink_tokens=sink_tokens,
        pre_rope_keys=True,
        citation=_citation("rotatekv"),
    )


def gear_format(bits: float = 2, chunk: int = 64, rank: int = 2, outlier_fraction: float = 0.02) -> KVFormat:
    """GEAR over KIVI-style quantization: buffer of `chunk` tokens, rank-`rank` error, 2% outliers."""

    def stream(axis: Axis) -> StreamFormat:
        return StreamFormat(
            bits=bits,
            axis=axis,
            group_size=chunk,
            outliers=Outliers(outlier_fraction) if outlier_fraction else None,
            residual_tokens=chunk,
            flush="block",
            lowrank=LowRank(rank),
        )

    return KVFormat(
        f"gear-{_fmt_bits(bits)}",
        stream("channel"),
        stream("token"),
        citation=_citation("gear"),
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
        citation=_citation("bfp"),
    )


def staircase_format(bits: float = 2, window: int = 128, steps: tuple = ((512, 8), (2048, 4))) -> KVFormat:
    """Older tokens at fewer bits: steps at or below `bits` are dropped (the 4-bit variant is 8 -> 4)."""
    s = StreamFormat(
        bits=bits, axis="token", residual_tokens=window, steps=AgeSteps(tuple((n, b) for n, b in steps if b > bits))
    )
    return KVFormat(f"staircase-{_fmt_bits(bits)}", s, s, citation=_citation("staircase"))


def vidkv_format(key_bits: float = 1.5, group_size: int = 32, window: int = 128) -> KVFormat:
    """VidKV: key_bits = 1 + the share of 2-bit anomalous channels (VidKV's `difficult_ratio`)."""
    if not 1 <= key_bits < 2:
        raise ValueError(f"VidKV key bits are 1.x (1 + share of 2-bit channels), got {key_bits}")
    common = dict(axis="channel", group_size=group_size, residual_tokens=window, flush="block", symmetric=True)
    key = StreamFormat(
        bits=1,
        absmean=AbsmeanCodes(mixed_fraction=key_bits - 1, mixed_bits=2, fft=True),
        reorder_channels=True,
        **common,
    )
    value = StreamFormat(bits=TERNARY, absmean=AbsmeanCodes(), **common)
    return KVFormat(
        f"vidkv-{bits_label((key_bits, 1.58))}",
        key,
        value,
        citation=_citation("vidkv"),
        extra={"group_size": group_size, "residual_tokens": window},
    )


def cskv_format(bits: float = 4, window: int = 128) -> KVFormat:
    """CSKV: fp16 latents of rank bits / 16 x H*D (4 -> a quarter of the channels), a full-precision window."""
    s = StreamFormat(bits=16, axis="token", shrink=ChannelShrink(bits / 16), residual_tokens=window, flush="sliding")
    return KVFormat(f"cskv-{_fmt_bits(bits)}", s, s, citation=_citation("cskv"))


def zipcache_format(
    bits: float = 2, salient_bits: float = 4, salient_fraction: float = 0.4, window: int = 128
) -> KVFormat:
    """ZipCache: tiers chosen once per token by normalized attention; channel-separable per-token codes."""
    tiers = TokenTiers("normalized", fraction=salient_fraction, bits=salient_bits, channel_normalize=True)
    s = StreamFormat(bits=bits, axis="token", residual_tokens=window, tiers=tiers)
    return KVFormat(f"zipcache-{_fmt_bits(salient_bits)}/{_fmt_bits(bits)}", s, s, citation=_citation("zipcache"))


def mikv_format(bits: float = 2, salient_fraction: float = 0.2, window: int = 128) -> KVFormat:
    """MiKV: fp16 heavy hitters (H2O selection), the other tokens kept at `bits` instead of evicted.

    Keys get a per-layer channel normaliser before their per-token codes (MiKV's outlier-aware balancing
    of key channels); values are quantized per token directly.
    """

    def stream(normalize: bool) -> StreamFormat:
        tiers = TokenTiers("accumulated", fraction=salient_fraction, channel_normalize=normalize)
        return StreamFormat(bits=bits, axis="token", residual_tokens=window, tiers=tiers)

    return KVFormat(f"mikv-{_fmt_bits(bits)}", stream(True), stream(False), citation=_citation("mikv"))


def h2o_format(budget: int = 2048, window: int = 128, sink_tokens: int = 0) -> KVFormat:
    """Heavy-hitter eviction at a fixed budget: `budget` fp16 heavy hitters + `window` recent tokens per head."""
    s = StreamFormat(bits=0, axis="token", residual_tokens=window, tiers=TokenTiers("accumulated", budget=budget))
    return KVFormat(f"h2o-{budget}+{window}", s, s, sink_tokens=sink_tokens, citation=_citation("h2o"))


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
        citation=_citation(name),
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
    text by `calibration.calibrate_pairs`) instead of every pair of the deepest f; () merges none.
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
        citation=_citation("minicache"),
        merge_depth_fraction=merge_depth_fraction,
        retain_fraction=retain_fraction,
        extra=extra,
    )


# -- the registry ------------------------------------------------------------------------------------

_KV_ACTIVATIONS = "K/V activations of the model on calibration text"

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("fp16", "unquantized baseline", "fp16 K and V", ((16, 16),), (16, 16), lambda k, v: fp16_format()),
        Method(
            "int",
            "QServe KV4 (arXiv:2405.04532) / LMDeploy KV int8/int4",
            "per-token per-head asymmetric, fp16 scale and zero (4.25 / 8.25 bits)",
            ((8, 8), (4, 4), (2, 2), (3, 3)),
            (4, 4),
            lambda k, v: int_format(k),
        ),
        Method(
            "fp8-e4m3",
            "vLLM fp8 KV cache",
            "fp8 e4m3 codes, one fp32 scale per tensor",
            ((8, 8),),
            (8, 8),
            lambda k, v: fp8_format("float8_e4m3"),
            Calibration("both", f"{_KV_ACTIVATIONS}: the absolute maximum, one fp32 scale per layer and stream"),
        ),
        Method(
            "fp8-e5m2",
            "vLLM fp8 KV cache",
            "fp8 e5m2 codes, one fp32 scale per tensor",
            ((8, 8),),
            (8, 8),
            lambda k, v: fp8_format("float8_e5m2"),
            Calibration("both", f"{_KV_ACTIVATIONS}: the absolute maximum, one fp32 scale per layer and stream"),
        ),
        Method(
            "kivi",
            "KIVI (Liu et al., ICML 2024, arXiv:2402.02750)",
            "per-channel keys / per-token values, groups of 32, fp16 residual of 128",
            ((2, 2), (3, 3), (4, 4), (8, 8)),
            (2, 2),
            lambda k, v: kivi_format(k),
            kernel="kivi",
        ),
        Method(
            "kvquant",
            "KVQuant (Hooper et al., NeurIPS 2024, arXiv:2401.18079)",
            "pre-RoPE per-channel keys, per-token values, nuq codebooks, 1% sparse outliers, 1 sink",
            ((2, 2), (3, 3), (4, 4)),
            (3, 3),
            lambda k, v: kvquant_format(k, 0.01),
            Calibration("both", f"{_KV_ACTIVATIONS}, Fisher-weighted: nuq codebooks and static key-channel ranges"),
        ),
        Method(
            "kvquant-w128",
            "KVQuant (arXiv:2401.18079) with an fp16 recent-token window",
            "as kvquant, the 128 most recent tokens kept in fp16",
            ((2, 2), (3, 3), (4, 4)),
            (3, 3),
            lambda k, v: kvquant_format(k, 0.01, window=128),
            Calibration("both", f"{_KV_ACTIVATIONS}, Fisher-weighted: nuq codebooks and static key-channel ranges"),
        ),
        Method(
            "kvquant-w96",
            "KVQuant (arXiv:2401.18079) with an fp16 recent-token window",
            "as kvquant, the 96 most recent tokens kept in fp16 (the largest multiple of 32 that keeps nuq2/3/4 "
            "within 2.75/3.75/4.75 held bits at 4K tokens)",
            ((2, 2), (3, 3), (4, 4)),
            (3, 3),
            lambda k, v: kvquant_format(k, 0.01, window=96),
            Calibration("both", f"{_KV_ACTIVATIONS}, Fisher-weighted: nuq codebooks and static key-channel ranges"),
        ),
        Method(
            "kvquant-dense",
            "KVQuant without dense-and-sparse outliers (arXiv:2401.18079)",
            "as kvquant, no outliers",
            ((2, 2), (3, 3), (4, 4)),
            (3, 3),
            lambda k, v: kvquant_format(k, 0.0),
            Calibration("both", f"{_KV_ACTIVATIONS}, Fisher-weighted: nuq codebooks and static key-channel ranges"),
        ),
        Method(
            "skvq",
            "SKVQ (Duanmu et al., COLM 2024, arXiv:2405.06219)",
            "pre-RoPE keys, reordered channels, clipped per-token groups of 128, fp8 metadata, 128-token window, "
            "5 sinks",
            ((2, 1.5), (2, 2), (3, 3), (4, 4), (8, 8)),
            (2, 1.5),
            skvq_format,
            Calibration("both", f"{_KV_ACTIVATIONS}: channel order (k-means on channel ranges) and clip ratio"),
        ),
        Method(
            "million",
            "MILLION (Wang et al., DAC 2025, arXiv:2504.03661)",
            "product quantization: 8-bit codes per 2 (4-bit) or 4 (2-bit) channels, k-means codebooks, "
            "fp16 window of 128",
            ((4, 4), (2, 2)),
            (4, 4),
            lambda k, v: million_format(k),
            Calibration("both", f"{_KV_ACTIVATIONS}: k-means codebooks per subspace"),
        ),
        Method(
            "rotatekv",
            "RotateKV (Su et al., IJCAI 2025, arXiv:2501.16383)",
            "pre-RoPE keys, outlier-aware reorder + Hadamard across heads, per-token codes, 1 fp16 sink",
            ((2, 2), (3, 3), (4, 4)),
            (2, 2),
            lambda k, v: rotatekv_format(k),
            Calibration("both", f"{_KV_ACTIVATIONS}: outlier-aware channel order"),
        ),
        Method(
            "gear",
            "GEAR (Kang et al., arXiv:2403.05527)",
            "KIVI-style codes (G=64) + rank-2 fp16 error per 64-token chunk + 2% fp16 outliers",
            ((2, 2), (4, 4)),
            (2, 2),
            lambda k, v: gear_format(k),
        ),
        Method(
            "bfp",
            "Accurate Block Quantization in LLMs with Outliers (Trukhanov & Soloveychik, arXiv:2403.20137)",
            "block floating point: sign-magnitude codes + one 8-bit shared exponent per 32 channels of a token; "
            "key channels rearranged so outliers share blocks",
            ((4, 4), (4, 8), (8, 8)),
            (4, 4),
            bfp_format,
            Calibration("keys", "key activations of the model on calibration text: channel rearrangement"),
        ),
        Method(
            "staircase",
            "staircase adaptive quantization (SAQ), Li, arXiv:2410.18441",
            "age-based precision: fp16 window of 128, then 512 tokens at 8 bits, 2048 at 4 bits, older at "
            "the named bits (per token per head, fp16 scale and zero)",
            ((2, 2), (3, 3), (4, 4)),
            (2, 2),
            lambda k, v: staircase_format(k),
        ),
        Method(
            "vidkv",
            "VidKV (Tao et al., arXiv:2503.16257)",
            "keys: anomalous channels (k-1 share) 2-bit, the rest 1-bit rFFT coefficients; values ternary "
            "(1.58-bit) per channel, absmean scales; groups of 32 tokens, fp16 window of 128",
            ((1.5, 1.5), (1.25, 1.5)),
            (1.5, 1.5),
            lambda k, v: vidkv_format(k),
            Calibration("keys", "key activations of the model on calibration text: the anomalous channels"),
        ),
        Method(
            "cskv",
            "CSKV (Wang et al., arXiv:2409.10593), training-free channel shrinking",
            "K and V shrunk to 1/4 (4) or 1/2 (8) of their channels by a calibration SVD basis, fp16 latents, "
            "fp16 window of 128",
            ((4, 4), (8, 8)),
            (4, 4),
            lambda k, v: cskv_format(k),
            Calibration("both", f"{_KV_ACTIVATIONS}: the SVD basis"),
        ),
        Method(
            "zipcache",
            "ZipCache (He et al., NeurIPS 2024, arXiv:2405.14256)",
            "salient 40% of tokens (normalized attention) at 4 bits, rest 2 bits, channel-separable "
            "per-token codes, fp16 window of 128",
            ((2, 2),),
            (2, 2),
            lambda k, v: zipcache_format(k),
            Calibration("both", f"{_KV_ACTIVATIONS}: per-channel normalisers"),
        ),
        Method(
            "mikv",
            "MiKV: No Token Left Behind (Yang et al., arXiv:2402.18096)",
            "heavy hitters (20% by accumulated attention) fp16, the rest at low bits instead of evicted, "
            "fp16 window of 128",
            ((2, 2), (3, 3), (4, 4)),
            (2, 2),
            lambda k, v: mikv_format(k),
            Calibration("keys", "key activations of the model on calibration text: per-channel normalisers"),
        ),
        Method(
            "h2o",
            "H2O (Zhang et al., NeurIPS 2023, arXiv:2306.14048); fixed budget as Scissorhands (arXiv:2305.17118)",
            "eviction: 2048 heavy hitters (accumulated attention) + 128 recent tokens kept fp16, the rest dropped",
            ((0, 0),),
            (0, 0),
            lambda k, v: h2o_format(),
        ),
        Method(
            "xquant",
            "XQuant (Tomar et al., arXiv:2508.10395)",
            "caches the post-norm layer input X (per token, groups of 128, fp16 scale/zero) and "
            "rematerializes K = X W_k, V = X W_v each step; smaller than K+V only where hidden_size < "
            "2 x kv_heads x head_dim (MHA), bits here for an MHA layer",
            ((2, 2), (3, 3), (4, 4), (8, 8)),
            (4, 4),
            lambda k, v: xquant_format(k),
        ),
        Method(
            "xquant-cl",
            "XQuant-CL (Tomar et al., arXiv:2508.10395)",
            "as xquant, but each layer stores the quantized delta of its pre-norm input from the previous "
            "layer's reconstruction (an accumulator); bits here for an MHA layer",
            ((2, 2), (3, 3), (4, 4), (8, 8)),
            (3, 3),
            lambda k, v: xquant_format(k, cross_layer=True),
        ),
        Method(
            "minicache",
            "MiniCache (Liu et al., NeurIPS 2024, arXiv:2405.14366)",
            "fp16; the deeper half of the layers merged in adjacent pairs (SLERP direction shared, per-layer "
            "token magnitudes), 10% most distinct tokens kept unmerged; bits here for a merged layer",
            ((16, 16),),
            (16, 16),
            lambda k, v: minicache_format(),
            Calibration("none", "optional: calibration text chooses which layer pairs to merge (calibrate_pairs)"),
        ),
    ]
}

DEFAULT_METHOD_FOR_BITS = "kivi"  # a bare `--bits` means KIVI (fp16 for 16, int for 8)


def get_format(method: str, bits: str | float | tuple | None = None) -> KVFormat:
    """The format of a named method at the given bits (e.g. `get_format("kivi", 2)`).

    Raises ValueError listing the valid names / bit widths for an unknown method or bits.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return METHODS[method].format(bits)


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
