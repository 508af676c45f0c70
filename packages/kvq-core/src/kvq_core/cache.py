"""Streaming quantized KV cache of one layer: append tokens without re-quantizing history.

A `QuantizedStream` holds one stream (keys or values) of a layer for a batch, as three chronological
segments: full-precision sinks (the first S tokens), the quantized body, and the full-precision
residual window. Appending a block fills the sinks, then the residual, then flushes residual tokens
into the body as the format's flush policy says:

- "block" (KIVI keys): when R tokens have accumulated, all R are quantized at once; so after T
  tokens the residual holds T mod R. A prefill of L quantizes L - L mod R and keeps L mod R.
- "sliding" (KIVI values, SKVQ): the residual keeps the last R tokens; older ones are quantized.

Only the flushed tokens are quantized; the body grows by concatenation. The tensors held are exactly
those `formats.stream_bytes` counts: `layer.nbytes == batch * breakdown.per_sequence + breakdown.shared`.

A `StreamingLayer` holds a format by its layer kind (`KVFormat.layer`): "streaming" formats in two
`QuantizedStream`s, age-stepped ("staircase") ones in two `cache_staircase.StaircaseStream`s (same
API), and formats with token tiers chosen by attention score ("tiered": ZipCache, MiKV, heavy-hitter
eviction, which select the same tokens in K and V) in one `cache_tiers.TieredLayer`, which takes the
step's queries in `append`. XQuant and MiniCache layers are model-wide: `hf_cache.KVQCache`.
"""

from __future__ import annotations

import torch

from .cache_staircase import StaircaseStream
from .cache_tiers import TieredLayer
from .codecs import CAT_DIM, Codec, make_codec
from .formats import FULL_PRECISION_BYTES, KVFormat, StreamFormat, check_count, get_format
from .quant import check_finite, check_kv_range

__all__ = ["QuantizedStream", "StreamingLayer"]

_FP = torch.float16  # residual, sinks: FULL_PRECISION_BYTES bytes per element
assert torch.finfo(_FP).bits == 8 * FULL_PRECISION_BYTES


