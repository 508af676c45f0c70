"""MiniCache (Liu et al., NeurIPS 2024, arXiv:2405.14366): merge adjacent deep layers' K/V across depth.

For a merged pair of layers (l, l+1) and each stream (K post-RoPE, V), every token's two vectors
x_l, x_{l+1} ``[D]`` per head are split into magnitudes ||x|| and unit directions u; the pair stores
one direction ``e = SLERP(u_l, u_{l+1}; t)`` (t = 0.6, the paper's weight of the upper layer) and both
magnitudes, and restores ``x_hat_j = ||x_j|| e``. Tokens whose directions differ most (angular
distance ``arccos(u_l . u_{l+1}) / pi``, averaged over heads and taken as the max over the batch, so
one index list serves the batch) are retained: both layers' vectors are kept in fp16 with their
int32 index and overwrite the merged ones on restore.

The paper retains tokens above ``d_min + gamma (d_max - d_min)``; kvq picks the ceil(f T) most
distant tokens of the prefill (f = `KVFormat.retain_fraction`, 10%) and retains every later token
at least as distant as the least distant of them, so the count stays near the stated fraction and is
data-dependent only in decode (`KVQCache.retained` reports it; `KVFormat.model_bytes(retained=...)`
counts it). Layers outside the merged pairs keep fp16 K/V.

Streaming: the lower layer runs first; its new tokens wait (fp16) until the upper layer's update of
the same forward merges them, so after every forward the pair holds only merged + retained tensors.
Both layers attend over the restored history plus their own new tokens in full precision (the
prefill attends in full precision, as every kvq method).
"""

from __future__ import annotations

import math

import torch

from .formats import KVFormat, get_format
from .hf_cache import KVQLayer

__all__ = ["MergedPair", "MiniCacheLayer", "minicache_layers", "slerp_merge"]

_FP = torch.float16


def slerp_merge(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``a, b: [..., D]`` into (unit direction [..., D], magnitudes [2, ...], angular distance [...]).

    Angular distance is arccos(cos) / pi in [0, 1]. Nearly parallel pairs (sin < 1e-6) fall back to
    linear interpolation, which SLERP tends to; the direction is renormalised either way.
    """
    a, b = a.float(), b.float()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    ua = a / na.clamp_min(1e-12)[..., None]
    ub = b / nb.clamp_min(1e-12)[..., None]
    omega = (ua * ub).sum(-1).clamp(-1.0, 1.0).acos()
    so = omega.sin()
    small = so < 1e-6
    safe = torch.where(small, torch.ones_like(so), so)
    wa = torch.where(small, torch.full_like(so, 1 - t), ((1 - t) * omega).sin() / safe)
    wb = torch.where(small, torch.full_like(so, t), (t * omega).sin() / safe)
    e = wa[..., None] * ua + wb[..., None] * ub
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return e, torch.stack([na, nb]), omega / math.pi


class _MergedStream:
    """One stream (K or V) of a merged pair: direction, magnitudes, retained tokens and their indices."""

    def __init__(self):
        self.direction: torch.Tensor | None = None  # [B, H, T, D] fp16
        self.magnitude: torch.Tensor | None = None  # [B, 2, H, T] fp16
        self.index: torch.Tensor | None = None  # [B, n] int32 (same row per sequence)
        self.kept: torch.Tensor | None = None  # [B, 2, H, n, D] fp16
        self.threshold: float | None = None

    def append(self, lo: torch.Tensor, hi: torch.Tensor, t: float, fraction: float, start: int) -> None:
        e, mag, dist = slerp_merge(lo, hi, t)  # e: [B, H, n, D]; mag: [2, B, H, n]; dist: [B, H, n]
        score = dist.mean(1).amax(0)  # [n]: mean over heads, max over the batch
        if self.threshold is None:  # the first block (the prefill) sets the threshold
            n = math.ceil(fraction * score.numel())
            if n >= score.numel():
                self.threshold = -math.inf  # retain everything (f = 1): merging changes nothing
            else:
                self.threshold = float(score.topk(n).values.min()) if n else math.inf
        idx = torch.nonzero(score >= self.threshold).flatten()
        b = lo.shape[0]
        kept = torch.stack([lo[:, :, idx], hi[:, :, idx]], 1).to(_FP)  # [B, 2, H, n, D]
        index = (idx + start).to(torch.int32)[None].expand(b, -1).contiguous()
        self.direction = _cat(self.direction, e.to(_FP), 2)
        self.magnitude = _cat(self.magnitude, mag.transpose(0, 1).to(_FP), 3)
        self.index = _cat(self.index, index, 1)
        self.kept = _cat(self.kept, kept, 3)

    def restore(self, side: int) -> torch.Tensor:
        """Layer `side` (0 lower, 1 upper) of the pair, ``[B, H, T, D]`` fp32."""
        x = self.direction.float() * self.magnitude[:, side, :, :, None].float()
        x[:, :, self.index[0].long()] = self.kept[:, side].float()
        return x

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.direction, self.magnitude, self.index, self.kept) if t is not None]


def _cat(a: torch.Tensor | None, b: torch.Tensor, dim: int) -> torch.Tensor:
    return b.contiguous() if a is None else torch.cat([a, b], dim)


class MergedPair:
    """The stored state of one merged layer pair (both streams) and the lower layer's waiting tokens."""

    def __init__(self, fmt: KVFormat, layers: tuple[int, int]):
        self.fmt = fmt
        self.layers = layers
        self.t = fmt.extra.get("slerp_t", 0.6)
        self.clear()

    def clear(self) -> None:
        self.k, self.v = _MergedStream(), _MergedStream()
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # lower layer's new K, V
        self.tokens = 0

    def merge(self, k_hi: torch.Tensor, v_hi: torch.Tensor) -> None:
        if self.pending is None:
            raise ValueError(f"layer {self.layers[1]} updated before layer {self.layers[0]} in this forward")
        (k_lo, v_lo), self.pending = self.pending, None
        if k_lo.shape != k_hi.shape:
            raise ValueError(f"pair {self.layers}: K shapes differ, {tuple(k_lo.shape)} vs {tuple(k_hi.shape)}")
        f = self.fmt.retain_fraction
        self.k.append(k_lo, k_hi, self.t, f, self.tokens)
        self.v.append(v_lo, v_hi, self.t, f, self.tokens)
        self.tokens += k_hi.shape[2]

    @property
    def retained(self) -> tuple[int, int]:
        return tuple(0 if s.index is None else s.index.shape[1] for s in (self.k, self.v))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for s in (self.k, self.v) for t in s.tensors())


