"""Token tiers by attention score: ZipCache, MiKV and heavy-hitter eviction as one streaming layer.

A `TieredLayer` holds one layer's K and V as chronological fp16 sinks, a body split per KV head into a
high tier (`tiers.bits`, fp16 at 16) and a low tier (`bits`; 0 = evicted), and an fp16 sliding window
of recent tokens. Which body tokens are high-tier is decided from attention scores:

- "accumulated" (H2O, arXiv:2306.14048; MiKV, arXiv:2402.18096; the fixed-budget eviction of
  Scissorhands, arXiv:2305.17118): every step adds each token's attention probability (summed over
  the query heads of its KV head and the step's queries) to its score. When tokens leave the window,
  the high tier keeps the top `salient_count(T_body)` of (high tier + leaving tokens) by score; the
  others drop to the low tier, encoded once from their fp16 values (MiKV), or are evicted (bits 0).
  The high tier is fp16, so re-selecting it never re-quantizes anything.
- "normalized" (ZipCache, arXiv:2405.14256): a token's saliency is its accumulated attention divided
  by the number of queries that saw it (the lower-triangular normalisation). Each token's tier is
  chosen once, when it leaves the window: the leaving tokens with the highest saliency fill the high
  tier up to ``ceil(f * T_body)``, the rest go to the low tier. Codes are per token per head after
  dividing each channel by ``sqrt(max |x|)`` of the first block (channel-separable token-wise).

Scores come from the queries: `append(k, v, queries)` takes the step's post-RoPE queries
``[B, H_q, t, D]`` (GQA: H_q = g * H_kv, query head i belongs to KV head i // g) and computes the
causal softmax over the held keys and the new ones in fp32 (the reference). Without queries (unit
tests, K/V-only callers) scores do not change, so ties keep the earliest tokens. The kept fp32 scores
(window, and the fp16 heavy hitters for "accumulated") are counted in the format's bytes.

The body is held in tier order, not chronological order (attention over a set of post-RoPE keys does
not depend on their order); `stored_tokens` says how many tokens a head still holds.
"""

from __future__ import annotations

import warnings

import torch

from .codecs_affine import AffineCodec
from .formats import KVFormat, StreamFormat
from .quant import check_kv_range

__all__ = ["TieredLayer", "TokenTier"]