class QuantizedStream:
    """One stream (keys or values) of one layer, for a batch of sequences of equal length."""

    def __init__(self, fmt: StreamFormat, head_dim: int, sink_tokens: int = 0, codec: Codec | None = None):
        if not isinstance(fmt, StreamFormat):
            raise ValueError(f"fmt must be a StreamFormat, got {type(fmt).__name__}")
        check_count("head_dim", head_dim, 1)
        check_count("sink_tokens", sink_tokens, 0)
        self.fmt = fmt
        self.head_dim = head_dim
        self.sink_tokens = sink_tokens
        self.codec = codec if codec is not None or not fmt.quantized else make_codec(fmt, head_dim)
        self.sinks: torch.Tensor | None = None  # [B, H, s, D] fp16
        self.body: dict[str, torch.Tensor] = {}  # the codec's per-sequence tensors
        self.residual: torch.Tensor | None = None  # [B, H, r, D] fp16
        self._deq: torch.Tensor | None = None  # fp32 reconstruction of the body, grown per flushed block
        self.tokens = 0
        self.quantized_tokens = 0

    # -- appending -------------------------------------------------------------------------------
    def append(self, x: torch.Tensor) -> None:
        """Append a block ``x: [B, H, t, D]`` of new tokens (floating point, finite, within fp16's +-65504).

        Every token is held in fp16 (sinks, window) before it is quantized, so a block with a larger
        value is refused with a ValueError naming it rather than stored as inf.
        """
        self._check(x)
        if x.shape[2] == 0:
            return
        xs = x.to(_FP)
        take = min(self.sink_tokens - self._len(self.sinks), xs.shape[2])
        if take > 0:
            self.sinks = self._cat(self.sinks, xs[:, :, :take])
            xs = xs[:, :, take:]
        self.tokens += x.shape[2]
        if xs.shape[2] == 0:
            return
        self.residual = self._cat(self.residual, xs)
        if not self.fmt.quantized:
            return
        r, n = self.fmt.residual_tokens, self._len(self.residual)
        if r == 0:
            flush = n
        elif self.fmt.flush == "block":
            flush = (n // r) * r
        else:
            flush = max(0, n - r)
        if flush:
            # Tokens pass through the fp16 residual first; fp16 keeps 11 significant bits, more
            # than any code width here, so quantizing its copy changes no decision that matters.
            self._quantize(self.residual[:, :, :flush])
            self.residual = self.residual[:, :, flush:].contiguous()

    def _quantize(self, block: torch.Tensor) -> None:
        f = self.fmt
        if (
            f.axis == "channel"
            and f.group_size
            and self.quantized_tokens % f.group_size
            and self.quantized_tokens  # a partial last group already stored
        ):
            raise ValueError(
                f"appending to a per-channel stream whose last group of {f.group_size} tokens is partial "
                "would re-quantize history; give the format residual_tokens (a multiple of group_size)"
            )
        parts = self.codec.encode(block.float())
        # The body is never re-quantized, so each block is decoded once, when it is stored.
        deq = self.codec.decode(parts, block.shape[2])
        self._deq = deq if self._deq is None else torch.cat([self._deq, deq], dim=2)
        for name, t in parts.items():
            if name not in self.body:
                self.body[name] = t
            elif name == "outlier_pointers":
                self.body[name] = torch.cat([self.body[name], t[:, 1:] + self.body[name][:, -1:]], dim=1)
            else:
                self.body[name] = torch.cat([self.body[name], t], dim=CAT_DIM[name])
        self.quantized_tokens += block.shape[2]

    # -- reading ---------------------------------------------------------------------------------
    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All tokens in order, reconstructed: ``[B, H, T, D]`` (the reference path)."""
        segs = []
        if self.sinks is not None:
            segs.append(self.sinks.to(dtype))
        if self.body:
            segs.append(self._deq.to(dtype))
        if self.residual is not None and self.residual.shape[2]:
            segs.append(self.residual.to(dtype))
        if not segs:
            raise ValueError("the stream is empty")
        return torch.cat(segs, dim=2)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the stream holds (per-sequence and shared), by name."""
        out = {f"body.{k}": v for k, v in self.body.items()}
        if self.sinks is not None:
            out["sinks"] = self.sinks
        if self.residual is not None:
            out["residual"] = self.residual
        if self.codec is not None and self.body:
            out.update({f"shared.{k}": v for k, v in self.codec.shared().items()})
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    # -- helpers ---------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"a K/V block must be a torch.Tensor [batch, kv_heads, tokens, head_dim], got {type(x).__name__}"
            )
        if x.dim() != 4:
            raise ValueError(f"expected [batch, kv_heads, tokens, head_dim], got shape {tuple(x.shape)}")
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"head_dim mismatch: stream has {self.head_dim}, block has {x.shape[-1]}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"K/V must be floating point, got {x.dtype}")
        ref = self.residual if self.residual is not None else self.sinks
        if ref is not None and (ref.shape[0], ref.shape[1]) != (x.shape[0], x.shape[1]):
            raise ValueError(
                f"batch/heads mismatch: cache holds {tuple(ref.shape[:2])}, block has {tuple(x.shape[:2])}"
            )
        check_kv_range(x)

    @staticmethod
    def _len(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.shape[2]

    @staticmethod
    def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
        return b.contiguous() if a is None else torch.cat([a, b], dim=2)


def check_block(x, name: str, head_dim: int, layout: str = "[batch, kv_heads, tokens, head_dim]") -> None:
    """A K/V (or query) block must be a floating-point tensor of 4 dims (`layout`) ending in `head_dim`."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if x.shape[-1] != head_dim:
        raise ValueError(f"head_dim mismatch: the layer has {head_dim}, {name} has {x.shape[-1]}")


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


#: the class holding each stream of a layer, by `KVFormat.layer`; "tiered" layers hold both in one
#: `TieredLayer`, and XQuant / MiniCache layers are model-wide (`hf_cache.KVQCache`).
STREAMS = {"streaming": QuantizedStream, "staircase": StaircaseStream}


class StreamingLayer:
    """One layer's quantized K and V (a `KVFormat`), appended token blocks at a time.

    >>> layer = StreamingLayer.for_method("kivi", bits=2, head_dim=64)
    >>> layer.append(k, v)            # k, v: [B, H_kv, T, D]
    >>> k_hat, v_hat = layer.keys(), layer.values()

    Keys are stored as given: for pre-RoPE formats (`fmt.pre_rope_keys`, KVQuant) pass pre-RoPE keys
    and apply RoPE to `keys()` (kvq_core's transformers cache does this).
    """

    def __init__(self, fmt: KVFormat, head_dim: int):
        if not isinstance(fmt, KVFormat):
            raise ValueError(f"fmt must be a KVFormat (e.g. get_format('kivi', 2)), got {type(fmt).__name__}")
        check_count("head_dim", head_dim, 1)
        if fmt.layer not in (*STREAMS, "tiered"):
            raise ValueError(
                f"{fmt.name}: a StreamingLayer holds one layer's K and V; this format caches the layer input or "
                "merges layers across the model: use KVQCache (kvq_core.hf_cache), which routes it"
            )
        self.fmt = fmt
        self.head_dim = head_dim
        self.tiers = None
        if fmt.layer == "tiered":
            self.tiers = TieredLayer(fmt, head_dim)
            self.k, self.v = self.tiers.k, self.tiers.v
            return
        self.k = STREAMS[fmt.layer](fmt.key, head_dim, fmt.sink_tokens)
        self.v = STREAMS[fmt.layer](fmt.value, head_dim, fmt.sink_tokens)

    @classmethod
    def for_method(cls, method: str, bits=None, head_dim: int = 128) -> StreamingLayer:
        return cls(get_format(method, bits), head_dim)

    def calibrate(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_weights: torch.Tensor | None = None,
        v_weights: torch.Tensor | None = None,
    ) -> None:
        """Fit per-layer state (codebooks, channel order, clip, ranges) on calibration K/V ``[B, H, T, D]``.

        `k_weights`, `v_weights`: optional Fisher weights broadcastable to K and V (KVQuant's codebooks).
        """
        for name, x, w in (("calibration K", k, k_weights), ("calibration V", v, v_weights)):
            check_block(x, name, self.head_dim)
            if x.shape[2] < 1:
                raise ValueError(f"{name} holds no tokens")
            check_kv_range(x, name)
            if w is not None:
                if not isinstance(w, torch.Tensor) or not _broadcasts_to(w.shape, x.shape):
                    raise ValueError(f"{name} weights must be a tensor broadcastable to {tuple(x.shape)}")
                check_finite(w, f"{name} weights")
        if self.tiers is not None:
            return self.tiers.calibrate(k, v, k_weights, v_weights)
        if self.k.codec is not None:
            self.k.codec.calibrate(k, k_weights)
        if self.v.codec is not None:
            self.v.codec.calibrate(v, v_weights)

    def append(self, k: torch.Tensor, v: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Append ``k, v: [B, H_kv, t, D]``; `queries` ``[B, H_q, t, D]`` (post-RoPE) feed tiered formats'
        attention scores and are ignored by every other format."""
        check_block(k, "K", self.head_dim)
        check_block(v, "V", self.head_dim)
        if queries is not None:
            check_block(queries, "queries", self.head_dim, "[batch, q_heads, tokens, head_dim]")
            if queries.shape[0] != k.shape[0] or queries.shape[2] != k.shape[2]:
                raise ValueError(
                    f"queries {tuple(queries.shape)} must have K's batch and tokens, K is {tuple(k.shape)}"
                )
        if k.shape != v.shape:
            raise ValueError(f"K and V blocks must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        check_kv_range(k, "K")  # both checked before either stream changes
        check_kv_range(v, "V")
        if self.tiers is not None:
            return self.tiers.append(k, v, queries)
        self.k.append(k)
        self.v.append(v)

    def keys(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        _check_dtype(dtype)
        return self.tiers.keys(dtype) if self.tiers is not None else self.k.dequantized(dtype)

    def values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        _check_dtype(dtype)
        return self.tiers.values(dtype) if self.tiers is not None else self.v.dequantized(dtype)

    @property
    def tokens(self) -> int:
        return self.tiers.tokens if self.tiers is not None else self.k.tokens

    @property
    def stored_tokens(self) -> int:
        """Tokens per head held (and attended to): `tokens` unless the format evicts."""
        return self.fmt.stored_tokens(self.tokens)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.tiers is not None:
            return self.tiers.tensors()
        return {
            **{f"k.{n}": t for n, t in self.k.tensors().items()},
            **{f"v.{n}": t for n, t in self.v.tensors().items()},
        }

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held; equals ``batch * fmt.breakdown(...).per_sequence + shared``."""
        if self.tiers is not None:
            return self.tiers.nbytes
        return self.k.nbytes + self.v.nbytes
