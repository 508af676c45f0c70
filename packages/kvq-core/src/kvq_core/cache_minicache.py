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

Keys are merged post-RoPE, as the cache receives them. Both layers of a pair hold the same positions,
so RoPE rotates both vectors of a token by the same orthogonal matrix: norms, the angle (hence the
angular distance and the retained set) and the SLERP direction are the same as pre-RoPE, rotated
(tested), so merging pre- or post-RoPE keys is equivalent.

Which pairs (`calibration.calibrate_pairs`, what `kvq-eval` runs for `minicache`). The paper's premise is that
adjacent middle-to-deep layers hold nearly parallel states (LLaMA-2/3, Mistral). SmolLM2-135M's do not:
on the 512 calibration tokens of pydoc_text('calibration') every adjacent pair, shallow or deep, has a
mean per-head cosine between -0.24 and +0.18 for K and -0.02 and +0.04 for V (angular distance ~0.5),
so a shared direction loses ~80% of the lower layer's energy and ~38% of the upper's. Merging the
whole deeper half (`minicache-0.5`, the paper's S = L/2) gives decode perplexity 47.9 (fp16: 11.74)
and incoherent generate() text. `calibrate_pairs` therefore measures, on calibration text only, what
each adjacent pair (l, l + 1) of that region costs (any alignment, not only the paper's (S, S + 1),
(S + 2, S + 3), ...; mean NLL increase over the fp16 cache, 256-token prefill + chunks of 16) and merges greedily, cheapest first, while all chosen pairs together cost at most
`tolerance` = 5% calibration perplexity (fixed before any evaluation run). Measured per-pair increases
at 10% retention: (24, 25) +4.6%, (25, 26) +5.4%, (26, 27) +7.2%, (28, 29) +7.8%, (18, 19) +8.6%,
(15, 16) +8.8%, the others +11% to +47%; so SmolLM2 gets one merged pair, (24, 25) (`minicache-L24`,
15.59 bits per element at 512 tokens instead of 16). On the evaluation text (one run each): decode
perplexity 13.30 (fp16 11.74; the chunked calibration measure underestimates one-token decode steps),
generate() text perplexity under the full model 1.87 (full cache 1.75), coherent prose. A model with
states as similar as the paper's can have every pair of the region chosen within the same tolerance.
"""

from __future__ import annotations

import math

import torch

from .formats import KVFormat, get_format
from .hf_layer import KVQLayer
from .quant import FP16_MAX, check_kv_range

__all__ = ["MergedPair", "MiniCacheLayer", "minicache_layers", "minicache_row", "slerp_merge"]

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
        if k_lo.shape != k_hi.shape or v_lo.shape != v_hi.shape:
            raise ValueError(
                f"pair {self.layers}: K/V shapes differ, {tuple(k_lo.shape)} vs {tuple(k_hi.shape)}, "
                f"{tuple(v_lo.shape)} vs {tuple(v_hi.shape)}"
            )
        for name, x in (("K", k_lo), ("V", v_lo), ("K", k_hi), ("V", v_hi)):
            check_kv_range(x, f"{name} of layers {self.layers}")
            # magnitudes are stored fp16: a token's norm beyond 65504 would be stored as inf
            peak = float(x.float().norm(dim=-1).amax()) if x.numel() else 0.0
            if peak > FP16_MAX:
                raise ValueError(
                    f"MiniCache stores token norms in fp16: a {name} vector of layers {self.layers} has norm "
                    f"{peak:g}, beyond {FP16_MAX:g}"
                )
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


def minicache_row(fmt: KVFormat, layers: list) -> list[KVQLayer]:
    """MiniCache layers for one row of a padded batch, as many as the batched `layers`."""
    return minicache_layers(fmt, len(layers))
