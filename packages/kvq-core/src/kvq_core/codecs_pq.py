"""Product quantization of K/V (MILLION, arXiv:2504.03661): per-subspace k-means codebooks, one code per subspace.

Each head vector ``x: [D]`` is split into ``M = D / d_sub`` subspaces of ``d_sub`` channels; subspace m
is stored as the index of its nearest centroid in codebook ``C[m]: [2**c, d_sub]`` (c = bits * d_sub
code bits). MILLION's configurations: D=128, M=64 (d_sub=2) with 8-bit codes = 4 bits/element; M=32
(d_sub=4) = 2 bits/element. Codebooks are per layer and per stream (K, V), shared by all heads, fitted
offline by k-means on calibration activations (or on the prefill when not calibrated), stored fp16.

Attention against PQ keys needs no dequantization: with a per-step lookup table
``LUT[m, j] = q_m . C[m, j]`` the score of a token is ``sum_m LUT[m, code_m]`` (`pq_scores`), which is
MILLION's decode path; the tests check it equals ``q . k_hat``.
"""

from __future__ import annotations

import torch

from .codec_base import Codec, _check_block
from .formats import StreamFormat
from .packing import pack, unpack

__all__ = ["PQCodec", "kmeans", "pq_scores"]

_MAX_TRAIN = 1 << 16  # k-means sample per subspace: 65,536 vectors fit 256 centroids well, in seconds on CPU


def kmeans(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 8, seed: int = 0) -> torch.Tensor:
    """Batched (weighted) k-means: ``x: [M, N, d]`` -> centroids ``[M, k, d]`` (fp32).

    Initialised at k distinct random samples (with replacement when N < k); an empty cluster keeps
    its previous centroid. `weights` ``[M, N]`` weight each sample's pull on its centroid.
    """
    m, n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    init = torch.randperm(n, generator=g)[:k] if n >= k else torch.randint(0, n, (k,), generator=g)
    c = x[:, init].clone()
    w = torch.ones(m, n, dtype=x.dtype) if weights is None else weights.to(x.dtype).clamp_min(0) + 1e-12
    for _ in range(iters):
        assign = _nearest(x, c)  # [M, N]
        num = torch.zeros(m, k, d, dtype=x.dtype).scatter_add_(1, assign[..., None].expand(m, n, d), x * w[..., None])
        den = torch.zeros(m, k, dtype=x.dtype).scatter_add_(1, assign, w)
        c = torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], c)
    return c


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid: x ``[M, N, d]``, c ``[M, K, d]`` -> ``[M, N]`` (|x|^2 is constant per row)."""
    return (c.pow(2).sum(-1)[:, None, :] - 2 * x @ c.transpose(-1, -2)).argmin(-1)


class PQCodec(Codec):
    """MILLION product quantization: codes uint8 ``[B, H, t, packed(M codes)]``, shared codebook fp16 ``[M, 2**c, d_sub]``."""

    def __init__(self, fmt: StreamFormat, head_dim: int):
        super().__init__(fmt, head_dim)
        self.m = fmt.pq_subspaces(head_dim)
        self.sub = fmt.pq.subspace_dims
        self._codebook: torch.Tensor | None = None

    @property
    def calibrated(self) -> bool:
        return self._codebook is not None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # [B, H, t, D] -> [M, B*H*t, d_sub]
        return x.float().reshape(-1, self.m, self.sub).transpose(0, 1)

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """k-means codebooks per subspace over all heads' vectors (Fisher `weights` summed per subvector)."""
        _check_block(x)
        v = self._split(x)
        w = None if weights is None else self._split(weights.expand_as(x)).sum(-1)
        if v.shape[1] > _MAX_TRAIN:
            keep = torch.randperm(v.shape[1], generator=torch.Generator().manual_seed(0))[:_MAX_TRAIN]
            v, w = v[:, keep], (None if w is None else w[:, keep])
        self._codebook = kmeans(v, 2**self.fmt.pq_code_bits, w).to(torch.float16)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_block(x)
        if not self.calibrated:
            self.calibrate(x)  # uncalibrated: fit the codebooks on the first block (the prefill)
        b, h, t, _ = x.shape
        codes = _nearest(self._split(x), self._codebook.float())  # [M, B*H*t]
        codes = codes.transpose(0, 1).reshape(b, h, t, self.m).to(torch.uint8)
        return {"codes": pack(codes, self.fmt.pq_code_bits)}

    def decode(self, parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        codes = unpack(parts["codes"], self.fmt.pq_code_bits, self.m).long()  # [B, H, t, M]
        cb = self._codebook.float()  # [M, K, d_sub]
        y = cb[torch.arange(self.m), codes]  # [B, H, t, M, d_sub]
        return y.reshape(*codes.shape[:3], self._d)

    def shared(self) -> dict[str, torch.Tensor]:
        return {"codebook": self._codebook} if self._codebook is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._codebook = state["codebook"]


def pq_scores(q: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Attention logits ``q . k_hat`` from PQ codes through a lookup table, without decoding keys.

    q:        ``[B, H_kv, n_q, D]`` queries (GQA: the query heads of one KV head stacked along n_q).
    codes:    ``[B, H_kv, T, M]`` unpacked integer codes.
    codebook: ``[M, K, d_sub]``.
    Returns   ``[B, H_kv, n_q, T]`` fp32: LUT ``[B, H, n_q, M, K] = q_m . C[m]``, then
    ``sum_m LUT[..., m, code_m]`` (M gathers per token instead of D multiply-adds).
    """
    b, h, n, d = q.shape
    m, k, sub = codebook.shape
    lut = torch.einsum("bhnms,mks->bhnmk", q.float().reshape(b, h, n, m, sub), codebook.float())
    t = codes.shape[2]
    idx = codes.long().transpose(-1, -2)[:, :, None].expand(b, h, n, m, t)  # [B, H, n, M, T]
    return torch.gather(lut, -1, idx).sum(-2)  # LUT[..., m, code_m(t)], summed over M: [B, H, n, T]
