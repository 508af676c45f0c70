"""Low-rank codecs: GEAR's error factors and CSKV's channel shrinking.

GEAR (arXiv:2403.05527): quantized part + low-rank error + sparse outliers, compressed per chunk of C tokens.

For each flushed chunk of C = `residual_tokens` tokens (GEAR buffers new tokens and compresses every
n_b = 64; the prefill is compressed in the same C-token chunks, so the byte count depends only on the
token count):

1. sparse outliers: per token, the k = ceil(s * H * D) entries furthest from the token's median
   (s = 2%), kept fp16 with int16 flat indices and int32 CSR row pointers;
2. the rest is quantized KIVI-style (keys per channel over groups of G tokens, values per token over
   groups of G channels; fp16 scale and zero);
3. the quantization error of each head's ``[C, D]`` chunk is approximated at rank r by power iteration
   (GEAR's Algorithm: B random, then A = orth(E B), B = E^T A, a few rounds), and A ``[C, r]`` and
   B ``[D, r]`` are stored fp16.

Decode: dequantize + A B^T, then the outliers are written back exactly (fp16).

CSKV (arXiv:2409.10593): each token's H*D vector is stored as r fp16 coordinates in a per-layer
orthonormal basis U ``[H*D, r]`` (fp16), the top right-singular vectors of calibration K (or V); decode is
z U^T. CSKV obtains the basis from an SVD of the projection weights and then fine-tunes it briefly
(its "training-efficient" step); kvq uses the training-free activation SVD, which is the optimal rank-r
subspace for the calibration activations. Recent tokens stay fp16 in the format's window.
"""

from __future__ import annotations

import torch

from . import quant
from .codec_base import Codec, _check_block, _flat, _topk_mask, _unflat, sparse_outliers
from .formats import StreamFormat
from .packing import pack, unpack

__all__ = ["CskvCodec", "GearCodec", "power_iteration_lowrank"]

POWER_ITERS = 3  # GEAR reports a few power-iteration rounds suffice; error changes <1% beyond 3 here


