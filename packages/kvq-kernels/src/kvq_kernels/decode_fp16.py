"""Split-KV (flash-decoding) attention of one query token per sequence over an fp16 KV cache.

The baseline of the same structure as the packed-KV kernels: grid (batch * kv_heads, splits); each
program loads a [BLOCK_N, HEAD_DIM] K and V tile once for all query heads of its KV head (GQA), keeps
an online softmax (m_i, l_i, acc) over its slice of the context, and writes a partial state that
`combine._combine` merges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import (
    BLOCK_N_RANGE,
    check,
    check_device,
    check_int,
    check_launchable,
    check_lens,
    check_pow2,
    check_sm_scale,
    interpreting,
    next_pow2,
    num_splits,
    resident_programs,
)
from .combine import alloc_partials, combine

LOG2E = 1.4426950408889634  # 1/ln(2): softmax in base 2


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="ieee")  # no tf32 on the fp32 (test) path
    else:
        return tl.dot(a, b)


@triton.jit
def _softmax_update(m_i, l_i, acc, qk, v, DOT_DTYPE: tl.constexpr):
    """One online-softmax step: qk [HQ_PAD, BLOCK_N] scores in log2 units (masked = -inf), v [BLOCK_N, D]."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)  # first tile: exp2(-inf) = 0
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), DOT_DTYPE)
    return m_new, l_i, acc


