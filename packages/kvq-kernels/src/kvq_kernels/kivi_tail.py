"""The full-precision tail of a KIVI decode launch: sinks and the residual window, one program per row.

Both packed decode kernels (`decode_kivi`'s tensor-core slices and `decode_kivi_simt`'s CUDA-core
path) give the last program of each (batch, kv head) row this work: the fp16 sinks, then the tokens
p in [n_vq, rest) whose values sit in the fp16 window ring and whose keys are codes (p < n_kq) or
the fp16 key ring. It writes one partial softmax state at split index NUM_SPLITS.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_fp16 import _dot, _softmax_update, _store_partial
from .packed import load_codes


@triton.jit
def _levels(ROW_PTRS, row_mask, CB, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, NUQ: tl.constexpr, OUT: tl.constexpr):
    """Levels [N, HEAD_DIM] of N packed rows: the code itself (uniform, converted while unpacking)
    or codebook[code] (nuq; a table of 2**BITS fp16, L1-resident)."""
    if NUQ:
        return tl.load(CB + load_codes(ROW_PTRS, row_mask, BITS, HEAD_DIM, tl.int32)).to(OUT)
    else:
        return load_codes(ROW_PTRS, row_mask, BITS, HEAD_DIM, OUT)


@triton.jit
def fp16_tail(
    Q, KC, KS, KZ, KRES, VWIN, KSINK, VSINK, CB, M_PART, L_PART, ACC_PART,
    qk_scale, bh, T_QCAP, R, S, n_sink, rest, n_kq, n_vq, NUM_SPLITS,
    BITS: tl.constexpr, GROUP: tl.constexpr, NUQ: tl.constexpr, HQ_PER_KV: tl.constexpr, HQ_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """Partial state (split NUM_SPLITS of NUM_SPLITS + 1) over row bh's sinks and residual window."""
    ROW_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
    offs_h = tl.arange(0, HQ_PAD)
    h_mask = offs_h < HQ_PER_KV
    offs_d = tl.arange(0, HEAD_DIM)
    row0 = bh * HQ_PER_KV
    q = tl.load(Q + (row0 + offs_h)[:, None] * HEAD_DIM + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    qd = (q.to(tl.float32) * qk_scale).to(DOT_DTYPE)  # log2 units
    m_i = tl.full([HQ_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([HQ_PAD], tl.float32)
    acc = tl.zeros([HQ_PAD, HEAD_DIM], tl.float32)
    for t0 in range(0, n_sink, BLOCK_N):  # sinks, fp16
        offs_n = t0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_sink
        ptrs = (bh * S + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(KSINK + ptrs, mask=n_mask[:, None], other=0.0)
        v = tl.load(VSINK + ptrs, mask=n_mask[:, None], other=0.0)
        qk = _dot(qd, tl.trans(k.to(DOT_DTYPE)), DOT_DTYPE)
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_i, l_i, acc = _softmax_update(m_i, l_i, acc, qk, v, DOT_DTYPE)
    for t0 in range(n_vq, rest, BLOCK_N):  # value window (<= R tokens); keys quantized or fp16
        offs_n = t0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < rest
        kq = n_mask & (offs_n < n_kq)
        rows = bh * T_QCAP + offs_n
        g = bh * (T_QCAP // GROUP) + offs_n // GROUP
        mptr = g[:, None] * HEAD_DIM + offs_d[None, :]
        ks = tl.load(KS + mptr, mask=kq[:, None], other=0.0).to(tl.float32)
        kz = tl.load(KZ + mptr, mask=kq[:, None], other=0.0).to(tl.float32)
        kc = _levels(KC + rows * ROW_BYTES, kq, CB, BITS, HEAD_DIM, NUQ, tl.float32)
        ring = (bh * R + offs_n % R)[:, None] * HEAD_DIM + offs_d[None, :]
        kr = tl.load(KRES + ring, mask=(n_mask & ~kq)[:, None], other=0.0).to(tl.float32)
        k = tl.where(kq[:, None], kc * ks + kz, kr)
        v = tl.load(VWIN + ring, mask=n_mask[:, None], other=0.0)
        qk = _dot(qd, tl.trans(k.to(DOT_DTYPE)), DOT_DTYPE)
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_i, l_i, acc = _softmax_update(m_i, l_i, acc, qk, v, DOT_DTYPE)
    _store_partial(M_PART, L_PART, ACC_PART, row0, offs_h, h_mask, NUM_SPLITS, NUM_SPLITS + 1, m_i, l_i, acc, HEAD_DIM)


@triton.jit
def fp16_tail_one_head(
    Q, KC, KS, KZ, KRES, VWIN, KSINK, VSINK, CB, M_PART, L_PART, ACC_PART,
    qk_scale, bh, T_QCAP, R, S, n_sink, rest, n_kq, n_vq, part, NUM_PARTS, tail_start, tail_end,
    BITS: tl.constexpr, GROUP: tl.constexpr, NUQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """`fp16_tail` for one query head per KV head, on CUDA cores (fp32 sums; no padded tensor-core dot),
    over tail tokens [tail_start, tail_end) of the sinks-then-window sequence; writes partial `part` of
    NUM_PARTS. Several programs share one row's tail (small tiles keep the registers of the CUDA-core
    kernel set by its main loop; more programs keep short contexts from waiting on one serial tail)."""
    ROW_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + bh * HEAD_DIM + offs_d).to(tl.float32) * qk_scale  # log2 units
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for t0 in range(tail_start, tl.minimum(tail_end, n_sink + rest - n_vq), BLOCK_N):  # sinks, then the window
        offs_t = t0 + tl.arange(0, BLOCK_N)
        is_sink = offs_t < n_sink
        offs_n = n_vq + offs_t - n_sink  # post-sink index of window tokens
        n_mask = (offs_t < n_sink + rest - n_vq) & (offs_t < tail_end)
        win = n_mask & ~is_sink
        kq = win & (offs_n < n_kq)
        sptr = (bh * S + offs_t)[:, None] * HEAD_DIM + offs_d[None, :]
        ring = (bh * R + offs_n % R)[:, None] * HEAD_DIM + offs_d[None, :]
        g = bh * (T_QCAP // GROUP) + offs_n // GROUP
        mptr = g[:, None] * HEAD_DIM + offs_d[None, :]
        ks = tl.load(KS + mptr, mask=kq[:, None], other=0.0).to(tl.float32)
        kz = tl.load(KZ + mptr, mask=kq[:, None], other=0.0).to(tl.float32)
        kc = _levels(KC + (bh * T_QCAP + offs_n) * ROW_BYTES, kq, CB, BITS, HEAD_DIM, NUQ, tl.float32)
        k = tl.load(KSINK + sptr, mask=is_sink[:, None], other=0.0).to(tl.float32)
        k += tl.load(KRES + ring, mask=(win & ~kq)[:, None], other=0.0).to(tl.float32)
        k = tl.where(kq[:, None], kc * ks + kz, k)
        v = tl.load(VSINK + sptr, mask=is_sink[:, None], other=0.0).to(tl.float32)
        v += tl.load(VWIN + ring, mask=win[:, None], other=0.0).to(tl.float32)
        qk = tl.where(n_mask, tl.sum(k * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    prow = bh * NUM_PARTS + part
    tl.store(M_PART + prow, m_i)
    tl.store(L_PART + prow, l_i)
    tl.store(ACC_PART + prow * HEAD_DIM + offs_d, acc)