def power_iteration_lowrank(e: torch.Tensor, rank: int, iters: int = POWER_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of ``e: [..., n, d]`` by power (subspace) iteration: ``e ~= a @ b.T``, a orthonormal.

    Returns a ``[..., n, r]`` and b ``[..., d, r]`` (fp32). Deterministic (fixed seed). With a leading batch
    dimension (``e: [B, ..., n, d]``) every row starts from the same random draw, the one it gets at batch 1, so a
    row's factors do not depend on its place in the batch.
    """
    g = torch.Generator().manual_seed(0)
    lead = e.shape[1:-2] if e.dim() > 2 else ()
    b = torch.randn(*lead, e.shape[-1], rank, generator=g, dtype=e.dtype)
    b = b.expand(*e.shape[:-2], e.shape[-1], rank) if e.dim() > 2 else b
    a = e.new_zeros(*e.shape[:-1], rank)
    for _ in range(iters):
        a = torch.linalg.qr(e @ b).Q  # [..., n, r]
        b = e.transpose(-1, -2) @ a  # [..., d, r]
    return a, b


class GearCodec(Codec):
    """Affine codes (KIVI-style) + rank-r fp16 error factors per chunk and head + fp16 sparse outliers."""

    def __init__(self, fmt: StreamFormat, head_dim: int):
        super().__init__(fmt, head_dim)
        self.chunk = fmt.residual_tokens
        self.rank = fmt.lowrank.rank

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_block(x)
        f = self.fmt
        x = x.float()
        b, h, t, d = x.shape
        if t % self.chunk:
            raise ValueError(f"GEAR compresses whole chunks of {self.chunk} tokens, got a block of {t}")
        k = f.outliers_per_token(h, d)
        rows = _flat(x)[:, 0]  # [B, t, H*D]
        med = rows.median(-1, keepdim=True).values
        mask = _topk_mask((rows - med).abs(), k)
        dense = _unflat(torch.where(mask, med.expand_as(rows), rows)[:, None], h)  # outliers do not set ranges
        scale, zero = quant.choose_qparams(dense, f.bits, f.axis, f.group_size, f.symmetric, f.scale_dtype)
        codes = quant.quantize(dense, scale, zero, f.bits, f.axis, f.group_size)
        deq = quant.dequantize(codes, scale, zero, f.bits, f.axis, f.group_size)
        err = (dense - deq).reshape(b, h, t // self.chunk, self.chunk, d)
        a, bf = power_iteration_lowrank(err, self.rank)  # [B, H, n, C, r], [B, H, n, D, r]
        parts = {
            "codes": pack(codes, f.bits),
            "scale": scale,
            "lowrank_a": a.reshape(b, h, t, self.rank).to(torch.float16),
            "lowrank_b": bf.reshape(b, h, t // self.chunk, d * self.rank).to(torch.float16),
        }
        if zero is not None:
            parts["zero"] = zero
        parts.update(sparse_outliers(rows, mask, k))
        return parts

    def decode(self, parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        f = self.fmt
        codes = unpack(parts["codes"], f.bits, self._d)
        b, h, t, d = codes.shape
        y = quant.dequantize(codes, parts["scale"], parts.get("zero"), f.bits, f.axis, f.group_size)
        a = parts["lowrank_a"].float().reshape(b, h, t // self.chunk, self.chunk, self.rank)
        bf = parts["lowrank_b"].float().reshape(b, h, t // self.chunk, d, self.rank)
        y = y + (a @ bf.transpose(-1, -2)).reshape(b, h, t, d)
        if "outlier_values" in parts:
            rows = _flat(y)[:, 0].clone()
            rows.scatter_(-1, parts["outlier_indices"].long(), parts["outlier_values"].float())
            y = _unflat(rows[:, None], h)
        return y


class CskvCodec(Codec):
    """Per-token fp16 latents ``[B, 1, t, r]`` in a per-layer SVD basis ``[H*D, r]`` (fp16, shared).

    A latent coordinate beyond fp16's +-65504 (possible for inputs near that limit) saturates there.
    """

    _MAX_ROWS = 1 << 15  # SVD sample: 32,768 calibration tokens

    def __init__(self, fmt: StreamFormat, head_dim: int):
        super().__init__(fmt, head_dim)
        self._basis: torch.Tensor | None = None

    @property
    def calibrated(self) -> bool:
        return self._basis is not None

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Top-r right singular vectors of the calibration rows ``[N, H*D]`` (uncentred: K = X W has no bias)."""
        _check_block(x)
        h, d = x.shape[1], x.shape[3]
        rows = _flat(x.double())[:, 0].reshape(-1, h * d)[: self._MAX_ROWS]
        r = self.fmt.latent_dims(h, d)
        vh = torch.linalg.svd(rows, full_matrices=False).Vh  # [min(N, HD), HD]
        basis = vh[:r].T
        if basis.shape[1] < r:  # fewer calibration tokens than r: complete the basis with zeros
            basis = torch.nn.functional.pad(basis, (0, r - basis.shape[1]))
        self._basis = basis.to(torch.float16)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_block(x)
        if not self.calibrated:
            self.calibrate(x)  # uncalibrated: fit the basis on the first block (the prefill)
        # coordinates saturate at fp16's 65504: a unit basis vector can sum sqrt(H*D) inputs near the fp16
        # limit into one coordinate, which would otherwise be stored as inf
        z = _flat(x.float()) @ self._basis.float()
        return {"latent": z.clamp(-quant.FP16_MAX, quant.FP16_MAX).to(torch.float16)}

    def decode(self, parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        h = self._basis.shape[0] // self._d
        return _unflat(parts["latent"].float() @ self._basis.float().T, h)

    def shared(self) -> dict[str, torch.Tensor]:
        return {"basis": self._basis} if self._basis is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._basis = state["basis"]
