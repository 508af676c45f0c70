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

Which pairs (`calibrate_pairs`, what `kvq-eval` runs for `minicache`). The paper's premise is that
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

from .formats import KVFormat, get_format, minicache_format
from .hf_cache import KVQCache, KVQLayer
from .quant import FP16_MAX, check_kv_range

__all__ = ["MergedPair", "MiniCacheLayer", "calibrate_pairs", "minicache_layers", "slerp_merge"]

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


# -- calibration: which pairs to merge ---------------------------------------------------------------
def _chunked_nll(model, ids: torch.Tensor, fmt: KVFormat, prefill: int, chunk: int) -> float:
    """Mean NLL of ids[prefill:] when ids [1, T] is prefilled to `prefill` then fed `chunk` tokens at a
    time through a fresh cache of `fmt` (each chunk attends over the cache's restored history)."""
    cache = KVQCache(fmt=fmt, model=model, kernels=False)
    nll, n, pos, t = 0.0, 0, 0, ids.shape[1]
    with torch.no_grad():
        while pos < t - 1:
            end = prefill if pos == 0 else min(pos + chunk, t - 1)
            logits = model(ids[:, pos:end], past_key_values=cache, use_cache=True).logits[0].double()
            if pos > 0:
                lp = torch.log_softmax(logits, -1).gather(-1, ids[0, pos + 1 : end + 1, None])
                nll, n = nll - lp.sum().item(), n + lp.numel()
            pos = end
    return nll / n


def calibrate_pairs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    fmt: KVFormat | None = None,
    *,
    tolerance: float = 0.05,
    prefill: int | None = None,
    chunk: int = 16,
) -> KVFormat:
    """The MiniCache format that merges only the layer pairs the calibration text says it can afford.

    Candidates: every adjacent pair (l, l + 1) inside the paper's merged region (layers from
    L - floor(merge_depth_fraction * L), `KVFormat.merge_pairs`), at the format's retention and t.
    Each is measured alone: the increase of the mean NLL of `input_ids` [1, T] (calibration text,
    disjoint from any evaluation text) over the fp16 cache, prefilling `prefill` tokens (default T/2)
    and feeding the rest `chunk` tokens at a time, so the scored tokens attend over the merged history.
    Greedy: candidates in increasing cost are added when disjoint from those chosen and the measured
    increase of all chosen together stays within log(1 + tolerance), i.e. calibration perplexity at
    most `tolerance` (5%) above fp16's. The result is `minicache_format(..., pairs=chosen)` (possibly
    no pair), with ``extra["calibration"]``: the tolerance, each candidate's and the chosen set's NLL
    increase, and the calibration tokens.
    """
    fmt = fmt or get_format("minicache", 16)
    if not fmt.merge_depth_fraction:
        raise ValueError(f"{fmt.name} merges no layers")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"calibration needs input_ids [1, tokens], got shape {tuple(input_ids.shape)}")
    t = input_ids.shape[1]
    prefill = t // 2 if prefill is None else prefill
    if not 1 <= prefill < t - 1 or chunk < 1 or tolerance < 0:
        raise ValueError(
            f"need 1 <= prefill < tokens - 1, chunk >= 1, tolerance >= 0; got {prefill}, {chunk}, {tolerance}"
        )
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    start = n_layers - math.floor(fmt.merge_depth_fraction * n_layers)
    candidates = [(i, i + 1) for i in range(start, n_layers - 1)]
    f, r, st = fmt.merge_depth_fraction, fmt.retain_fraction, fmt.extra.get("slerp_t", 0.6)

    def cost(pairs) -> float:
        return _chunked_nll(model, input_ids, minicache_format(f, r, st, pairs=pairs), prefill, chunk) - base

    base = _chunked_nll(model, input_ids, get_format("fp16"), prefill, chunk)
    alone = {p: cost((p,)) for p in candidates}
    budget = math.log1p(tolerance)
    chosen: list[tuple[int, int]] = []
    total = 0.0
    for p in sorted(candidates, key=alone.__getitem__):
        if alone[p] > budget:
            break
        if any(set(p) & set(q) for q in chosen):
            continue
        trial = cost((*chosen, p))
        if trial <= budget:
            chosen, total = [*chosen, p], trial
    out = minicache_format(f, r, st, pairs=tuple(chosen))
    info = {
        "tolerance": tolerance,
        "tokens": t,
        "prefill": prefill,
        "chunk": chunk,
        "nll_increase": total,
        "pair_nll_increase": alone,
    }
    return out.with_(extra={**out.extra, "calibration": info})
