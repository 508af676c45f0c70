"""Non-uniform codebook codes with dense-and-sparse outliers (`NuqCodec`, KVQuant, arXiv:2401.18079)."""

from __future__ import annotations

import torch

from . import quant
from .codec_base import (
    Codec,
    _check_block,
    _flat,
    _topk_mask,
    _unflat,
    scatter_outliers,
    sparse_outliers,
    threshold_outliers,
)
from .formats import StreamFormat
from .packing import pack, unpack

__all__ = ["NuqCodec", "weighted_kmeans_1d"]


def weighted_kmeans_1d(
    x: torch.Tensor, levels: int, weights: torch.Tensor | None = None, iters: int = 40
) -> torch.Tensor:
    """Sorted 1-D k-means centroids of `x` (optionally weighted, e.g. by Fisher information).

    Initialised at evenly spaced quantiles; empty clusters keep their previous centroid.
    """
    x = x.flatten().double()
    w = torch.ones_like(x) if weights is None else weights.flatten().double().clamp_min(0)
    if w.sum() <= 0:
        w = torch.ones_like(x)
    c = torch.quantile(x[: 1 << 20], torch.linspace(0, 1, levels + 2, dtype=torch.float64)[1:-1])
    for _ in range(iters):
        c, _ = torch.sort(c)
        assign = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
        num = torch.zeros(levels, dtype=torch.float64).index_add_(0, assign, x * w)
        den = torch.zeros(levels, dtype=torch.float64).index_add_(0, assign, w)
        c = torch.where(den > 0, num / den.clamp_min(1e-300), c)
    return torch.sort(c)[0]


