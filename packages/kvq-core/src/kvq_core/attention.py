"""Reference attention and RoPE in fp32/fp64: the executable spec the quality tests measure error against.

Conventions are transformers' Llama ones:
  - RoPE is the "rotate half" (non-interleaved) form: channel i pairs with channel i + D/2, and
    `inv_freq[i] = theta ** (-2i / D)` for i < D/2, repeated for the second half.
  - GQA: query head h reads KV head `h // (H_q // H_kv)` (SmolLM2-135M: 9 query heads over 3 KV heads,
    so query heads 0-2 read KV head 0, 3-5 KV head 1, 6-8 KV head 2).
  - Causal masking aligns the queries to the end of the keys: query i of T_q sits at key position
    T_k - T_q + i and attends keys 0..T_k - T_q + i (a single decode query attends every key).
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["rope_cos_sin", "apply_rope", "unapply_rope", "attention_reference", "kv_head_of"]


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of default (unscaled) RoPE at integer `positions`: each [T, head_dim] in `dtype`.

    Example: head_dim 4, theta 10000: inv_freq = [1, 0.01, 1, 0.01], so position 1 has
    cos = [cos 1, cos 0.01, cos 1, cos 0.01].
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"RoPE needs an even integer head_dim >= 2, got {head_dim!r}")
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"RoPE theta must be a finite number > 0, got {theta!r}")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
        raise ValueError(f"positions must be a 1-D tensor [T], got {_shape_of(positions)}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [D/2]
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _shape_of(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor [..., T, D], got {_shape_of(x)}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _resolve_cos_sin(x, positions, theta, cos, sin):
    _check_x(x)
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither (then positions and theta)")
    if cos is None:
        if theta is None:
            raise ValueError("give theta (with optional positions) or cos and sin")
        if positions is None:
            positions = torch.arange(x.shape[-2])
        cos, sin = rope_cos_sin(positions, x.shape[-1], theta, torch.float64)
    if cos.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"cos/sin last dims {tuple(cos.shape[-2:])} do not match x's [T, D] {tuple(x.shape[-2:])}")
    return cos, sin


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    theta: float | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rotate `x` ([..., T, D], e.g. keys [B, H_kv, T, D]) by RoPE; computed and returned in `dtype`.

    Either `theta` (positions default to 0..T-1) or precomputed `cos`, `sin` broadcastable to
    [..., T, D] (e.g. the model's rotary embedding output [B, T, D] unsqueezed to [B, 1, T, D]).
    """
    cos, sin = _resolve_cos_sin(x, positions, theta, cos, sin)
    x = x.to(dtype)
    return x * cos.to(dtype) + _rotate_half(x) * sin.to(dtype)


def unapply_rope(
    x: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    theta: float | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `apply_rope` (rotation by -angle; exact up to rounding, RoPE is orthogonal)."""
    cos, sin = _resolve_cos_sin(x, positions, theta, cos, sin)
    x = x.to(dtype)
    return x * cos.to(dtype) - _rotate_half(x) * sin.to(dtype)


def kv_head_of(q_heads: int, kv_heads: int) -> torch.Tensor:
    """KV head index read by each query head: [H_q] with entry h = h // (H_q // H_kv)."""
    for name, n in (("query heads", q_heads), ("KV heads", kv_heads)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    return torch.arange(q_heads) // (q_heads // kv_heads)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with GQA, computed and returned in `dtype` (fp64 default).

    q: [B, H_q, T_q, D]; k, v: [B, H_kv, T_k, D] (v may have its own last dim D_v); H_q % H_kv == 0.
    causal: mask key j for query i when j > T_k - T_q + i (queries aligned to the end of the keys);
      ignored when T_q == 1 (a decode query attends every key).
    scale: default 1/sqrt(D).
    Returns [B, H_q, T_q, D_v].
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor [B, H, T, D], got {_shape_of(t)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0)
    ):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, T, D]; got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    t_q, t_k = q.shape[2], k.shape[2]
    if causal and t_q > t_k:
        raise ValueError(f"causal attention needs T_q <= T_k, got {t_q} > {t_k}")
    heads = kv_head_of(q.shape[1], k.shape[1]).to(q.device)
    k = k.to(dtype)[:, heads]  # k: [B, H_q, T_k, D]
    v = v.to(dtype)[:, heads]  # v: [B, H_q, T_k, D_v]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(dtype) @ k.transpose(-1, -2)) * scale  # scores: [B, H_q, T_q, T_k]
    if causal and t_q > 1:
        i = torch.arange(t_q, device=q.device)[:, None] + (t_k - t_q)
        j = torch.arange(t_k, device=q.device)[None, :]
        scores = scores.masked_fill(j > i, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