_FP = torch.float16


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-(batch, head) selection along tokens: t ``[B, H, n, ...]``, idx ``[B, H, m]`` -> ``[B, H, m, ...]``."""
    view = idx.reshape(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])
    return torch.gather(t, 2, view)


class TokenTier:
    """One tier of one stream: fp16 rows (16 bits) or per-token codes; append-only or re-gathered (fp16)."""

    def __init__(self, fmt: StreamFormat, bits: float, head_dim: int):
        self.bits = bits
        self.codec = None
        if bits not in (0, 16):
            sf = StreamFormat(
                bits=bits, axis="token", group_size=fmt.group_size, symmetric=fmt.symmetric, scale_dtype=fmt.scale_dtype
            )
            self.codec = AffineCodec(sf, head_dim)
        self.parts: dict[str, torch.Tensor] = {}
        self.deq: torch.Tensor | None = None  # fp32 [B, H, n, D], what attention sees

    def __len__(self) -> int:
        return 0 if self.deq is None else self.deq.shape[2]

    def encode(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.bits == 16:
            rows = x.to(_FP)
            return {"rows": rows}, rows.float()
        parts = self.codec.encode(x)
        return parts, self.codec.decode(parts, x.shape[2])

    def append(self, x: torch.Tensor) -> None:
        if self.bits == 0 or x.shape[2] == 0:
            return
        parts, deq = self.encode(x)
        self.parts = {n: t if n not in self.parts else torch.cat([self.parts[n], t], 2) for n, t in parts.items()}
        self.deq = deq if self.deq is None else torch.cat([self.deq, deq], 2)

    def replace(self, parts: dict[str, torch.Tensor], deq: torch.Tensor) -> None:
        self.parts, self.deq = parts, deq

    def take_oldest(self, n: int) -> torch.Tensor:
        """Remove the first n tokens (every part is [B, H, tokens, ...]); returns their fp32 reconstruction."""
        out = self.deq[:, :, :n]
        self.parts = {name: t[:, :, n:].contiguous() for name, t in self.parts.items()}
        self.deq = self.deq[:, :, n:].contiguous()
        return out


class _TieredStream:
    """The K or V side of a `TieredLayer`: sinks, high tier, low tier, window (fp16), channel normaliser."""

    codec = None  # no per-layer codec state to calibrate or save (the normaliser comes from the first block)

    def __init__(self, fmt: StreamFormat, head_dim: int):
        self.fmt = fmt
        self.hi = TokenTier(fmt, fmt.tiers.bits, head_dim)
        self.lo = TokenTier(fmt, fmt.bits, head_dim)
        self.sinks: torch.Tensor | None = None
        self.window: torch.Tensor | None = None  # fp16 [B, H, w, D]
        self.norm: torch.Tensor | None = None  # fp16 [H, D]: ZipCache channel normaliser sqrt(max |x|)

    def fit_norm(self, x: torch.Tensor) -> None:
        if self.fmt.tiers.channel_normalize and self.norm is None:
            amax = x.float().abs().amax(dim=(0, 2))  # [H, D]
            self.norm = amax.sqrt().clamp_min(1e-3).to(_FP)

    def _scaled(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if self.norm is None:
            return x.float()
        n = self.norm.float()[None, :, None, :]
        return x.float() * n if inverse else x.float() / n

    def to_tier(self, tier: TokenTier, x: torch.Tensor) -> None:
        tier.append(self._scaled(x) if tier.codec is not None else x)

    def view(self, dtype: torch.dtype) -> torch.Tensor:
        segs = [self.sinks.float()] if self.sinks is not None else []
        for tier in (self.hi, self.lo):
            if len(tier):
                segs.append(self._scaled(tier.deq, inverse=True) if tier.codec is not None else tier.deq)
        if self.window is not None and self.window.shape[2]:
            segs.append(self.window.float())
        return torch.cat(segs, 2).to(dtype)

    def tensors(self, with_shared: bool) -> dict[str, torch.Tensor]:
        out = {f"hi.{n}": t for n, t in self.hi.parts.items()}
        out.update({f"lo.{n}": t for n, t in self.lo.parts.items()})
        if self.sinks is not None:
            out["sinks"] = self.sinks
        if self.window is not None:
            out["residual"] = self.window
        if with_shared and self.norm is not None:
            out["shared.channel_norm"] = self.norm
        return out


class TieredLayer:
    """One layer's K/V in token tiers chosen by attention score (see the module docstring).

    >>> layer = TieredLayer(get_format("h2o", 0), head_dim=64)
    >>> layer.append(k, v, queries=q)   # k, v: [B, H_kv, t, D]; q: [B, H_q, t, D] post-RoPE
    """

    SCORE_CHUNK = 256  # queries scored at once: bounds the prefill's score matrix to 256 x T' per head

    def __init__(self, fmt: KVFormat, head_dim: int):
        if not fmt.key.tiered:
            raise ValueError(f"{fmt.name} has no token tiers")
        self.fmt = fmt
        self.head_dim = head_dim
        self.k = _TieredStream(fmt.key, head_dim)
        self.v = _TieredStream(fmt.value, head_dim)
        self.tokens = 0
        self.body_tokens = 0
        self.hi_scores: torch.Tensor | None = None  # fp32 [B, H, n_hi] ("accumulated" only)
        self.win_scores: torch.Tensor | None = None  # fp32 [B, H, w]
        self._warned = False

    # -- appending -------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        if k.shape != v.shape or k.dim() != 4 or k.shape[-1] != self.head_dim:
            raise ValueError(
                f"K and V blocks must both be [B, H, t, {self.head_dim}], got {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if queries is not None and (
            queries.dim() != 4 or queries.shape[1] % k.shape[1] or queries.shape[0] != k.shape[0]
        ):  # checked before any state changes
            raise ValueError(
                f"queries [B, H_q, t, D] need K's batch and H_q a multiple of {k.shape[1]} KV heads, "
                f"got {tuple(queries.shape)}"
            )
        ref = self.k.window if self.k.window is not None else self.k.sinks
        if ref is not None and ref.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"batch/heads mismatch: cache holds {tuple(ref.shape[:2])}, block has {tuple(k.shape[:2])}"
            )
        check_kv_range(k, "K block")  # held in fp16 (sinks, window, high tier): within +-65504
        check_kv_range(v, "V block")
        if k.shape[2] == 0:
            return
        b, h, t, _ = k.shape
        self.k.fit_norm(k)
        self.v.fit_norm(v)
        s0 = 0 if self.k.sinks is None else self.k.sinks.shape[2]
        take = min(self.fmt.sink_tokens - s0, t)
        for side, x in ((self.k, k), (self.v, v)):
            if take > 0:
                side.sinks = (
                    x[:, :, :take].to(_FP) if side.sinks is None else torch.cat([side.sinks, x[:, :, :take].to(_FP)], 2)
                )
            rest = x[:, :, max(take, 0) :].to(_FP)
            side.window = rest if side.window is None else torch.cat([side.window, rest], 2)
        n_new = t - max(take, 0)
        zeros = torch.zeros(b, h, n_new)
        self.win_scores = zeros if self.win_scores is None else torch.cat([self.win_scores, zeros], 2)
        self.tokens += t
        if queries is not None:
            self._score(queries)
        elif not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.fmt.name}: K/V appended without queries, so attention scores do not change and token "
                "selection falls back to keeping the earliest tokens; pass queries=[B, H_q, t, D]",
                stacklevel=3,
            )
        self._flush()

    def _score(self, q: torch.Tensor) -> None:
        """Add this step's causal attention probabilities to the scores (fp32 reference softmax)."""
        keys = self.k.view(torch.float32)  # [B, H, T', D]; the new tokens are its last q.shape[2]
        b, hq, n, d = q.shape
        h, tk = keys.shape[1], keys.shape[2]
        if hq % h or q.shape[0] != b:
            raise ValueError(f"queries [B, H_q, t, D] need H_q a multiple of {h} KV heads, got {tuple(q.shape)}")
        qg = q.float().reshape(b, h, hq // h, n, d)
        kt = keys[:, :, None].transpose(-1, -2)  # [B, H, 1, D, T']
        gained = torch.zeros(b, h, tk)
        for s in range(0, n, self.SCORE_CHUNK):  # a prefill's queries in chunks: [.., chunk, T'] at a time
            e = min(n, s + self.SCORE_CHUNK)
            logits = qg[:, :, :, s:e] @ kt * d**-0.5  # [B, H, g, chunk, T']
            i = torch.arange(s, e)[:, None] + (tk - n)  # position of each query among the keys
            logits = logits.masked_fill(torch.arange(tk)[None, :] > i, float("-inf"))
            gained += logits.softmax(-1).sum(dim=(2, 3))  # [B, H, T']
        sinks = 0 if self.k.sinks is None else self.k.sinks.shape[2]
        n_hi = len(self.k.hi)
        if self.hi_scores is not None and n_hi:
            self.hi_scores = self.hi_scores + gained[:, :, sinks : sinks + n_hi]
        w = self.win_scores.shape[2]
        self.win_scores = self.win_scores + gained[:, :, tk - w :]

    def _flush(self) -> None:
        f = self.fmt.key
        w = self.k.window.shape[2]
        out = max(0, w - f.residual_tokens)
        if out == 0:
            return
        leaving_k, leaving_v = self.k.window[:, :, :out], self.v.window[:, :, :out]
        score = self.win_scores[:, :, :out]
        for side in (self.k, self.v):
            side.window = side.window[:, :, out:].contiguous()
        self.win_scores = self.win_scores[:, :, out:].contiguous()
        before, self.body_tokens = self.body_tokens, self.body_tokens + out
        n_hi = f.salient_count(self.body_tokens)
        if f.tiers.importance == "normalized":
            # queries that saw the j-th leaving token: every token from it to the newest (causal)
            seen = w - torch.arange(out)
            score = score / seen.clamp_min(1)
            self._split(leaving_k, leaving_v, score, n_hi - f.salient_count(before), keep_old=True)
        else:
            cand_k = torch.cat([self.k.hi.deq, leaving_k.float()], 2) if len(self.k.hi) else leaving_k.float()
            cand_v = torch.cat([self.v.hi.deq, leaving_v.float()], 2) if len(self.v.hi) else leaving_v.float()
            cand_s = torch.cat([self.hi_scores, score], 2) if self.hi_scores is not None else score
            self._split(cand_k, cand_v, cand_s, n_hi, keep_old=False)

    def _split(self, xk, xv, score, n_keep: int, keep_old: bool) -> None:
        """Top `n_keep` per head by score go to the high tier (appended, or replacing it); the rest to the low tier."""
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices
        keep = order[..., :n_keep].sort(-1).values
        drop = order[..., n_keep:].sort(-1).values
        for side, x in ((self.k, xk), (self.v, xv)):
            hi_x = _gather(x, keep)
            if keep_old:
                side.to_tier(side.hi, hi_x)
            else:  # fp16 heavy hitters: re-gathering fp16 rows re-quantizes nothing
                rows = hi_x.to(_FP)
                side.hi.replace({"rows": rows}, rows.float())
            side.to_tier(side.lo, _gather(x, drop))
        if not keep_old:
            self.hi_scores = _gather(score, keep).contiguous()

    # -- reading ---------------------------------------------------------------------------------
    def keys(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.k.view(dtype)

    def values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.v.view(dtype)

    @property
    def stored_tokens(self) -> int:
        return self.fmt.stored_tokens(self.tokens)

    def calibrate(self, k, v, k_weights=None, v_weights=None) -> None:
        """Fit the channel normalisers (ZipCache) on calibration K/V ``[B, H, T, D]``; nothing else is calibrated."""
        check_kv_range(k, "calibration K")
        check_kv_range(v, "calibration V")
        self.k.fit_norm(k)
        self.v.fit_norm(v)

    def tensors(self) -> dict[str, torch.Tensor]:
        shared = self.body_tokens > 0
        out = {f"k.{n}": t for n, t in self.k.tensors(shared).items()}
        out.update({f"v.{n}": t for n, t in self.v.tensors(shared).items()})
        for name, s in (("hi", self.hi_scores), ("window", self.win_scores)):
            if s is not None and s.numel():
                out[f"scores.{name}"] = s
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())