class NuqCodec(Codec):
    """KVQuant nuq: codebook levels in [-1, 1] per layer, per-group normalisation, sparse fp16 outliers.

    Keys (axis "channel", group None): a static per-channel zero/scale from calibration thresholds
    (the 0.5 / 99.5 percentiles of each channel for 1% outliers), shared per layer. Values (axis
    "token"): a per-token zero/scale over the token's H*D vector after its outliers are removed.
    Outliers (`formats.Outliers`): with thresholds "channel" (KVQuant keys) every element outside its
    channel's calibrated range, a count that varies per token (values, indices and per-token counts,
    `threshold_outliers`); with "topk" a fixed k = ceil(fraction * H * D) entries per token, the ones
    furthest outside the normalised range (`sparse_outliers`). Values are fp16, indices and counts in the
    bits the format gives. The codebook is fitted on the calibration elements that are not outliers.
    """

    def __init__(self, fmt: StreamFormat, head_dim: int, qnorm: bool | None = None):
        super().__init__(fmt, head_dim)
        self.qnorm = fmt.bits <= 2 if qnorm is None else qnorm  # KVQuant applies Q-Norm at 2 bits
        self._codebook: torch.Tensor | None = None  # fp16 [2**bits]
        self._scale: torch.Tensor | None = None  # fp16 [H, D] (static per-channel keys)
        self._zero: torch.Tensor | None = None

    @property
    def calibrated(self) -> bool:
        return self._codebook is not None

    @property
    def static(self) -> bool:
        return self.fmt.axis == "channel" and self.fmt.group_size is None

    def _k(self, h: int, d: int) -> int:
        return self.fmt.outliers_per_token(h, d)

    @property
    def _thresholds(self) -> bool:
        """Outliers are the elements beyond per-channel calibrated thresholds (static keys only)."""
        return self.static and self.fmt.outliers is not None and self.fmt.outliers.thresholds == "channel"

    def _static_mask(self, xn: torch.Tensor, k: int) -> torch.Tensor:
        """Outlier mask [B, t, H*D] of normalised static-key rows: beyond the channel's range, or the top k."""
        rows = self._rows(xn)
        if self._thresholds:
            return rows.abs() > 1
        return _topk_mask(rows.abs(), k)

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Static key ranges (percentile thresholds) and the Fisher-weighted k-means codebook."""
        _check_block(x)
        x = x.float()
        h, d = x.shape[1], x.shape[3]
        if self.static:
            rows = x.permute(1, 3, 0, 2).reshape(h, d, -1)  # [H, D, N]
            q = self.fmt.outliers.fraction / 2 if self.fmt.outliers else 0.0
            lo = torch.quantile(rows, q, dim=-1) if q else rows.amin(-1)
            hi = torch.quantile(rows, 1 - q, dim=-1) if q else rows.amax(-1)
            zero = quant.round_to_dtype(((hi + lo) / 2).double(), self.fmt.scale_dtype, "down")
            half = torch.maximum(hi.double() - zero.double(), zero.double() - lo.double())
            self._zero, self._scale = zero, quant.round_to_dtype(half.clamp_min(1e-6), self.fmt.scale_dtype, "up")
        self._codebook = None
        xn, mask = self._normalize(x)
        keep = ~mask
        vals = xn[keep].clamp(-1, 1)
        wv = None if weights is None else weights.float().expand_as(x)[keep]
        levels = weighted_kmeans_1d(vals, self.fmt.num_levels, wv)
        if self.qnorm:
            levels = _qnorm(levels, vals, wv)
        self._codebook = torch.sort(levels.clamp(-1, 1))[0].to(torch.float16)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return _flat(x)[:, 0]  # [B, t, H*D]

    def _normalize(self, x: torch.Tensor):
        """Normalised values and the outlier mask, in the codec's working layout."""
        h, d = x.shape[1], x.shape[3]
        k = self._k(h, d)
        if self.static:
            xn = (x - self._zero.float()[None, :, None, :]) / self._scale.float()[None, :, None, :]
            return xn, _unflat(self._static_mask(xn, k)[:, None], h)
        rows = self._rows(x)  # [B, t, H*D]
        med = rows.median(-1, keepdim=True).values
        mask = _topk_mask((rows - med).abs(), k)
        big = torch.finfo(torch.float32).max
        gmax = torch.where(mask, -big, rows).amax(-1, keepdim=True)
        gmin = torch.where(mask, big, rows).amin(-1, keepdim=True)
        z = (gmax + gmin) / 2
        s = ((gmax - gmin) / 2).clamp_min(1e-12)
        return _unflat(((rows - z) / s)[:, None], h), _unflat(mask[:, None], h)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_block(x)
        if not self.calibrated:
            self.calibrate(x)  # uncalibrated: fit on the first block (the prefill), uniform weights
        f = self.fmt
        x = x.float()
        b, h, t, d = x.shape
        k = self._k(h, d)
        rows = self._rows(x)  # [B, t, H*D]
        if self.static:
            xn = (x - self._zero.float()[None, :, None, :]) / self._scale.float()[None, :, None, :]
            mask = self._static_mask(xn, k)
            # one static group per channel: scale/zero [1, H, 1, D]
            codes = quant.nuq_quantize(
                x, self._codebook, self._scale[None, :, None, :], self._zero[None, :, None, :], "channel", None
            )
            parts = {}
        else:
            med = rows.median(-1, keepdim=True).values
            mask = _topk_mask((rows - med).abs(), k)
            dense = torch.where(mask, med.expand_as(rows), rows)  # outliers do not set the range
            scale, zero = quant.nuq_qparams(dense[:, None], "token", None, f.scale_dtype)  # [B, 1, t, 1]
            codes = _unflat(quant.nuq_quantize(dense[:, None], self._codebook, scale, zero, "token", None), h)
            parts = {"scale": scale, "zero": zero}
        parts["codes"] = pack(codes, f.bits)
        if f.outliers is not None and k:
            index_bits = f.outliers.index_bits_for(h * d)
            if self._thresholds:
                parts.update(threshold_outliers(rows, mask, index_bits, 8 if h * d < 256 else 16))
            else:
                parts.update(sparse_outliers(rows, mask, k, index_bits, pointers=f.outliers.pointer_bits is not None))
        return parts

    def decode(self, parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        f = self.fmt
        h = parts["codes"].shape[1]
        codes = unpack(parts["codes"], f.bits, self._d).long()  # [B, H, t, D]
        lv = self._codebook.float()[codes]
        if self.static:
            y = lv * self._scale.float()[None, :, None, :] + self._zero.float()[None, :, None, :]
        else:
            y = _unflat(_flat(lv) * parts["scale"].float() + parts["zero"].float(), h)
        if "outlier_values" in parts or "sparse_values" in parts:
            rows = scatter_outliers(_flat(y)[:, 0], parts)  # [B, t, H*D]
            y = _unflat(rows[:, None], h)
        return y

    def shared(self) -> dict[str, torch.Tensor]:
        out = {"codebook": self._codebook}
        if self.static:
            out.update(static_scale=self._scale, static_zero=self._zero)
        return {k: v for k, v in out.items() if v is not None}

    def load_state_dict(self, state: dict) -> None:
        self._codebook = state["codebook"]
        self._scale = state.get("static_scale")
        self._zero = state.get("static_zero")


def _qnorm(levels: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Q-Norm: shift/scale the codebook so quantized data keeps the (weighted) mean and std of `x`."""
    x = x.double()
    w = torch.ones_like(x) if w is None else w.double()
    q = levels.double()[torch.bucketize(x, (levels[1:] + levels[:-1]).double() / 2)]
    mean_x, mean_q = (w * x).sum() / w.sum(), (w * q).sum() / w.sum()
    std_x = ((w * (x - mean_x) ** 2).sum() / w.sum()).sqrt()
    std_q = ((w * (q - mean_q) ** 2).sum() / w.sum()).sqrt()
    if std_q <= 0:
        return levels
    return (levels.double() - mean_q) * (std_x / std_q) + mean_x
