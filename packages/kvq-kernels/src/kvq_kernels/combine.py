"""Second pass of split-KV decoding: merge per-split softmax states (m, l, acc) into the output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def merge_state(m_a, l_a, acc_a, m_b, l_b, acc_b):
    """Merge two online-softmax states (log2 domain); either may be empty (m = -inf, l = 0)."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # both empty: avoid -inf - -inf = NaN
    alpha = tl.exp2(m_a - m_safe)
    beta = tl.exp2(m_b - m_safe)
    return m, l_a * alpha + l_b * beta, acc_a * alpha + acc_b * beta


@triton.jit
def _combine(M_PART, L_PART, ACC_PART, OUT, NUM_SPLITS, HEAD_DIM: tl.constexpr):
    """One program per (batch, query head): OUT[row] = sum_s acc_s 2^(m_s - m) / sum_s l_s 2^(m_s - m)."""
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        m_s = tl.load(M_PART + row * NUM_SPLITS + s)
        l_s = tl.load(L_PART + row * NUM_SPLITS + s)
        acc_s = tl.load(ACC_PART + (row * NUM_SPLITS + s) * HEAD_DIM + offs_d)
        m_i, l_i, acc = merge_state(m_i, l_i, acc, m_s, l_s, acc_s)
    out = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)  # empty sequence -> zeros
    tl.store(OUT + row * HEAD_DIM + offs_d, out.to(OUT.dtype.element_ty))


def alloc_partials(rows: int, splits: int, head_dim: int, device: torch.device):
    """fp32 partial states: m, l [rows, splits] and acc [rows, splits, head_dim] (rows = batch * query heads)."""
    m = torch.empty(rows, splits, dtype=torch.float32, device=device)
    l_part = torch.empty(rows, splits, dtype=torch.float32, device=device)
    acc = torch.empty(rows, splits, head_dim, dtype=torch.float32, device=device)
    return m, l_part, acc


def combine(m, l_part, acc, out: torch.Tensor) -> torch.Tensor:
    """Launch `_combine` over out's rows; out: [batch, query_heads, head_dim] (written in place)."""
    rows, splits, head_dim = acc.shape
    _combine[(rows,)](m, l_part, acc, out, splits, HEAD_DIM=head_dim, num_warps=1)
    return out
