"""The codec interface every stream codec implements, and the tensor helpers codecs share.

A codec is built from a `formats.StreamFormat` and holds the per-layer state its method needs
(codebook, static scales, channel order, clip ratio, fp8 tensor scale). `encode` returns the
per-sequence tensors of a block ``x: [B, H, t, D]``; `shared()` the per-layer tensors. The tensors are
exactly what `formats.stream_bytes` counts, in the dtypes it counts them in.
"""

from __future__ import annotations

import torch

from . import quant
from .formats import StreamFormat

__all__ = ["CAT_DIM", "Codec", "sparse_outliers", "threshold_outliers", "scatter_outliers"]

# Dimension along which each per-sequence tensor grows when blocks are appended.
CAT_DIM = {
    "codes": 2,  # [B, H, t, row_bytes]
    "scale": 2,  # [B, H|1, t, ng] (token axis) or [B, H, ceil(t/G), D] (channel axis)
    "zero": 2,
    "outlier_values": 1,  # [B, t, k] fp16
    "outlier_indices": 1,  # [B, t, k] int16, flat h * D + d
    "outlier_pointers": 1,  # [B, t + 1] int32 (CSR row pointers; one column per token for keys)
    "outlier_counts": 1,  # [B, t] uint8/int16: outliers per token (a count per token varies: thresholds)
    "sparse_values": 0,  # [n] fp16, the outliers of all tokens in (batch, token, index) order
    "sparse_indices": 0,  # [n] uint8/int16, flat h * D + d
    "latent": 2,  # [B, 1, t, r] fp16 (CSKV: a token's coordinates in the layer's basis)
    "lowrank_a": 2,  # [B, H, t, r] fp16 (GEAR: token factor of each chunk's error)
    "lowrank_b": 2,  # [B, H, t / C, D * r] fp16 (GEAR: channel factor, one row per chunk)
}


class Codec:
    """Base class of the stream codecs: see the module docstring."""

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


#: the integer dtype of a stored index or count of `bits` bits (`formats.Outliers`)
INDEX_DTYPES = {8: torch.uint8, 16: torch.int16, 32: torch.int32}


def sparse_outliers(
    rows: torch.Tensor, mask: torch.Tensor, k: int, index_bits: int = 16, pointers: bool = True
) -> dict[str, torch.Tensor]:
    """The stored sparse outliers of a block, as `formats.stream_bytes` counts them; {} when k == 0.

    rows: [B, t, H*D] values; mask: [B, t, H*D] with exactly k True per row. Returns fp16 values and flat
    indices of `index_bits` bits [B, t, k] (indices ascending per row) and, with `pointers`, int32 CSR row
    pointers [B, t + 1] (without: row r starts at r * k).
    """
    if not k:
        return {}
    b, t = rows.shape[:2]
    idx = torch.topk(mask.to(torch.int8), k, dim=-1).indices.sort(-1).values  # [B, t, k]
    out = {
        "outlier_values": torch.gather(rows, -1, idx).to(torch.float16),
        "outlier_indices": idx.to(INDEX_DTYPES[index_bits]),
    }
    if pointers:
        out["outlier_pointers"] = (torch.arange(t + 1, dtype=torch.int32) * k).expand(b, t + 1).contiguous()
    return out


def threshold_outliers(rows: torch.Tensor, mask: torch.Tensor, index_bits: int, count_bits: int) -> dict:
    """The stored sparse outliers of a block whose count per token varies (every element `mask` marks).

    rows, mask: [B, t, H*D]. Returns fp16 values and flat indices of `index_bits` bits [n] in (batch,
    token, index) order, and the count per token [B, t] in `count_bits` bits.
    """
    _, _, idx = mask.nonzero(as_tuple=True)  # row-major: by batch, token, index
    return {
        "sparse_values": rows[mask].to(torch.float16),
        "sparse_indices": idx.to(INDEX_DTYPES[index_bits]),
        "outlier_counts": mask.sum(-1).to(INDEX_DTYPES[count_bits]),
    }


def scatter_outliers(rows: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """`rows` [B, t, H*D] with the stored outliers of `sparse_outliers` or `threshold_outliers` written in."""
    rows = rows.clone()
    if "outlier_values" in parts:
        rows.scatter_(-1, parts["outlier_indices"].long(), parts["outlier_values"].float())
    elif "sparse_values" in parts:
        b, t, hd = rows.shape
        flat = rows.view(b * t, hd)
        token = torch.repeat_interleave(torch.arange(b * t), parts["outlier_counts"].long().flatten())
        flat[token, parts["sparse_indices"].long()] = parts["sparse_values"].float()
    return rows


def _topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of `score` along the last dim (no entries if k == 0)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(-1, torch.topk(score, k, dim=-1).indices, True)
    return mask
