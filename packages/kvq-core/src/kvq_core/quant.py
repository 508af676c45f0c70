"""Affine and codebook quantization with granularity as a parameter (one path for every bit width).

Tensors are ``[..., T, D]`` (tokens, channels). ``axis="token"`` groups each token's channels in
groups of G (per-token quantization); ``axis="channel"`` groups each channel's tokens in groups of G
(per-channel, as KIVI keys). A partial last group is allowed. Scales and zeros are returned already
rounded to their storage dtype, rounded *outward* (zero down, scale up) so that the stored grid still
covers every element: with clip_ratio 1 each element reconstructs within half of its group's stored
scale, which the property tests check.

Example: 4-bit asymmetric, one group [0.0, 0.3, 1.5]: zero 0, scale 1.5 / 15 = 0.1, codes [0, 3, 15].
"""

from __future__ import annotations

import math
from functools import cache

import torch

from .formats import DTYPE_BYTES, TERNARY

__all__ = [
    "check_finite",
    "choose_qparams",
    "quantize",
    "dequantize",
    "nuq_quantize",
    "nuq_dequantize",
    "round_to_dtype",
    "storage_dtype",
    "num_levels",
]

_TORCH_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "e8m0": torch.float8_e8m0fnu,  # powers of two 2**-127 .. 2**127: block floating point's shared exponent
}


def storage_dtype(name: str) -> torch.dtype:
    if name not in _TORCH_DTYPES:
        raise ValueError(f"unknown scale dtype {name!r}; valid: {', '.join(DTYPE_BYTES)}")
    return _TORCH_DTYPES[name]


def num_levels(bits: float) -> int:
    return 3 if bits == TERNARY else 2 ** int(bits)


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """Raise a ValueError naming the problem if `x` holds NaN or Inf (quantizing them is never right)."""
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{what} contains {n_nan} NaN and {n_inf} Inf values; KV quantization needs finite input")


@cache
def _finite_table(name: str) -> torch.Tensor:
    """All finite values of a storage dtype, sorted, as float64 (fp16/bf16: 63,488 / 65,280 entries)."""
    dt = storage_dtype(name)
    if dt == torch.float32:
        raise AssertionError("fp32 needs no table")
    nbits = DTYPE_BYTES[name] * 8
    raw = torch.arange(2**nbits, dtype=torch.int32)
    raw = raw.to(torch.int16) if nbits == 16 else raw.to(torch.uint8)
    vals = raw.view(dt).to(torch.float64)
    vals = vals[torch.isfinite(vals)]
    return torch.unique(vals)  # sorted, -0.0 and 0.0 merged


def round_to_dtype(v: torch.Tensor, name: str, direction: str) -> torch.Tensor:
    """Round float values to the nearest representable value of storage dtype `name` in `direction`.

    direction "down" gives the largest representable <= v, "up" the smallest >= v. Returns the values
    in that dtype. Values beyond the dtype's range raise (they cannot be stored honestly).
    """
    dt = storage_dtype(name)
    if dt == torch.float32:
        v32 = v.to(torch.float32)
        exact = v32.to(torch.float64)
        fix = (exact > v) if direction == "down" else (exact < v)
        inf = torch.tensor(-math.inf if direction == "down" else math.inf, dtype=torch.float32, device=v.device)
        return torch.where(fix, torch.nextafter(v32, inf), v32)
    table = _finite_table(name).to(v.device)
    v64 = v.to(torch.float64)
    if v64.numel() and (v64.min() < table[0] or v64.max() > table[-1]):
        raise ValueError(f"value out of the {name} range [{table[0].item()}, {table[-1].item()}]")
    if direction == "down":
        idx = torch.searchsorted(table, v64, right=True) - 1
    else:
        idx = torch.searchsorted(table, v64, right=False)
    return table[idx.clamp(0, table.numel() - 1)].to(dt)


