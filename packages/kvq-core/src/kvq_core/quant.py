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
import numbers
from functools import cache

import torch

from .formats import DTYPE_BYTES, SUPPORTED_BITS, TERNARY

__all__ = [
    "FP16_MAX",
    "check_bits",
    "check_finite",
    "check_kv_range",
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


#: largest finite fp16 value: the cache's full-precision sinks and window hold K/V in fp16.
FP16_MAX = 65504.0


def storage_dtype(name: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _TORCH_DTYPES:
        raise ValueError(f"unknown scale dtype {name!r}; valid: {', '.join(DTYPE_BYTES)}")
    return _TORCH_DTYPES[name]


def check_bits(bits: float) -> float:
    """`bits` if it is a code width kvq packs (1-8, or 1.5 for ternary); else a ValueError listing them."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}; valid: {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def num_levels(bits: float) -> int:
    """Code levels of a width: 2**bits, or 3 for ternary (1.5)."""
    check_bits(bits)
    return 3 if bits == TERNARY else 2 ** int(bits)


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """Raise a ValueError naming the problem if `x` holds NaN or Inf (quantizing them is never right)."""
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{what} contains {n_nan} NaN and {n_inf} Inf values; KV quantization needs finite input")


def check_kv_range(x: torch.Tensor, what: str = "K/V block") -> None:
    """Raise a ValueError unless every element of `x` is finite and within fp16's +-65504.

    Every token passes through the cache's fp16 sinks or window before it is quantized, so a larger
    value would become inf there; it is refused, naming the value, instead of stored as inf.
    """
    check_finite(x, what)
    if x.numel():
        peak = float(x.detach().abs().amax())
        if peak > FP16_MAX:
            raise ValueError(
                f"{what} holds a value of magnitude {peak:g}, beyond {FP16_MAX:g}, the fp16 range of the cache's "
                "full-precision tokens; scale K/V into that range"
            )


def _check_tensor(x, what: str, min_dim: int = 2) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{what} must have at least {min_dim} dims [..., tokens, channels], got shape {tuple(x.shape)}"
        )


def _check_float(x: torch.Tensor, what: str) -> None:
    if not x.dtype.is_floating_point:
        raise ValueError(f"{what} must be floating point, got {x.dtype}")


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


def round_to_dtype(v: torch.Tensor, name: str, direction: str, what: str = "value") -> torch.Tensor:
    """Round float values to the nearest representable value of storage dtype `name` in `direction`.

    direction "down" gives the largest representable <= v, "up" the smallest >= v. Returns the values
    in that dtype. A value with no representable neighbour on that side (above the largest value
    rounding up, below the smallest rounding down) raises, naming it; one beyond the range on the other
    side rounds to the range's end, e.g. 0 rounds up to e8m0's smallest scale 2**-127.
    """
    if direction not in ("down", "up"):
        raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")
    dt = storage_dtype(name)
    if dt == torch.float32:
        v32 = v.to(torch.float32)
        exact = v32.to(torch.float64)
        fix = (exact > v) if direction == "down" else (exact < v)
        inf = torch.tensor(-math.inf if direction == "down" else math.inf, dtype=torch.float32, device=v.device)
        out = torch.where(fix, torch.nextafter(v32, inf), v32)
        if not torch.isfinite(out).all():
            bad = v[~torch.isfinite(out)].flatten()[0].item()
            raise ValueError(
                f"{what} {bad:g} is beyond the fp32 range: the format's scales cannot hold this data's range"
            )
        return out
    table = _finite_table(name).to(v.device)
    v64 = v.to(torch.float64)
    if v64.numel():
        bad = v64.max() if direction == "up" else v64.min()
        if (direction == "up" and bad > table[-1]) or (direction == "down" and bad < table[0]):
            raise ValueError(
                f"{what} {bad.item():g} is beyond the {name} range [{table[0].item():g}, {table[-1].item():g}]: "
                "the format's scales cannot hold this data's range"
            )
    if direction == "down":
        idx = torch.searchsorted(table, v64, right=True) - 1
    else:
        idx = torch.searchsorted(table, v64, right=False)
    return table[idx.clamp(0, table.numel() - 1)].to(dt)


def _groups(x: torch.Tensor, axis: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """View `x` [..., T, D] as groups; returns (grouped, valid_mask, pad). Reduction dim is -1.

    token axis:   [..., T, ng, G]      channel axis: [..., D, ng, G] (channels first, tokens grouped)
    """
    _check_axis_group(axis, group_size)
    y = x if axis == "token" else x.transpose(-1, -2)  # [..., rows, n] with groups along n
    n = y.shape[-1]
    g = group_size or max(n, 1)
    pad = (-n) % g if n else 0
    mask = torch.ones(n, dtype=torch.bool, device=x.device)
    if pad:
        y = torch.nn.functional.pad(y, (0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    ng = y.shape[-1] // g if g else 0
    return y.reshape(*y.shape[:-1], ng, g), mask.reshape(ng, g), pad


def _check_axis_group(axis: str, group_size: int | None) -> None:
    if axis not in ("token", "channel"):
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1
    ):
        raise ValueError(f"group_size must be an integer >= 1 or None, got {group_size!r}")


def _meta_shape_of(shape: torch.Size, axis: str, group_size: int | None) -> tuple[int, ...]:
    """Storage shape of the scales / zeros of data `shape` [..., T, D]: see `choose_qparams`."""
    *lead, t, d = shape
    if axis == "token":
        return (*lead, t, -(-d // (group_size or max(d, 1))) if d else 0)
    return (*lead, -(-t // (group_size or max(t, 1))) if t else 0, d)


def _check_meta(m, what: str, data_shape: torch.Size, axis: str, group_size: int | None) -> None:
    """Scales / zeros must broadcast to the storage layout `choose_qparams` returns for the data."""
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(m).__name__}")
    expected = _meta_shape_of(data_shape, axis, group_size)
    try:
        ok = torch.broadcast_shapes(m.shape, expected) == torch.Size(expected)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{what} has shape {tuple(m.shape)}; data {tuple(data_shape)} on the {axis} axis needs {expected}"
        )


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
    A zero-range group (constant data) gets scale 0 (e8m0: its smallest, 2**-127) and reconstructs
    exactly wherever its value is representable in `scale_dtype`. Raises a ValueError naming the value
    when a group's zero point or scale is beyond `scale_dtype`'s range (fp16: 65504; fp8_e4m3: 448).
    """
    _check_tensor(x, "x")
    _check_float(x, "x")
    check_finite(x)
    levels = num_levels(bits)
    storage_dtype(scale_dtype)
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be True or False, got {symmetric!r}")
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, numbers.Real) or not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}")
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
        scale = round_to_dtype(torch.maximum(gmax.abs(), gmin.abs()) / m, scale_dtype, "up", "scale")
        return _meta_shape(scale, axis), None
    zero = round_to_dtype(gmin, scale_dtype, "down", "zero point (group minimum)")
    scale = round_to_dtype((gmax - zero.to(torch.float64)).clamp_min(0) / (levels - 1), scale_dtype, "up", "scale")
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
    _check_tensor(x, "x")
    _check_float(x, "x")
    check_finite(x)
    levels = num_levels(bits)
    _check_axis_group(axis, group_size)
    _check_meta(scale, "scale", x.shape, axis, group_size)
    if zero is not None:
        _check_meta(zero, "zero", x.shape, axis, group_size)
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


