"""Uniform-grid codes (`AffineCodec`): asymmetric or symmetric, per-token or per-channel groups, optional
channel reorder and clipping. Stores the int baselines, KIVI, SKVQ and block floating point (e8m0 scales).
"""

from __future__ import annotations

import math

import torch

from . import quant
from .codec_base import Codec, _check_block, _flat, _unflat
from .formats import StreamFormat
from .packing import pack, unpack

__all__ = ["AffineCodec"]


class AffineCodec(Codec):
    """Uniform grid codes + fp scales/zeros; optional channel reorder (stored int16) and clipping."""

    # Clip factors tried by `calibrate` (least reconstruction error on the calibration data wins).
    # SKVQ tunes the factor per model; 0.91-0.97 is the authors' experience on LLaMA/Mistral-7B at
    # group 128, i.e. 32 groups over 4096 channels. On small models a group spans a large share of
    # the channels (SmolLM2-135M: 192 K/V channels per token, groups 128 + 64) and the error-optimal
    # factor at 2 and 1.5 bits is far lower (measured 0.5-0.65 on every layer); a grid ending at 0.91
    # returns its edge, 0.91, on every layer and leaves skvq-k2v1.5 at decode perplexity 98.9 (fp16 11.7).
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
