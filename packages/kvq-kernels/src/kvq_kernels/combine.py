"""Second pass of split-KV decoding: merge per-split softmax states (m, l, acc) into the output.

One program per (batch, query head) reads its splits BLOCK_S at a time as one [BLOCK_S, head_dim] tile and
merges the block with a max and two weighted sums, so a row of S splits takes ceil(S / BLOCK_S) dependent steps
instead of S (batch-1 launches at long contexts run 130 splits a row). `combine_reference` is the same merge
in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Most splits a combine program reads at once ([BLOCK_S, head_dim] fp32 tile: 64 x 128 x 4 B = 32 KiB).
MAX_BLOCK_S = 64
#: Splits a warp's tile holds ([16, 128] fp32: 64 registers a thread). Launches with many rows have few splits
#: and take one warp a program, which keeps many programs resident an SM (H200, GQA batch 256 at 1K tokens,
#: against a one-warp merge of one split a step: 1.10-1.12x its time with 4 warps a program, 0.99-1.01x with
#: one; reports/measurements/ab_combine_4warps_*_h200.csv and ab_combine_*_h200.csv).
SPLITS_PER_WARP = 16


@triton.jit
def _combine(M_PART, L_PART, ACC_PART, OUT, NUM_SPLITS, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (batch, query head): OUT[row] = sum_s acc_s 2^(m_s - m) / sum_s l_s 2^(m_s - m), m the
    largest m_s; empty splits (m_s = -inf, l_s = 0) add nothing and a row of only empty splits gives zeros."""
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_S)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        s = s0 + offs_s
        live = s < NUM_SPLITS
        m_s = tl.load(M_PART + row * NUM_SPLITS + s, mask=live, other=float("-inf"))
        l_s = tl.load(L_PART + row * NUM_SPLITS + s, mask=live, other=0.0)
        acc_s = tl.load(
            ACC_PART + (row * NUM_SPLITS + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None], other=0.0
        )
        m_new = tl.maximum(m_i, tl.max(m_s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: avoid -inf - -inf = NaN
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(m_s - m_safe)  # 0 for empty and masked splits
        l_i = l_i * alpha + tl.sum(l_s * w, axis=0)
        acc = acc * alpha + tl.sum(acc_s * w[:, None], axis=0)
        m_i = m_new
    out = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)  # empty sequence -> zeros
    tl.store(OUT + row * HEAD_DIM + offs_d, out.to(OUT.dtype.element_ty))


def alloc_partials(rows: int, splits: int, head_dim: int, device: torch.device):
    """fp32 partial states: m, l [rows, splits] and acc [rows, splits, head_dim] (rows = batch * query heads)."""
    m = torch.empty(rows, splits, dtype=torch.float32, device=device)
    l_part = torch.empty(rows, splits, dtype=torch.float32, device=device)
    acc = torch.empty(rows, splits, head_dim, dtype=torch.float32, device=device)
    return m, l_part, acc


def block_splits(splits: int) -> int:
    """Splits a combine program merges per step: the next power of two of `splits`, at most MAX_BLOCK_S."""
    return min(MAX_BLOCK_S, triton.next_power_of_2(max(splits, 1)))


def combine(m, l_part, acc, out: torch.Tensor) -> torch.Tensor:
    """Launch `_combine` over out's rows; out: [batch, query_heads, head_dim] (written in place)."""
    rows, splits, head_dim = acc.shape
    block_s = block_splits(splits)
    warps = max(1, block_s // SPLITS_PER_WARP)
    _combine[(rows,)](m, l_part, acc, out, splits, HEAD_DIM=head_dim, BLOCK_S=block_s, num_warps=warps)
    return out


def combine_reference(m: torch.Tensor, l_part: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """`combine` in torch (fp64), for tests: m, l [rows, splits] in log2 units, acc [rows, splits, head_dim];
    returns [rows, head_dim] fp64, zeros for rows whose splits are all empty."""
    m, l_part, acc = m.double(), l_part.double(), acc.double()
    top = m.max(dim=1, keepdim=True).values
    w = torch.exp2(m - torch.where(torch.isinf(top), torch.zeros_like(top), top))
    den = (l_part * w).sum(dim=1, keepdim=True)
    num = (acc * w[..., None]).sum(dim=1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
