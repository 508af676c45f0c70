"""How a layer's keys and values are stored (`KVFormat`), including XQuant's X caches and MiniCache's
merged layer pairs; the single source of truth for byte counts.

- X caches     XQuant / XQuant-CL (`KVFormat.cache_input`): one per-token stream of the layer input,
               ``hidden_size`` channels per token (`key` describes it), instead of K and V;
               `KVFormat.remat_flops_per_token` is the matmul cost of rebuilding K and V from it.
- merged pairs MiniCache (`KVFormat.merge_depth_fraction`): per deep layer pair and stream, an fp16
               direction ``[H, T, D]``, fp16 magnitudes ``[2, H, T]`` and n retained tokens
               ``[2, H, n, D]`` fp16 + int32 indices ``[n]`` (`pair_breakdown`, `model_bytes`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Literal

from .accounting import ByteBreakdown, stream_bytes
from .stream import FULL_PRECISION_BYTES, Layout, StreamFormat, check_count

CacheInput = Literal["kv", "x", "x-delta"]
LayerKind = Literal[Layout, "xquant", "minicache"]


def _selection(s: StreamFormat) -> tuple | None:
    """What decides which tokens a tiered stream keeps where; None for a stream without tiers."""
    return None if s.tiers is None else (s.tiers.importance, s.tiers.fraction, s.tiers.budget, s.residual_tokens)


@dataclass(frozen=True)
class KVFormat:
    """How a layer's keys and values are stored; the single source of truth for byte counts.

    cache_input:          what a layer stores. "kv": K and V (every method but XQuant). "x": the
                          layer input X (post-RMSNorm, `hidden_size` channels per token) from which
                          K = X W_k and V = X W_v are rematerialized at every decode step (XQuant);
                          "x-delta": the quantized difference of the pre-norm residual stream from
                          the previous layer's reconstruction (XQuant-CL). X formats store one
                          stream, described by `key` (`value` is the same object, counted once),
                          of one "head" of `hidden_size` channels.
    merge_depth_fraction: MiniCache: this share of the layers, the deepest ones, is merged in
                          adjacent pairs (see `merge_pairs`); 0 = no merging.
    retain_fraction:      MiniCache: the share of tokens per pair and stream kept unmerged, at which
                          `bytes` is stated; a cache holds a data-dependent count (`retained=`).
    """

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
        if _selection(self.key) != _selection(self.value):
            raise ValueError(
                "K and V must select the same tokens: equal tier importance, fraction, budget and residual_tokens "
                "in both streams"
            )
        if self.key.layout != self.value.layout:
            raise ValueError(f"K and V must be held alike: key layout {self.key.layout}, value {self.value.layout}")

    @property
    def layer(self) -> LayerKind:
        """Which cache layer holds this format: "minicache" (merged layer pairs), "xquant" (X caches),
        else the layout of its streams ("streaming", "tiered", "staircase")."""
        if self.merge_depth_fraction:
            return "minicache"
        if self.cache_input != "kv":
            return "xquant"
        return self.key.layout

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

        >>> from kvq_core.formats import get_format
        >>> get_format("minicache", 16).merge_pairs(30)[:2]   # SmolLM2: S = 15
        ((15, 16), (17, 18))
        """
        check_count("num_layers", num_layers, 1)
        if not self.merge_depth_fraction:
            return ()
        pairs = self.extra.get("pairs")
        if pairs is not None:  # chosen on calibration text (`calibration.calibrate_pairs`)
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