def _groups(x: torch.Tensor, axis: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """View `x` [..., T, D] as groups; returns (grouped, valid_mask, pad). Reduction dim is -1.

    token axis:   [..., T, ng, G]      channel axis: [..., D, ng, G] (channels first, tokens grouped)
    """
    if axis not in ("token", "channel"):
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    y = x if axis == "token" else x.transpose(-1, -2)  # [..., rows, n] with groups along n
    n = y.shape[-1]
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1 or None, got {group_size}")
    g = group_size or max(n, 1)
    pad = (-n) % g if n else 0
    mask = torch.ones(n, dtype=torch.bool, device=x.device)
    if pad:
        y = torch.nn.functional.pad(y, (0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    ng = y.shape[-1] // g if g else 0
    return y.reshape(*y.shape[:-1], ng, g), mask.reshape(ng, g), pad


def _ungroup(y: torch.Tensor, axis: str, n: int) -> torch.Tensor:
    y = y.reshape(*y.shape[:-2], -1)[..., :n]
    return y if axis == "token" else y.transpose(-1, -2)


def _meta_shape(m: torch.Tensor, axis: str) -> torch.Tensor:
    # grouped stats [..., rows, ng] -> storage layout: token axis [..., T, ng]; channel [..., ng, D]
    return m if axis == "token" else m.transpose(-1, -2)


def _from_meta(m: torch.Tensor, axis: str) -> torch.Tensor:
    return (m if axis == "token" else m.transpose(-1, -2)).unsqueeze(-1)


def choose_qparams(
    x: torch.Tensor,
    bits: float,
    axis: str = "token",
    group_size: int | None = None,
    symmetric: bool = False,
    scale_dtype: str = "fp16",
    clip_ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zeros, None if symmetric) for `x` [..., T, D], in storage layout and dtype.

    Shapes: token axis ``[..., T, ceil(D/G)]``; channel axis ``[..., ceil(T/G), D]``.
    """
    check_finite(x)
    levels = num_levels(bits)
    grouped, mask, _ = _groups(x.to(torch.float64), axis, group_size)
    big = torch.finfo(torch.float64).max
    gmax = torch.where(mask, grouped, -big).amax(-1)
    gmin = torch.where(mask, grouped, big).amin(-1)
    if clip_ratio != 1.0:
        gmax, gmin = gmax * clip_ratio, gmin * clip_ratio
    if symmetric:
        m = (levels - 1) // 2
        if m < 1:
            raise ValueError(f"symmetric quantization needs at least 3 levels, {bits}-bit has {levels}")
        scale = round_to_dtype(torch.maximum(gmax.abs(), gmin.abs()) / m, scale_dtype, "up")
        return _meta_shape(scale, axis), None
    zero = round_to_dtype(gmin, scale_dtype, "down")
    scale = round_to_dtype((gmax - zero.to(torch.float64)).clamp_min(0) / (levels - 1), scale_dtype, "up")
    return _meta_shape(scale, axis), _meta_shape(zero, axis)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: float,
    axis: str = "token",
    group_size: int | None = None,
) -> torch.Tensor:
    """Integer codes (uint8, unpacked) of `x` [..., T, D] on the given grid; clamps to the range."""
    check_finite(x)
    levels = num_levels(bits)
    grouped, _, _ = _groups(x.to(torch.float64), axis, group_size)
    s = _from_meta(scale.to(torch.float64), axis)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if zero is None:
        m = (levels - 1) // 2
        q = torch.round(grouped / safe).clamp(-m, m) + m
    else:
        q = torch.round((grouped - _from_meta(zero.to(torch.float64), axis)) / safe).clamp(0, levels - 1)
    q = torch.where(s > 0, q, torch.full_like(q, 0 if zero is not None else (levels - 1) // 2))
    n = x.shape[-1] if axis == "token" else x.shape[-2]
    return _ungroup(q, axis, n).to(torch.uint8)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: float,
    axis: str = "token",
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reconstruct ``[..., T, D]`` from codes and the stored grid (computed in fp32, then cast)."""
    grouped, _, _ = _groups(codes.to(torch.float32), axis, group_size)
    s = _from_meta(scale.to(torch.float32), axis)
    if zero is None:
        y = (grouped - (num_levels(bits) - 1) // 2) * s
    else:
        y = grouped * s + _from_meta(zero.to(torch.float32), axis)
    n = codes.shape[-1] if axis == "token" else codes.shape[-2]
    return _ungroup(y, axis, n).to(dtype)


def nuq_quantize(
    x: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: str, group_size: int | None
) -> torch.Tensor:
    """Codes of the nearest codebook level after normalizing each group to [-1, 1]: (x - zero) / scale.

    `codebook` holds sorted levels in [-1, 1]; for nuq, scale = (max - min) / 2 and zero = (max + min) / 2.
    """
    check_finite(x)
    grouped, _, _ = _groups(x.to(torch.float32), axis, group_size)
    s = _from_meta(scale.to(torch.float32), axis)
    z = _from_meta(zero.to(torch.float32), axis)
    xn = torch.where(s > 0, (grouped - z) / torch.where(s > 0, s, 1.0), torch.zeros_like(grouped))
    cb = codebook.to(torch.float32)
    # nearest level via midpoints between sorted levels
    mids = (cb[1:] + cb[:-1]) / 2
    q = torch.bucketize(xn.contiguous(), mids)
    n = x.shape[-1] if axis == "token" else x.shape[-2]
    return _ungroup(q, axis, n).to(torch.uint8)


def nuq_dequantize(
    codes: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    axis: str,
    group_size: int | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """codebook[code] * scale + zero, per group."""
    grouped, _, _ = _groups(codes.long(), axis, group_size)
    lv = codebook.to(torch.float32)[grouped]
    y = lv * _from_meta(scale.to(torch.float32), axis) + _from_meta(zero.to(torch.float32), axis)
    n = codes.shape[-1] if axis == "token" else codes.shape[-2]
    return _ungroup(y, axis, n).to(dtype)


def nuq_qparams(
    x: torch.Tensor, axis: str, group_size: int | None, scale_dtype: str = "fp16"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (max - min) / 2 (rounded up) and zero (max + min) / 2 per group, for a [-1, 1] codebook."""
    check_finite(x)
    grouped, mask, _ = _groups(x.to(torch.float64), axis, group_size)
    big = torch.finfo(torch.float64).max
    gmax = torch.where(mask, grouped, -big).amax(-1)
    gmin = torch.where(mask, grouped, big).amin(-1)
    zero = round_to_dtype((gmax + gmin) / 2, scale_dtype, "down")
    z64 = zero.to(torch.float64)
    half = torch.maximum(gmax - z64, z64 - gmin)
    scale = round_to_dtype(half, scale_dtype, "up")
    return _meta_shape(scale, axis), _meta_shape(zero, axis)