def _check_codes(codes, levels: int) -> None:
    _check_tensor(codes, "codes")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor (uint8 from quantize), got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= levels):
        raise ValueError(f"codes must be in 0..{levels - 1}, got values in {int(codes.min())}..{int(codes.max())}")


def _check_codebook(codebook) -> None:
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 1 or codebook.numel() < 1:
        raise ValueError("codebook must be a 1-D tensor of sorted levels in [-1, 1]")
    check_finite(codebook, "codebook")


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
    _check_codes(codes, num_levels(bits))
    _check_axis_group(axis, group_size)
    _check_meta(scale, "scale", codes.shape, axis, group_size)
    if zero is not None:
        _check_meta(zero, "zero", codes.shape, axis, group_size)
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
    _check_tensor(x, "x")
    _check_float(x, "x")
    check_finite(x)
    _check_codebook(codebook)
    _check_axis_group(axis, group_size)
    _check_meta(scale, "scale", x.shape, axis, group_size)
    _check_meta(zero, "zero", x.shape, axis, group_size)
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
    _check_codebook(codebook)
    _check_codes(codes, codebook.numel())
    _check_axis_group(axis, group_size)
    _check_meta(scale, "scale", codes.shape, axis, group_size)
    _check_meta(zero, "zero", codes.shape, axis, group_size)
    grouped, _, _ = _groups(codes.long(), axis, group_size)
    lv = codebook.to(torch.float32)[grouped]
    y = lv * _from_meta(scale.to(torch.float32), axis) + _from_meta(zero.to(torch.float32), axis)
    n = codes.shape[-1] if axis == "token" else codes.shape[-2]
    return _ungroup(y, axis, n).to(dtype)


def nuq_qparams(
    x: torch.Tensor, axis: str, group_size: int | None, scale_dtype: str = "fp16"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (max - min) / 2 (rounded up) and zero (max + min) / 2 per group, for a [-1, 1] codebook."""
    _check_tensor(x, "x")
    _check_float(x, "x")
    check_finite(x)
    grouped, mask, _ = _groups(x.to(torch.float64), axis, group_size)
    big = torch.finfo(torch.float64).max
    gmax = torch.where(mask, grouped, -big).amax(-1)
    gmin = torch.where(mask, grouped, big).amin(-1)
    zero = round_to_dtype((gmax + gmin) / 2, scale_dtype, "down", "zero point (group midpoint)")
    z64 = zero.to(torch.float64)
    half = torch.maximum(gmax - z64, z64 - gmin)
    scale = round_to_dtype(half, scale_dtype, "up", "scale")
    return _meta_shape(scale, axis), _meta_shape(zero, axis)
