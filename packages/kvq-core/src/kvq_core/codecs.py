"""Codecs: turn a block of one stream (keys or values) into the stored tensors of its format, and back.

A codec is built from a `formats.StreamFormat` and holds the per-layer state its method needs
(codebook, static scales, channel order, clip ratio, fp8 tensor scale). `encode` returns the
per-sequence tensors of a block ``x: [B, H, t, D]``; `shared()` the per-layer tensors. The tensors are
exactly what `formats.stream_bytes` counts, in the dtypes it counts them in.

Three families here cover the foundation methods:
- `AffineCodec`: uniform asymmetric/symmetric grids, per-token or per-channel groups, optional
  channel reorder and clipping (int baselines, KIVI, SKVQ; block floating point with e8m0 scales).
- `NuqCodec`: a non-uniform codebook per layer with dense-and-sparse outliers (KVQuant).
- `Fp8Codec`: fp8 codes with one fp32 scale per layer (vLLM).
The issue-8 methods have one module each, chosen by `make_codec` from the format's fields:
`codecs_pq` (MILLION), `codecs_rotate` (RotateKV), `codecs_lowrank` (GEAR, CSKV), `codecs_vidkv`
(VidKV). Token tiers (ZipCache, MiKV, eviction) and age steps (staircase) are stream layouts, not
codecs: `cache_tiers`, `cache_staircase`.
"""

from __future__ import annotations

import math

import torch

from . import quant
from .formats import StreamFormat
from .packing import pack, unpack

__all__ = ["Codec", "AffineCodec", "NuqCodec", "Fp8Codec", "make_codec", "weighted_kmeans_1d"]

# Dimension along which each per-sequence tensor grows when blocks are appended.
CAT_DIM = {
    "codes": 2,  # [B, H, t, row_bytes]
    "scale": 2,  # [B, H|1, t, ng] (token axis) or [B, H, ceil(t/G), D] (channel axis)
    "zero": 2,
    "outlier_values": 1,  # [B, t, k] fp16
    "outlier_indices": 1,  # [B, t, k] int16, flat h * D + d
    "outlier_pointers": 1,  # [B, t + 1] int32 (CSR row pointers; one column per token for keys)
    "latent": 2,  # [B, 1, t, r] fp16 (CSKV: a token's coordinates in the layer's basis)
    "lowrank_a": 2,  # [B, H, t, r] fp16 (GEAR: token factor of each chunk's error)
    "lowrank_b": 2,  # [B, H, t / C, D * r] fp16 (GEAR: channel factor, one row per chunk)
}