class MiniCacheLayer(KVQLayer):
    """One layer of a merged pair; the lower layer (side 0) reports the pair's bytes, the upper 0."""

    def __init__(self, fmt: KVFormat, pair: MergedPair, side: int):
        super().__init__(fmt)
        self.pair = pair
        self.side = side
        self.layer = pair  # .tokens for get_seq_length / get_mask_sizes

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.dtype = key_states.dtype
        history = self.pair.tokens
        if self.side == 0:
            if self.pair.pending is not None:
                raise ValueError(f"layer {self.pair.layers[0]} updated twice before layer {self.pair.layers[1]}")
            self.pair.pending = (key_states, value_states)
        if history == 0:
            if self.side == 1:
                self.pair.merge(key_states, value_states)
            return key_states, value_states  # the prefill attends in full precision
        k = torch.cat([self.pair.k.restore(self.side).to(self.dtype), key_states], 2)
        v = torch.cat([self.pair.v.restore(self.side).to(self.dtype), value_states], 2)
        if self.side == 1:
            self.pair.merge(key_states, value_states)
        return k, v

    def get_seq_length(self) -> int:
        return self.pair.tokens

    def reset(self) -> None:
        self.pair.clear()

    @property
    def nbytes(self) -> int:
        return self.pair.nbytes if self.side == 0 else 0


def minicache_layers(fmt: KVFormat, num_layers: int) -> list[KVQLayer]:
    """fp16 `KVQLayer`s outside the merged pairs, `MiniCacheLayer`s inside them."""
    if not fmt.merge_depth_fraction:
        raise ValueError(f"{fmt.name} merges no layers")
    layers: list[KVQLayer] = [KVQLayer(get_format("fp16")) for _ in range(num_layers)]
    for lo, hi in fmt.merge_pairs(num_layers):
        pair = MergedPair(fmt, (lo, hi))
        layers[lo], layers[hi] = MiniCacheLayer(fmt, pair, 0), MiniCacheLayer(fmt, pair, 1)
    return layers