@triton.jit
def _store_partial(
    M_PART, L_PART, ACC_PART, row0, offs_h, h_mask, split, NUM_SPLITS, m_i, l_i, acc, HEAD_DIM: tl.constexpr
):
    rows = row0 + offs_h.to(tl.int64)  # b * HQ + query head
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(M_PART + rows * NUM_SPLITS + split, m_i, mask=h_mask)
    tl.store(L_PART + rows * NUM_SPLITS + split, l_i, mask=h_mask)
    tl.store(ACC_PART + (rows * NUM_SPLITS + split)[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=h_mask[:, None])


@triton.jit
def _decode_fp16_kernel(
    Q, K, V, LENS, M_PART, L_PART, ACC_PART,
    qk_scale, H_KV, T_CAP, TOKENS_PER_SPLIT, NUM_SPLITS,
    HQ_PER_KV: tl.constexpr, HQ_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H_KV
    seq_len = tl.load(LENS + b)
    offs_h = tl.arange(0, HQ_PAD)
    h_mask = offs_h < HQ_PER_KV
    offs_d = tl.arange(0, HEAD_DIM)
    row0 = pid_bh.to(tl.int64) * HQ_PER_KV  # = b * HQ + h * HQ_PER_KV
    q = tl.load(Q + (row0 + offs_h)[:, None] * HEAD_DIM + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(DOT_DTYPE)  # qk_scale = sm_scale / ln(2)
    kv_base = pid_bh.to(tl.int64) * T_CAP * HEAD_DIM  # 64-bit: B * H_kv * T_cap * D may pass 2**31

    m_i = tl.full([HQ_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([HQ_PAD], tl.float32)
    acc = tl.zeros([HQ_PAD, HEAD_DIM], tl.float32)
    start = split * TOKENS_PER_SPLIT
    end = tl.minimum(start + TOKENS_PER_SPLIT, seq_len)
    for t0 in range(start, end, BLOCK_N):
        offs_n = t0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        ptrs = kv_base + offs_n.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(K + ptrs, mask=n_mask[:, None], other=0.0)
        v = tl.load(V + ptrs, mask=n_mask[:, None], other=0.0)
        qk = _dot(q, tl.trans(k.to(DOT_DTYPE)), DOT_DTYPE)
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_i, l_i, acc = _softmax_update(m_i, l_i, acc, qk, v, DOT_DTYPE)
    _store_partial(M_PART, L_PART, ACC_PART, row0, offs_h, h_mask, split, NUM_SPLITS, m_i, l_i, acc, HEAD_DIM)


def decode_fp16(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens: torch.Tensor,
    sm_scale: float | None = None,
    splits: int | None = None,
    block_n: int = 64,
    max_len: int | None = None,
    validate_lens: bool = True,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over an fp16 (or fp32) KV cache.

    q:    [batch, query_heads, head_dim], same dtype as k and v (fp16, or fp32 for CPU tests).
    k, v: [batch, kv_heads, capacity, head_dim], contiguous; tokens [0, lens[b]) of sequence b are valid.
    lens: int32 [batch], each in [0, capacity]; a length-0 sequence gives zeros.
    GQA:  query head j attends KV head j // (query_heads // kv_heads); MHA when the counts are equal.
    sm_scale: a positive number, default 1/sqrt(head_dim). splits (>= 1, of the context, flash-decoding)
    defaults to whole waves of the programs an SM holds (`fp16_plan`). block_n: tile rows, a power of two in
    [16, 256].
    max_len (tokens): at least max(lens); it sizes the splits. Default capacity (no host sync).
    validate_lens=True reads lens on the host (one device sync) to check them against capacity and max_len;
    False skips that sync (for CUDA-graph capture): the caller then guarantees 0 <= lens <= max_len.
    NaN/Inf in q, k or v are not checked (that would be a sync per call): they propagate to the output.
    Returns [batch, query_heads, head_dim] in q's dtype.
    """
    return combine(
        *decode_fp16_state(q, k, v, lens, sm_scale, splits, block_n, max_len, validate_lens), torch.empty_like(q)
    )


def decode_fp16_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens: torch.Tensor,
    sm_scale: float | None = None,
    splits: int | None = None,
    block_n: int = 64,
    max_len: int | None = None,
    validate_lens: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`decode_fp16`'s per-split softmax state (m, l, acc from `combine.alloc_partials`), before the combine that
    `decode_fp16` runs: the same arguments and checks."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [batch, query_heads, head_dim] tensor, got {getattr(q, 'shape', type(q))}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(
            f"k must be a [batch, kv_heads, capacity, head_dim] tensor, got {getattr(k, 'shape', type(k))}"
        )
    batch, hq, d = q.shape
    _, h_kv, cap, _ = k.shape
    dt = (torch.float16, torch.float32)
    check("q", q, dt, (batch, hq, d))
    check("k", k, q.dtype, (batch, h_kv, cap, d))
    check("v", v, q.dtype, (batch, h_kv, cap, d))
    if h_kv < 1 or hq < 1 or hq % h_kv:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of kv heads ({h_kv})")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    check_device("k", k, q.device)
    check_device("v", v, q.device)
    check_launchable(q.device)
    check_sm_scale(sm_scale)
    check_pow2("block_n", block_n, *BLOCK_N_RANGE)
    if splits is not None:
        check_int("splits", splits, 1)
    max_len = cap if max_len is None else check_int("max_len", max_len, 0, cap)
    longest = check_lens(lens, batch, cap, q.device, validate_lens)
    if longest is not None and max_len < longest:
        raise ValueError(
            f"max_len ({max_len}) is below the longest sequence ({longest} tokens), whose attention would be "
            "cut short; pass max_len >= max(lens) or leave it None"
        )
    plan = fp16_plan(q, k, v, lens, splits, block_n, max_len)
    m, l_part, acc = alloc_partials(batch * hq, plan.splits, d, q.device)
    _fp16_launch(q, k, v, lens, m, l_part, acc, sm_scale, block_n, plan)
    return m, l_part, acc


@dataclass(frozen=True)
class Fp16Plan:
    """What a `decode_fp16` launch runs: `splits` of `tokens_per_split` tokens each, sized for the
    `resident_programs` an SM holds (0 where the caller gave the split count)."""

    splits: int
    tokens_per_split: int
    resident_programs: int


#: decode_fp16's launch: warps and software-pipeline stages (BLOCK_N is an argument)
FP16_WARPS_STAGES = (4, 3)
#: The split rule counts at most this many programs an SM (below, the measurements).
FP16_SPLIT_RESIDENT_MAX = 2


def fp16_plan(q, k, v, lens, splits: int | None, block_n: int, max_len: int) -> Fp16Plan:
    """The split count of a `decode_fp16` call whose inputs are checked: `splits` when given, else one wave (or
    whole waves) of the programs an SM holds (`resident_programs` of the compiled kernel), counted at most
    FP16_SPLIT_RESIDENT_MAX. The kernel streams its tiles: at 4 warps and 3 stages of [64, 128] fp16 K and V
    tiles (70 KiB of shared memory in a local sm_90 compile) an H100 or H200 SM holds 3 programs, but one wave of
    2 an SM measured fastest. H200, splits per KV head (reports/measurements/tune_fp16_splits2_h200.csv and the
    earlier tune_fp16_splits_h200.csv): 32/8 heads, batch 1, 33 (one wave of 2 an SM) 12.0 / 24.0 / 39.9 / 129.2
    / 932.6 us at 4K / 16K / 32K / 128K / 1M against 48 (about one wave of 3) 12.1 / 25.8 / 41.9 / 131.8 / - and
    the rule without resident programs (4 waves of 1, 64-82 splits) 14.2 / 28.0 / 47.5 / 152.9 / 1033.7; batch 2
    at 128K 16 splits 244.3, 24 245.4, 33 280.3; MHA 32/32 at batch 1, 8 splits 0.85-0.94x the time of 16 or
    33 at 4K-128K."""
    if splits is not None:
        n, resident = splits, 0
    else:
        probe = Fp16Plan(1, max(max_len, 1), 0)
        placeholder = torch.empty(0, dtype=torch.float32, device=q.device)
        fn, args, kwargs = _fp16_call(q, k, v, lens, (placeholder,) * 3, 1.0, block_n, probe)
        resident = min(resident_programs(fn, args, kwargs, q.device), FP16_SPLIT_RESIDENT_MAX)
        n = num_splits(q.shape[0] * k.shape[1], max_len, block_n, q.device, resident=resident)
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_len, 1), n), block_n) * block_n
    return Fp16Plan(max(1, triton.cdiv(max(max_len, 1), tokens_per_split)), tokens_per_split, resident)


def _fp16_call(q, k, v, lens, partials, scale, block_n, plan):
    """(kernel, positional args, keyword args) of one launch."""
    hq, d = q.shape[1], q.shape[2]
    h_kv, cap = k.shape[1], k.shape[2]
    group = hq // h_kv
    dot_dtype = tl.float32 if (q.dtype == torch.float32 or interpreting()) else tl.float16
    warps, stages = FP16_WARPS_STAGES
    args = (q, k, v, lens, *partials, scale, h_kv, cap, plan.tokens_per_split, plan.splits)
    kwargs = dict(HQ_PER_KV=group, HQ_PAD=max(16, next_pow2(group)), HEAD_DIM=d, BLOCK_N=block_n,
                  DOT_DTYPE=dot_dtype, num_warps=warps, num_stages=stages)  # fmt: skip
    return _decode_fp16_kernel, args, kwargs


def _fp16_launch(q, k, v, lens, m, l_part, acc, sm_scale, block_n, plan: Fp16Plan) -> None:
    d = q.shape[2]
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    fn, args, kwargs = _fp16_call(q, k, v, lens, (m, l_part, acc), scale, block_n, plan)
    fn[(q.shape[0] * k.shape[1], plan.splits)](*args, **kwargs)


def decode_reference(q, k, v, lens, sm_scale=None, dtype=torch.float64) -> torch.Tensor:
    """The spec: softmax(q k^T * scale) v per sequence in `dtype` (fp64 default); shapes as `decode_fp16`."""
    batch, hq, d = q.shape
    h_kv = k.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(batch, hq, d, dtype=dtype, device=q.device)
    for b in range(batch):
        n = int(lens[b])
        if n == 0:
            continue
        kb = k[b, :, :n].to(dtype).repeat_interleave(hq // h_kv, dim=0)  # [HQ, n, D]
        vb = v[b, :, :n].to(dtype).repeat_interleave(hq // h_kv, dim=0)
        s = torch.einsum("hd,hnd->hn", q[b].to(dtype), kb) * scale
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(s, dim=-1), vb)
    return out