class Codec:
    """Base class: see the module docstring."""

    def __init__(self, fmt: StreamFormat, head_dim: int):
        if not fmt.quantized:
            raise ValueError("an unquantized (16-bit) stream needs no codec")
        self.fmt = fmt
        self._d = head_dim

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Fit per-layer state from calibration activations ``x: [B, H, T, D]`` (optional Fisher `weights`)."""

    @property
    def calibrated(self) -> bool:
        return True

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def shared(self) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor | float]:
        return dict(self.shared())

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, "_" + name, value)


def _check_block(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a block [batch, kv_heads, tokens, head_dim], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"K/V must be floating point, got {x.dtype}")
    quant.check_finite(x, "K/V block")


def _flat(x: torch.Tensor) -> torch.Tensor:
    # [B, H, t, D] -> [B, 1, t, H*D]: one row per token over all heads
    b, h, t, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, 1, t, h * d)


def _unflat(y: torch.Tensor, h: int) -> torch.Tensor:
    # [B, 1, t, H*D] -> [B, H, t, D]
    b, _, t, hd = y.shape
    return y.reshape(b, t, h, hd // h).permute(0, 2, 1, 3)


class AffineCodec(Codec):
    """Uniform grid codes + fp scales/zeros; optional channel reorder (stored int16) and clipping."""

    # Clip factors tried by `calibrate` (least reconstruction error on the calibration data wins).
    # SKVQ tunes the factor per model; 0.91-0.97 is the authors' experience on LLaMA/Mistral-7B at
    # group 128, i.e. 32 groups over 4096 channels. On small models a group spans a large share of
    # the channels (SmolLM2-135M: 192 K/V channels per token, groups 128 + 64) and the error-optimal
    # factor at 2 and 1.5 bits is far lower (measured 0.5-0.65 on every layer); a grid that stopped at
    # 0.91 always returned its edge, 0.91, and left skvq-k2v1.5 at decode perplexity 98.9 (fp16 11.7).
    CLIP_GRID = (1.0, 0.97, 0.95, 0.93, 0.91, *(round(0.9 - 0.05 * i, 2) for i in range(13)))  # 1.0 .. 0.3

    def __init__(self, fmt: StreamFormat, head_dim: int):
        super().__init__(fmt, head_dim)
        self.clip_ratio = fmt.clip_ratio
        self._perm: torch.Tensor | None = None  # int16 [H*D] (spanning) or [H, D]

    @property
    def calibrated(self) -> bool:
        return not self.fmt.reorder_channels or self._perm is not None

    # -- channel order -------------------------------------------------------------------------
    def _to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, t, D] -> the layout groups are taken in: reordered, flattened when spanning heads."""
        if self.fmt.groups_span_heads:
            y = _flat(x)
            return y[..., self._perm.long()] if self._perm is not None else y
        if self._perm is not None:
            idx = self._perm.long()[None, :, None, :].expand_as(x)
            return torch.gather(x, -1, idx)
        return x

    def _from_rows(self, y: torch.Tensor, h: int) -> torch.Tensor:
        if self.fmt.groups_span_heads:
            if self._perm is not None:
                inv = torch.argsort(self._perm.long())
                y = y[..., inv]
            return _unflat(y, h)
        if self._perm is not None:
            inv = torch.argsort(self._perm.long(), dim=-1)[None, :, None, :].expand_as(y)
            return torch.gather(y, -1, inv)
        return y

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """SKVQ calibration: channel order from k-means on each channel's (min, max), then the clip ratio."""
        _check_block(x)
        x = x.float()
        h, d = x.shape[1], x.shape[3]
        if self.fmt.reorder_channels:
            if self.fmt.groups_span_heads:
                rows = _flat(x).reshape(-1, h * d)  # [N, H*D]
                self._perm = _range_cluster_order(rows, self.fmt.group_size or h * d).to(torch.int16)
            else:
                rows = x.permute(1, 0, 2, 3).reshape(h, -1, d)  # [H, N, D]
                self._perm = torch.stack(
                    [_range_cluster_order(rows[i], self.fmt.group_size or d) for i in range(h)]
                ).to(torch.int16)
        if self.fmt.clip_ratio != 1.0:
            # Pick the clip factor with the least reconstruction error on the calibration data.
            errs = []
            for c in self.CLIP_GRID:
                self.clip_ratio = c
                err = (self.decode(self.encode(x), x.shape[2]) - x).pow(2).mean()
                errs.append(float(err))
            self.clip_ratio = self.CLIP_GRID[min(range(len(errs)), key=errs.__getitem__)]

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_block(x)
        f = self.fmt
        if f.reorder_channels and self._perm is None:
            self.calibrate(x)  # uncalibrated: fit the channel order on the first block (the prefill)
        h = x.shape[1]
        y = self._to_rows(x.float())
        scale, zero = quant.choose_qparams(
            y, f.bits, f.axis, f.group_size, f.symmetric, f.scale_dtype, clip_ratio=self.clip_ratio
        )
        codes = quant.quantize(y, scale, zero, f.bits, f.axis, f.group_size)
        # codes are stored per head in group order ([B, H, t, D] after un-flattening, not un-permuting)
        codes = _unflat(codes, h) if f.groups_span_heads else codes
        parts = {"codes": pack(codes, f.bits), "scale": scale}
        if zero is not None:
            parts["zero"] = zero
        return parts

    def decode(self, parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        f = self.fmt
        h = parts["codes"].shape[1]
        codes = unpack(parts["codes"], f.bits, self._d)  # [B, H, t, D]
        if f.groups_span_heads:
            codes = _flat(codes)
        y = quant.dequantize(codes, parts["scale"], parts.get("zero"), f.bits, f.axis, f.group_size)
        if f.groups_span_heads or self._perm is not None:
            return self._from_rows(y, h)
        return y

    def shared(self) -> dict[str, torch.Tensor]:
        return {"reorder": self._perm} if self._perm is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._perm = state.get("reorder")
        if "clip_ratio" in state:
            self.clip_ratio = float(state["clip_ratio"])

    def state_dict(self) -> dict:
        return {**self.shared(), "clip_ratio": self.clip_ratio}


def _range_cluster_order(rows: torch.Tensor, group: int) -> torch.Tensor:
    """Channel order that puts channels with similar (min, max) ranges in the same group (SKVQ).

    rows: [N, C] calibration vectors. Channels are clustered by k-means on their (min, max) into
    ceil(C / group) clusters, then sorted by (cluster centroid max-abs, own max-abs) so that each
    consecutive run of `group` channels holds channels of similar range.
    """
    c = rows.shape[1]
    feats = torch.stack([rows.amin(0), rows.amax(0)], dim=1)  # [C, 2]
    k = max(1, math.ceil(c / group))
    centers = feats[torch.linspace(0, c - 1, k).long()].clone()
    for _ in range(25):
        assign = torch.cdist(feats, centers).argmin(1)
        for j in range(k):
            sel = assign == j
            if sel.any():
                centers[j] = feats[sel].mean(0)
    key = centers[assign].abs().amax(1) * 1e6 + feats.abs().amax(1)
    return torch.argsort(key, stable=True)


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
    Outliers: a fixed k = ceil(fraction * H * D) entries per token, the ones furthest outside the
    normalised range, kept in fp16 with int16 flat indices and int32 row pointers.
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

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Static key ranges (percentile thresholds) and the Fisher-weighted k-means codebook."""
        _check_block(x)
        x = x.float()
        h, d = x.shape[1], x.shape[3]
        if self.static:
            rows = x.permute(1, 3, 0, 2).reshape(h, d, -1)  # [H, D, N]
            q = self.fmt.outlier_fraction / 2
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
            rows = self._rows(xn)  # [B, t, H*D]
            mask = _topk_mask(rows.abs(), k)
            return xn, _unflat(mask[:, None], h)
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
            mask = _topk_mask(self._rows(xn).abs(), k)
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
        parts.update(sparse_outliers(rows, mask, k))
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
        if "outlier_values" in parts:
            rows = _flat(y)[:, 0].clone()  # [B, t, H*D]
            rows.scatter_(-1, parts["outlier_indices"].long(), parts["outlier_values"].float())
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


def sparse_outliers(rows: torch.Tensor, mask: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The stored sparse outliers of a block, as `formats.stream_bytes` counts them; {} when k == 0.

    rows: [B, t, H*D] values; mask: [B, t, H*D] with exactly k True per row. Returns fp16 values and int16
    flat indices [B, t, k] (indices ascending per row) and int32 CSR row pointers [B, t + 1].
    """
    if not k:
        return {}
    b, t = rows.shape[:2]
    idx = torch.topk(mask.to(torch.int8), k, dim=-1).indices.sort(-1).values  # [B, t, k]
    return {
        "outlier_values": torch.gather(rows, -1, idx).to(torch.float16),
        "outlier_indices": idx.to(torch.int16),
        "outlier_pointers": (torch.arange(t + 1, dtype=torch.int32) * k).expand(b, t + 1).contiguous(),
    }


def _topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of `score` along the last dim (no entries if k == 0)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(-1, torch.topk(score, k, dim=-1).indices, True)
    return mask


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


class Fp8Codec(Codec):
    """fp8 codes (e4m3 or e5m2) with one fp32 scale per layer (amax / fp8 max, from calibration or the
    first block). Values beyond the calibrated range saturate, as in vLLM's fp8 KV cache."""

    def __init__(self, fmt: StreamFormat, head_dim: int):
        super().__init__(fmt, head_dim)
        self.dtype = torch.float8_e4m3fn if fmt.levels == "float8_e4m3" else torch.float8_e5m2
        self._tensor_scale: torch.Tensor | None = None  # fp32 [1]

    @property
    def calibrated(self) -> bool:
        return self._tensor_scale is not None

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        _check_block(x)
        amax = float(x.abs().amax()) or 1.0
        self._tensor_scale = torch.tensor([amax / torch.finfo(self.dtype).max], dtype=torch.float32)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_block(x)
        if not self.calibrated:
            self.calibrate(x)
        fmax = torch.finfo(self.dtype).max
        return {"codes": (x.float() / self._tensor_scale).clamp(-fmax, fmax).to(self.dtype)}

    def decode(self, parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        return parts["codes"].float() * self._tensor_scale

    def shared(self) -> dict[str, torch.Tensor]:
        return {"tensor_scale": self._tensor_scale} if self._tensor_scale is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._tensor_scale = state["tensor_scale"]


def make_codec(fmt: StreamFormat, head_dim: int) -> Codec:
    """The codec for a quantized stream format."""
    if fmt.levels == "nonuniform":
        return NuqCodec(fmt, head_dim)
    if fmt.levels.startswith("float8"):
        return Fp8Codec(fmt, head_dim)
    if fmt.levels == "product":
        from .codecs_pq import PQCodec  # MILLION

        return PQCodec(fmt, head_dim)
    if fmt.rotate:
        from .codecs_rotate import RotateCodec  # RotateKV

        return RotateCodec(fmt, head_dim)
    if fmt.latent_fraction:
        from .codecs_lowrank import CskvCodec  # CSKV

        return CskvCodec(fmt, head_dim)
    if fmt.absmean or fmt.fft or fmt.mixed_fraction:
        from .codecs_vidkv import VidkvCodec  # VidKV

        return VidkvCodec(fmt, head_dim)
    if fmt.lowrank_rank:
        from .codecs_lowrank import GearCodec  # GEAR

        return GearCodec(fmt, head_dim)
    return AffineCodec(fmt, head_dim)
