"""Fused dequantize + split-KV decode attention over a packed KIVI cache (2/3/4/8-bit, uniform or nuq).

Grid (batch * kv_heads, splits + 1). Programs 0..splits-1 stream the region where keys and values are
both quantized (post-sink tokens p < n_vq, see `kivi_layout`): they read packed codes and scales once,
dequantize in registers and run the online softmax. The last program of each row takes the fp16 parts:
the sinks, then p in [n_vq, rest), where values come from the fp16 window and keys from the codes
(p < n_kq) or the fp16 residual ring. `combine._combine` merges all splits.

Keys are per-channel with groups of G tokens; a BLOCK_N tile never straddles a group (G % BLOCK_N == 0),
so the key scale folds into the query: q.k = (q * s_g) . c + q . z_g, one [HQ, D] product per tile
instead of one multiply-add per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvq_core.formats import packed_row_bytes
from kvq_core.packing import unpack
from kvq_core.quant import dequantize, nuq_dequantize

from ._launch import (
    BLOCK_N_RANGE,
    check,
    check_int,
    check_launchable,
    check_pow2,
    check_sm_scale,
    interpreting,
    next_pow2,
    num_splits,
    resident_programs,
)
from .combine import alloc_partials, combine
from .decode_fp16 import LOG2E, _dot
from .decode_kivi_frag import _decode_kivi_frag_kernel
from .decode_kivi_simt import _decode_kivi_simt_kernel
from .decode_kivi_words import _decode_kivi_words_kernel
from .kivi_layout import KiviCache, check_cache
from .kivi_tail import fp16_tail
from .packed import pair_span


@triton.jit
def _slice_code(b0, b1, h, s: tl.constexpr, BITS: tl.constexpr):
    """int32 codes of channel slice s (channels j * PER + s) from the row's bytes, no interleave.

    BITS 2/4/8: b0 = byte j of each row, code at bit BITS * s. BITS 3 (PER 8): b0 / b1 = bytes 2j / 2j + 1
    of the 2-bit plane (channel 8j + s has its low bits in byte 2j + s // 4 at bit 2 * (s % 4)), h = the
    high bits of channels 8j .. 8j + 7 (`_slice_high_bits`; bit s)."""
    if BITS == 3:
        if s < 4:
            lo = (b0 >> (2 * s)) & 3
        else:
            lo = (b1 >> (2 * (s - 4))) & 3
        return lo | (((h >> s) & 1) << 2)
    else:
        return (b0 >> (BITS * s)) & ((1 << BITS) - 1)


@triton.jit
def _slice_high_bits(ROWS, offs_j, n_mask, HEAD_DIM: tl.constexpr):
    """3-bit: bit 2 of channels 8j .. 8j + 7 as bits 0-7 of one int32 [N, W], from the 1-bit plane's nibble pairs
    (`packed`): one nibble of two adjacent bytes of the channels' 32-channel block."""
    H: tl.constexpr = pair_span(HEAD_DIM)
    c0 = 8 * offs_j
    shift = ((c0 % 32) // H) * 4  # the low or the high nibbles
    byte = HEAD_DIM // 4 + (c0 // 32) * 4 + (c0 % H) // 4
    a = tl.load(ROWS + byte[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
    b = tl.load(ROWS + (byte + 1)[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
    return ((a >> shift[None, :]) & 15) | (((b >> shift[None, :]) & 15) << 4)


@triton.jit
def _slice_levels(b0, b1, h, CB, s: tl.constexpr, BITS: tl.constexpr, NUQ: tl.constexpr, OUT: tl.constexpr):
    c = _slice_code(b0, b1, h, s, BITS)
    if NUQ:
        return tl.load(CB + c).to(OUT)
    elif OUT == tl.float16:
        # no int->float conversion (a quarter-rate instruction): 0x6400 | c is the fp16 1024 + c
        # (exact for c < 1024); subtracting 1024 is exact too
        return (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    else:
        return c.to(OUT)


@triton.jit
def _qk_slice(qs, lev, DOT_DTYPE: tl.constexpr, SMALL: tl.constexpr):
    """qs [HQ, W] . lev [N, W]^T -> [HQ, N]; W < 16 (no tl.dot) as a broadcast sum."""
    if SMALL:
        return tl.sum(qs.to(tl.float32)[:, None, :] * lev.to(tl.float32)[None, :, :], 2)
    else:
        return _dot(qs, tl.trans(lev), DOT_DTYPE)


@triton.jit
def _pv_slice(p, v, DOT_DTYPE: tl.constexpr, SMALL: tl.constexpr):
    """p [HQ, N] @ v [N, W] -> [HQ, W]."""
    if SMALL:
        return tl.sum(p.to(tl.float32)[:, :, None] * v.to(tl.float32)[None, :, :], 1)
    else:
        return _dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), DOT_DTYPE)


@triton.jit
def _v_slice(b0, b1, h, CB, VS, VZ, rows, n_mask, p, ps, pz, offs_j, s: tl.constexpr, BITS: tl.constexpr,
             NUQ: tl.constexpr, NGV: tl.constexpr, PER: tl.constexpr, HEAD_DIM: tl.constexpr,
             DOT_DTYPE: tl.constexpr, SMALL: tl.constexpr):  # fmt: skip
    """p @ values of channel slice s: [HQ, W]. NGV == 1: (p * s) . c + p . z with ps = p * s, pz = p . z."""
    if NGV == 1:
        lev = _slice_levels(b0, b1, h, CB, s, BITS, NUQ, DOT_DTYPE)
        return _pv_slice(ps, lev, DOT_DTYPE, SMALL) + pz[:, None]
    else:
        lev = _slice_levels(b0, b1, h, CB, s, BITS, NUQ, tl.float32)
        grp = (offs_j * PER + s) // (HEAD_DIM // NGV)
        mptr = rows[:, None] * NGV + grp[None, :]
        vs = tl.load(VS + mptr, mask=n_mask[:, None], other=0.0).to(tl.float32)
        vz = tl.load(VZ + mptr, mask=n_mask[:, None], other=0.0).to(tl.float32)
        return _pv_slice(p, lev * vs + vz, DOT_DTYPE, SMALL)


@triton.jit
def _store_slice(ACC_PART, prow, h_mask, acc, offs_j, s: tl.constexpr, PER: tl.constexpr, HEAD_DIM: tl.constexpr):
    tl.store(ACC_PART + prow[:, None] * HEAD_DIM + (offs_j * PER + s)[None, :], acc, mask=h_mask[:, None])


@triton.jit
def _decode_kivi_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, KRES, VWIN, KSINK, VSINK, LENS, CB, M_PART, L_PART, ACC_PART,
    qk_scale, H_KV, T_QCAP, R, S, TOKENS_PER_SPLIT, NUM_SPLITS,
    BITS: tl.constexpr, GROUP: tl.constexpr, NUQ: tl.constexpr, HQ_PER_KV: tl.constexpr, HQ_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    ROW_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
    NGV: tl.constexpr = HEAD_DIM // (GROUP if GROUP < HEAD_DIM else HEAD_DIM)
    PER: tl.constexpr = 8 if BITS == 3 else 8 // BITS  # channel slices: PER codes a byte (3-bit: by c % 8)
    W: tl.constexpr = HEAD_DIM // PER
    SMALL: tl.constexpr = W < 16  # too narrow for tl.dot
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H_KV
    bh = pid_bh.to(tl.int64)  # = b * H_KV + h; every base offset below is 64-bit
    seq_len = tl.load(LENS + b)
    n_sink = tl.minimum(seq_len, S)
    rest = seq_len - n_sink
    n_kq = rest - rest % R
    n_vq = rest - tl.minimum(rest, R)

    offs_h = tl.arange(0, HQ_PAD)
    h_mask = offs_h < HQ_PER_KV
    offs_d = tl.arange(0, HEAD_DIM)
    row0 = bh * HQ_PER_KV
    q = tl.load(Q + (row0 + offs_h)[:, None] * HEAD_DIM + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    q = q.to(tl.float32) * qk_scale  # [HQ_PAD, D], log2 units

    m_i = tl.full([HQ_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([HQ_PAD], tl.float32)
    if split < NUM_SPLITS:
        # quantized keys and values: p in [start, min(start + TOKENS_PER_SPLIT, n_vq)). Codes are never
        # interleaved into [BLOCK_N, D]: channel slice s (channels j * PER + s, W = D / PER of them) is
        # extracted from the packed bytes by a shift and a mask, and scores / outputs are sums of per-slice
        # dots against q / acc held in slice order (gathered from / scattered to memory once per program).
        start = split * TOKENS_PER_SPLIT
        end = tl.minimum(start + TOKENS_PER_SPLIT, n_vq)
        offs_j = tl.arange(0, W)
        qrow = Q + (row0 + offs_h)[:, None] * HEAD_DIM
        q0 = tl.load(qrow + (offs_j * PER)[None, :], mask=h_mask[:, None], other=0.0).to(tl.float32) * qk_scale
        a0 = tl.zeros([HQ_PAD, W], tl.float32)
        if PER > 1:
            q1 = tl.load(qrow + (offs_j * PER + 1)[None, :], mask=h_mask[:, None], other=0.0).to(tl.float32) * qk_scale
            a1 = tl.zeros([HQ_PAD, W], tl.float32)
        if PER > 2:
            q2 = tl.load(qrow + (offs_j * PER + 2)[None, :], mask=h_mask[:, None], other=0.0).to(tl.float32) * qk_scale
            q3 = tl.load(qrow + (offs_j * PER + 3)[None, :], mask=h_mask[:, None], other=0.0).to(tl.float32) * qk_scale
            a2 = tl.zeros([HQ_PAD, W], tl.float32)
            a3 = tl.zeros([HQ_PAD, W], tl.float32)
        if PER > 4:
            q4 = tl.load(qrow + (offs_j * PER + 4)[None, :], mask=h_mask[:, None], other=0.0).to(tl.float32) * qk_scale
            q5 = tl.load(qrow + (offs_j * PER + 5)[None, :], mask=h_mask[:, None], other=0.0).to(tl.float32) * qk_scale
            q6 = tl.load(qrow + (offs_j * PER + 6)[None, :], mask=h_mask[:, None], other=0.0).to(tl.float32) * qk_scale
            q7 = tl.load(qrow + (offs_j * PER + 7)[None, :], mask=h_mask[:, None], other=0.0).to(tl.float32) * qk_scale
            a4 = tl.zeros([HQ_PAD, W], tl.float32)
            a5 = tl.zeros([HQ_PAD, W], tl.float32)
            a6 = tl.zeros([HQ_PAD, W], tl.float32)
            a7 = tl.zeros([HQ_PAD, W], tl.float32)
        for t0 in range(start, end, BLOCK_N):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            rows = bh * T_QCAP + offs_n  # int64 row index into [B, H, Tq, ...]
            g = bh * (T_QCAP // GROUP) + t0 // GROUP  # whole tile in one key group
            kz = tl.load(KZ + g * HEAD_DIM + offs_d).to(tl.float32)
            bias = tl.sum(q * kz[None, :], 1)
            ksrow = KS + g * HEAD_DIM + offs_j * PER
            kptr = KC + rows[:, None] * ROW_BYTES
            vptr = VC + rows[:, None] * ROW_BYTES
            if BITS == 3:
                kb0 = tl.load(kptr + (2 * offs_j)[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
                kb1 = tl.load(kptr + (2 * offs_j + 1)[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
                kh = _slice_high_bits(kptr, offs_j, n_mask, HEAD_DIM)
                vb0 = tl.load(vptr + (2 * offs_j)[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
                vb1 = tl.load(vptr + (2 * offs_j + 1)[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
                vh = _slice_high_bits(vptr, offs_j, n_mask, HEAD_DIM)
            else:
                kb0 = tl.load(kptr + offs_j[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
                kb1 = kb0
                kh = kb0
                vb0 = tl.load(vptr + offs_j[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
                vb1 = vb0
                vh = vb0
            qk = bias[:, None] + _qk_slice(
                (q0 * tl.load(ksrow)[None, :]).to(DOT_DTYPE),
                _slice_levels(kb0, kb1, kh, CB, 0, BITS, NUQ, DOT_DTYPE),
                DOT_DTYPE,
                SMALL,
            )
            if PER > 1:
                qk += _qk_slice(
                    (q1 * tl.load(ksrow + 1)[None, :]).to(DOT_DTYPE),
                    _slice_levels(kb0, kb1, kh, CB, 1, BITS, NUQ, DOT_DTYPE),
                    DOT_DTYPE,
                    SMALL,
                )
            if PER > 2:
                qk += _qk_slice(
                    (q2 * tl.load(ksrow + 2)[None, :]).to(DOT_DTYPE),
                    _slice_levels(kb0, kb1, kh, CB, 2, BITS, NUQ, DOT_DTYPE),
                    DOT_DTYPE,
                    SMALL,
                )
                qk += _qk_slice(
                    (q3 * tl.load(ksrow + 3)[None, :]).to(DOT_DTYPE),
                    _slice_levels(kb0, kb1, kh, CB, 3, BITS, NUQ, DOT_DTYPE),
                    DOT_DTYPE,
                    SMALL,
                )
            if PER > 4:
                qk += _qk_slice(
                    (q4 * tl.load(ksrow + 4)[None, :]).to(DOT_DTYPE),
                    _slice_levels(kb0, kb1, kh, CB, 4, BITS, NUQ, DOT_DTYPE),
                    DOT_DTYPE,
                    SMALL,
                )
                qk += _qk_slice(
                    (q5 * tl.load(ksrow + 5)[None, :]).to(DOT_DTYPE),
                    _slice_levels(kb0, kb1, kh, CB, 5, BITS, NUQ, DOT_DTYPE),
                    DOT_DTYPE,
                    SMALL,
                )
                qk += _qk_slice(
                    (q6 * tl.load(ksrow + 6)[None, :]).to(DOT_DTYPE),
                    _slice_levels(kb0, kb1, kh, CB, 6, BITS, NUQ, DOT_DTYPE),
                    DOT_DTYPE,
                    SMALL,
                )
                qk += _qk_slice(
                    (q7 * tl.load(ksrow + 7)[None, :]).to(DOT_DTYPE),
                    _slice_levels(kb0, kb1, kh, CB, 7, BITS, NUQ, DOT_DTYPE),
                    DOT_DTYPE,
                    SMALL,
                )
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if NGV == 1:
                vs = tl.load(VS + rows, mask=n_mask, other=0.0).to(tl.float32)
                vz = tl.load(VZ + rows, mask=n_mask, other=0.0).to(tl.float32)
                ps = (p * vs[None, :]).to(DOT_DTYPE)
                pz = tl.sum(p * vz[None, :], 1)
            else:
                ps = p
                pz = l_i
            a0 = a0 * alpha[:, None] + _v_slice(
                vb0,
                vb1,
                vh,
                CB,
                VS,
                VZ,
                rows,
                n_mask,
                p,
                ps,
                pz,
                offs_j,
                0,
                BITS,
                NUQ,
                NGV,
                PER,
                HEAD_DIM,
                DOT_DTYPE,
                SMALL,
            )
            if PER > 1:
                a1 = a1 * alpha[:, None] + _v_slice(
                    vb0,
                    vb1,
                    vh,
                    CB,
                    VS,
                    VZ,
                    rows,
                    n_mask,
                    p,
                    ps,
                    pz,
                    offs_j,
                    1,
                    BITS,
                    NUQ,
                    NGV,
                    PER,
                    HEAD_DIM,
                    DOT_DTYPE,
                    SMALL,
                )
            if PER > 2:
                a2 = a2 * alpha[:, None] + _v_slice(
                    vb0,
                    vb1,
                    vh,
                    CB,
                    VS,
                    VZ,
                    rows,
                    n_mask,
                    p,
                    ps,
                    pz,
                    offs_j,
                    2,
                    BITS,
                    NUQ,
                    NGV,
                    PER,
                    HEAD_DIM,
                    DOT_DTYPE,
                    SMALL,
                )
                a3 = a3 * alpha[:, None] + _v_slice(
                    vb0,
                    vb1,
                    vh,
                    CB,
                    VS,
                    VZ,
                    rows,
                    n_mask,
                    p,
                    ps,
                    pz,
                    offs_j,
                    3,
                    BITS,
                    NUQ,
                    NGV,
                    PER,
                    HEAD_DIM,
                    DOT_DTYPE,
                    SMALL,
                )
            if PER > 4:
                a4 = a4 * alpha[:, None] + _v_slice(
                    vb0,
                    vb1,
                    vh,
                    CB,
                    VS,
                    VZ,
                    rows,
                    n_mask,
                    p,
                    ps,
                    pz,
                    offs_j,
                    4,
                    BITS,
                    NUQ,
                    NGV,
                    PER,
                    HEAD_DIM,
                    DOT_DTYPE,
                    SMALL,
                )
                a5 = a5 * alpha[:, None] + _v_slice(
                    vb0,
                    vb1,
                    vh,
                    CB,
                    VS,
                    VZ,
                    rows,
                    n_mask,
                    p,
                    ps,
                    pz,
                    offs_j,
                    5,
                    BITS,
                    NUQ,
                    NGV,
                    PER,
                    HEAD_DIM,
                    DOT_DTYPE,
                    SMALL,
                )
                a6 = a6 * alpha[:, None] + _v_slice(
                    vb0,
                    vb1,
                    vh,
                    CB,
                    VS,
                    VZ,
                    rows,
                    n_mask,
                    p,
                    ps,
                    pz,
                    offs_j,
                    6,
                    BITS,
                    NUQ,
                    NGV,
                    PER,
                    HEAD_DIM,
                    DOT_DTYPE,
                    SMALL,
                )
                a7 = a7 * alpha[:, None] + _v_slice(
                    vb0,
                    vb1,
                    vh,
                    CB,
                    VS,
                    VZ,
                    rows,
                    n_mask,
                    p,
                    ps,
                    pz,
                    offs_j,
                    7,
                    BITS,
                    NUQ,
                    NGV,
                    PER,
                    HEAD_DIM,
                    DOT_DTYPE,
                    SMALL,
                )
            m_i = m_new
        prow = (row0 + offs_h.to(tl.int64)) * (NUM_SPLITS + 1) + split
        tl.store(M_PART + prow, m_i, mask=h_mask)
        tl.store(L_PART + prow, l_i, mask=h_mask)
        _store_slice(ACC_PART, prow, h_mask, a0, offs_j, 0, PER, HEAD_DIM)
        if PER > 1:
            _store_slice(ACC_PART, prow, h_mask, a1, offs_j, 1, PER, HEAD_DIM)
        if PER > 2:
            _store_slice(ACC_PART, prow, h_mask, a2, offs_j, 2, PER, HEAD_DIM)
            _store_slice(ACC_PART, prow, h_mask, a3, offs_j, 3, PER, HEAD_DIM)
        if PER > 4:
            _store_slice(ACC_PART, prow, h_mask, a4, offs_j, 4, PER, HEAD_DIM)
            _store_slice(ACC_PART, prow, h_mask, a5, offs_j, 5, PER, HEAD_DIM)
            _store_slice(ACC_PART, prow, h_mask, a6, offs_j, 6, PER, HEAD_DIM)
            _store_slice(ACC_PART, prow, h_mask, a7, offs_j, 7, PER, HEAD_DIM)
    else:
        fp16_tail(
            Q, KC, KS, KZ, KRES, VWIN, KSINK, VSINK, CB, M_PART, L_PART, ACC_PART,
            qk_scale, bh, T_QCAP, R, S, n_sink, rest, n_kq, n_vq, NUM_SPLITS,
            BITS, GROUP, NUQ, HQ_PER_KV, HQ_PAD, HEAD_DIM, BLOCK_N, DOT_DTYPE,
        )  # fmt: skip


#: Channel-slice kernel defaults, from tune_decode.py's grid (BLOCK_N 32/64/128 x 2/4 warps x 1-3 stages) on the
#: H100 at 32/8 heads, head_dim 128, group 128, 128K tokens, batch 1 and 32
#: (reports/measurements/tune_tc_h100_log.txt). BLOCK_N per bit width: 128 for 2/4/8-bit (the fastest at
#: batch 32, within 5-15% of the fastest at batch 1), 32 for 3-bit (the fastest at both). Warps and stages
#: per BLOCK_N, the best at both batches for that tile: 128 -> (4, 1), 64 -> (4, 2), 32 -> (2, 2); 16 is not
#: measured and takes 32's. The earlier fixed default, (64, 4, 3), took 1.6-2.0x as long on those shapes.
TC_BLOCK_N = {2: 128, 3: 32, 4: 128, 8: 128}
TC_WARPS_STAGES = {128: (4, 1), 64: (4, 2), 32: (2, 2), 16: (2, 2)}
#: CUDA-core (MHA) path defaults per bit width, (BLOCK_N, num_warps, num_stages): tune_simt_h100.csv (tune_paths.py
#: --wide, 32/32 heads at 4K and 128K batch 1, 4K batch 32, 32K batch 8; 16-64 tokens, 2-8 warps). 4-bit (32, 2, 1):
#: 24.3 / 300.2 / 333.8 / 658.1 us against (32, 4, 1)'s 26.5 / 320.1 / 361.7 / 664.9 (the former default; (64, 4, 3)
#: before it took 30.0 / 329.8 / 400.0 / 678.8); 3-bit (32, 2, 1): 37.0 / 465.7 / 516.9 / 1098.1 against
#: 37.6 / 524.7 / 570.2 / 1052.8; 2-bit (64, 4, 1) and 8-bit (32, 4, 1) stay (2 warps: 2-bit 28% slower at 128K,
#: 8-bit within 5% either way).
SIMT_CONFIG = {2: (64, 4, 1), 3: (32, 2, 1), 4: (32, 2, 1), 8: (32, 4, 1)}
#: Up to this many tokens (the launch's max_len) the `auto` path runs 2/4-bit uniform GQA on the channel-slice
#: kernel rather than the word kernel: tune_stages_h100.csv, 32/8 heads, slice (128, 4, 1) / words (128, 4, 2):
#: 4-bit 4K batch 1 13.0 / 15.7 us, 1K batch 32 54.1 / 61.3, 1K batch 256 353.6 / 426.2; 2-bit 4K batch 1
#: 12.5 / 14.8, 1K batch 256 340.6 / 418.2. From 8K tokens the word kernel is as fast or faster (the v1 and v3
#: sweeps: 0.86-1.01x the slice kernel's time at 8K-1M, batch 1-256). 3-bit stays on words (the slice kernel
#: reads two planes with byte loads: 4K batch 1 81.0 us against 17.8) and 8-bit too (1K batch 1: 0.79x).
SLICE_MAX_TOKENS = 4096


#: Word-unpack tensor-core path (`decode_kivi_words`) default: H100, 32/8 heads, 128K tokens, batch 1, 4-bit:
#: (128, 4, 2) 171 us, (128, 4, 1) 172, (64, 4, 2) 204, (128, 8, 2) 226 (benchmarks/tune_decode.py).
WORDS_CONFIG = (128, 4, 2)
#: Register cap per (BLOCK_N, num_warps), for 2/4-bit codes over at most WORDS_MAXNREG_ROWS (batch x kv heads)
#: rows. Uncapped, (128, 4) takes 252 registers (2 programs an SM; ncu at 32/8 heads, 128K, batch 1: 12.5%
#: occupancy, 66% of issue slots with no eligible warp). H100, 32/8 heads, 128K, capped / uncapped (us):
#: batch 1: 4-bit 158.8 / 172.7, 2-bit 144.5 / 164.0, 8-bit 241.1 / 169.7; batch 8: 4-bit 1427.8 / 1343.1,
#: 2-bit 1314.4 / 1304.2; batch 32: 4-bit 5025.8 / 4789.4, 2-bit 4427.6 / 4683.6. A cap of 168 took 200.5 us
#: (4-bit, batch 1); 3-bit capped 208 / uncapped 207 us.
WORDS_MAXNREG = {(128, 4): 128}
WORDS_MAXNREG_ROWS = 16
#: The fp16 tail program's tile in the word kernel: its registers count for every program. 32/8 heads, batch 1,
#: 4-bit (us): 4K 19.4 (16) / 17.3 (64) / 24.4 (128); 16K 32.8 / 38.5 / 58.2; 128K 158.8 / 208.5 (64).
WORDS_TAIL_N = 16
#: Fragment-dequantizing tensor-core path (`decode_kivi_frag`) defaults, (BLOCK_N, num_warps, num_stages) per bit
#: width, GQA and MHA alike, and FRAG_FEW_CONFIG for launches over at most FRAG_FEW_ROWS rows (batch x kv heads)
#: of at most FRAG_FEW_MAX_TOKENS tokens. H200, group 128, tune_frag_t_{gqa,mha}_h200.csv (tune_paths.py on this
#: kernel, the codes as the M side of both products, before its commit: commit column b36c7df+fragT), us:
#: - 2/4-bit GQA 32/8, (128, 2, 2) / (128, 4, 2) / (64, 4, 3): 4-bit 1 x 256K 124.1 / 153.9 / 155.9, 2 x 128K
#:   122.0 / 155.0 / 157.7, 4 x 32K 67.0 / 81.0 / 82.8, 1 x 64K 42.9 / 45.9 / 46.8; 1 x 32K 29.7 / 26.8 / 28.8,
#:   1 x 16K 23.3 / 20.0 / 19.1, 1 x 1K 9.0 / 7.7 / 8.6 (2-bit alike: 123.8 / 155.0 / 162.0 at 1 x 256K, 28.1 /
#:   26.0 / 28.9 at 1 x 32K). At 1 x 4K (64, 4, 3) is fastest (4-bit 11.2 against 13.5 at (128, 4, 2)).
#: - 3-bit GQA: (128, 2, 2) 240.9 / 238.7 / 125.5 / 42.1 us at 1 x 256K / 2 x 128K / 4 x 32K / 1 x 32K against
#:   (128, 4, 2)'s 276.3 / 280.1 / 146.6 / 47.9; (128, 4, 2) at 1 x 1K / 4K / 16K 9.2 / 13.7 / 29.1 against 11.5 /
#:   14.8 / 29.9.
#: - 8-bit GQA: (64, 4, 3) within 3% of the fastest launch at every point from 4K (1 x 256K 169.8 against
#:   (128, 4, 2)'s 176.8 and (128, 2, 2)'s 187.8).
#: - MHA 32/32, (128, 2, 2) against the CUDA-core kernel (`decode_kivi_simt`, then the default): 4-bit 1 x 128K 219.4
#:   / 298.0, 8 x 32K 420.4 / 664.6, 128 x 4K 964.8 / 1280.5; 2-bit 221.6 / 244.5, 434.3 / 526.5, 975.5 / 1099.0;
#:   3-bit 445.0 / 476.8, 884.2 / 1190.8, 1842.5 / 2018.7; 8-bit at (64, 4, 3) 320.7 at 1 x 128K and 622.1 at 8 x
#:   32K (the launch 8-bit MHA took there before as well; (128, 2, 2) 335.1 and 656.7), 1429.2 against the CUDA-core
#:   kernel's 1522.7 at 128 x 4K. At 1 x 1K and 4K all launches are within 10% (4-bit 9.6-10.3 and 18.4-20.3).
#:   (These runs' "auto" rows ran this kernel under the dispatch of the time.)
#: - Few rows of 4K-16K tokens (tune_frag_w_h200.csv, tune_paths.py at b51b21b, 32/8 heads, batch 1): (64, 4, 3)
#:   4-bit 11.3 / 19.1 us at 4K / 16K against (128, 4, 2)'s 13.6 / 20.0 and (128, 2, 2)'s 12.6 / 23.3; 2-bit 11.2 /
#:   19.2 against 13.5 / 19.8; at 32K (128, 4, 2) stays fastest (4-bit 26.9 against 28.8), and at 1K too (the
#:   run above: 7.7 against 8.6); 2K was not measured. 3-bit: within 1% of (128, 4, 2) at 4K and 16K (14.0 / 13.9,
#:   29.9 / 29.5), so it keeps that launch. One warp a program ((64, 1, 2-3), (32, 1, 2)) and (64, 2, 2-3),
#:   (128, 2, 3), (32, 2, 2) were slower than the defaults at every point of that run.
#: - One warp a program, once the fp16 tail loop ran at one stage (ab_tailstages_{old,new}_h200.csv, tune_paths.py
#:   at 0016c6d without and with it, one machine): the tail's shared memory had held one-warp launches to 6
#:   (64, 1, 2) or 3 (64, 1, 3) programs an SM; at 8, 4-bit GQA took 1 x 128K 65.7 us at (64, 1, 3) against 69.1
#:   at (128, 2, 2), 8 x 32K 110.8 / 122.8, 32 x 4K 65.5 / 72.1; MHA 4-bit at (64, 1, 2) 193.9 / 219.6 (1 x 128K),
#:   379.1 / 429.3 (8 x 32K), 218.2 / 243.0 (32 x 4K), but 21.6 / 18.7 at 1 x 4K. tune_onewarp_h200.csv (6d8c15b
#:   with the 3-bit half tiles): (64, 1, 3) against (128, 2, 2) at 32 x 32K / 4 x 128K / 8 x 32K, GQA 4-bit 382.8 /
#:   437.5, 196.6 / 224.1, 110.3 / 121.1; 2-bit 409.9 / 456.6, 213.4 / 230.2, 114.3 / 122.7 (1 x 128K 68.3 / 67.1);
#:   MHA 2-bit 1509.5 / 1664.7, 763.7 / 844.2, 391.5 / 439.2 ((64, 1, 2) 3-4% slower). Few rows of 32K keep
#:   (128, 4, 2) (4-bit 27.3 against 29.6 us); 8-bit keeps (64, 4, 3) (one warp 1.05-1.28x its time).
#: - 3-bit as two half tiles (`decode_kivi_frag._halves3`, ab_half3_{old,new}_h200.csv, one machine): the same
#:   (128, 2, 2) launch within 2% of the one-tile read, but half its shared memory, which lets one warp a program
#:   hold 8 programs an SM: (64, 1, 2) GQA 1 x 128K 98.1 us against 128.0 at the one-tile default, 8 x 32K 173.5 /
#:   238.4, 32 x 4K 102.2 / 129.0, 1 x 32K 37.4 / 49.4; MHA 306.6 / 466.0, 613.9 / 886.4, 349.9 / 460.7, 87.4 /
#:   122.2. At 1 x 4K (64, 4, 3) 14.2 us, one warp 19.1-19.3.
#: - FRAG_SMALL_CONFIG, launches over at most FRAG_SMALL_TOKENS tokens in all (rows x max_len) that are not few:
#:   the one-warp launches' loss at MHA 1 x 4K above.
#: - 3-bit few rows (tune_few3_h200.csv, a1992ba, 32/8 heads): (64, 4, 3) at batch 1 1K / 2K / 8K 10.3 / 12.7 /
#:   21.0 us against (128, 2, 2)'s 11.2 / 12.7 / 23.0 and (64, 1, 2)'s 14.5 / 15.6 / 25.0, 2 x 4K 19.4 / 20.8 /
#:   24.6; from 16K (64, 1, 2): 1 x 16K 29.2 (29.1 at (128, 2, 2), 32.4 at (64, 4, 3)), 1 x 32K 38.6 / 40.9 /
#:   52.7, 2 x 16K 37.9 / 38.8 / 50.9. So 3-bit's short launch covers every few-rows cache up to 8K.
#: Against the fragment kernel as it was, the query group as 16 padded rows (ab_frag_t_{gqa,mha}_h200.csv, one run,
#: path "fragt" this kernel, "frag" and "auto" the defaults then): 4-bit GQA 1 x 128K 69.4 against 97.7 us, 8 x 32K
#: 120.3 / 182.3, 32 x 4K 74.2 / 103.9; 2-bit 68.6 / 104.3, 122.6 / 193.7, 73.6 / 108.6; 3-bit 126.6 / 151.9;
#: 8-bit 93.4 / 103.2. The eleventh sweep (kernel_decode_h200_v11.csv) found it slower than the kernels it replaced
#: only at short points: GQA 2/4-bit at 1 x 4K (the slice kernel 12.5 / 12.9 us, this one 13.3 / 13.5), MHA and
#: 3-bit caches of 1K-4K tokens (up to 1.05x).
FRAG_CONFIG = {2: (64, 1, 3), 3: (64, 1, 2), 4: (64, 1, 3), 8: (64, 4, 3)}
FRAG_FEW_CONFIG = {2: (128, 4, 2), 4: (128, 4, 2)}
FRAG_FEW_ROWS = 16
FRAG_FEW_MAX_TOKENS = 32768
#: within the few-rows launches, FRAG_SHORT_CONFIG over more than FRAG_SHORT_TOKENS[bits][0] and at most
#: FRAG_SHORT_TOKENS[bits][1] tokens
FRAG_SHORT_CONFIG = {2: (64, 4, 3), 3: (64, 4, 3), 4: (64, 4, 3)}
FRAG_SHORT_TOKENS = {2: (1024, 16384), 3: (0, 8192), 4: (1024, 16384)}
FRAG_SMALL_CONFIG = {2: (128, 2, 2), 3: (128, 2, 2), 4: (128, 2, 2)}
FRAG_SMALL_TOKENS = 131072
#: prefetch=True has the fragment kernel load each tile's value scales and zeros a tile ahead on launches of at
#: least FRAG_PREFETCH_MIN_WARPS warps (ab_prefetch_h200.csv, tune_paths.py --configs auto:nopf,auto at e04fa28,
#: the kernel with the query group as padded rows, 32/8 heads, 2/3/4/8-bit at 1 x 32K / 1 x 128K / 4 x 128K / 8 x
#: 32K / 32 x 4K): the (64, 4, 2-3) launches took 0.89-1.00x the time (median 0.94; 8-bit 0.89-0.93x), the 2-warp
#: (128, 2, 2) launch 1.03-1.09x (255 registers a thread either way: the prefetched values spill).
FRAG_PREFETCH_MIN_WARPS = 4
#: Container width (bits) the fragment kernel reads a 2/4/8-bit row in (tune_frag8_h200.csv, `--container-bits`):
#: 2-bit codes in 8-bit containers make 4 slices of 32 channels (16-bit: 8 of 16, slower at every launch); 4-bit and
#: 8-bit in 16-bit containers 4 slices of 32 and 2 of 64 (8-bit containers slower).
FRAG_CONTAINER_BITS = {2: 8, 4: 16, 8: 16}
PATHS = ("auto", "frag", "tc", "slice", "simt")


def frag_geometry(bits: int) -> tuple[int, int]:
    """(container bits, codes a container) the fragment kernel reads a row in: FRAG_CONTAINER_BITS for 2/4/8-bit;
    3-bit reads its 2-bit plane's bytes (4 codes each) and merges each with its 4 high bits from the 1-bit plane."""
    if bits == 3:
        return 8, 4
    return FRAG_CONTAINER_BITS[bits], FRAG_CONTAINER_BITS[bits] // bits


def frag_applies(bits: int, head_dim: int, group_size: int, nuq: bool) -> bool:
    """Whether `decode_kivi_frag` reads this layout: uniform 2/3/4/8-bit codes, slices of at least 16 channels
    (a dot's smallest width), rows of whole containers (`frag_geometry`), one value group a row
    (group_size >= head_dim)."""
    if nuq or bits not in (2, 3, 4, 8):
        return False
    container, per = frag_geometry(bits)
    whole = packed_row_bytes(bits, head_dim) * 8 % container == 0
    return head_dim % per == 0 and head_dim // per >= 16 and whole and group_size >= head_dim


def launch_config(path: str, bits: int, group_size: int, rows: int | None = None, max_len: int | None = None
                  ) -> tuple[int, int, int]:  # fmt: skip
    """Default (BLOCK_N, num_warps, num_stages) of a kernel and bit width: "tc" the word-unpack tensor-core kernel
    (`decode_kivi_words`), "frag" the fragment-dequantizing one, "slice" the channel-slice one, "simt" the
    CUDA-core one. rows (batch x kv heads) and max_len (tokens) pick the frag kernel's FRAG_FEW_CONFIG (at most
    FRAG_FEW_ROWS rows of at most FRAG_FEW_MAX_TOKENS tokens), among those FRAG_SHORT_CONFIG (more than
    FRAG_SHORT_TOKENS[bits][0] and at most FRAG_SHORT_TOKENS[bits][1] tokens), and for other launches of at most
    FRAG_SMALL_TOKENS tokens in all FRAG_SMALL_CONFIG; None counts as many. BLOCK_N is halved until it
    divides the group size (tuned with group 128; smaller groups run the smaller tiles' settings)."""
    if path in ("tc", "frag"):
        cfg = WORDS_CONFIG
        if path == "frag":
            known = rows is not None and max_len is not None
            few = known and rows <= FRAG_FEW_ROWS and max_len <= FRAG_FEW_MAX_TOKENS
            lo, hi = FRAG_SHORT_TOKENS.get(bits, (0, 0))  # FRAG_SHORT_CONFIG's bit widths
            if few and lo < max_len <= hi:
                cfg = FRAG_SHORT_CONFIG[bits]
            elif few and bits in FRAG_FEW_CONFIG:
                cfg = FRAG_FEW_CONFIG[bits]
            elif known and not few and rows * max_len <= FRAG_SMALL_TOKENS and bits in FRAG_SMALL_CONFIG:
                cfg = FRAG_SMALL_CONFIG[bits]
            else:
                cfg = FRAG_CONFIG[bits]
        bn = cfg[0]
        while bn > 16 and (bn > group_size or group_size % bn):
            bn //= 2
        return bn, cfg[1], cfg[2]
    bn = TC_BLOCK_N.get(bits, 64) if path == "slice" else SIMT_CONFIG[bits][0]
    while bn > 1 and (bn > group_size or group_size % bn):
        bn //= 2
    if path == "slice":
        return (bn, *TC_WARPS_STAGES.get(bn, (4, 3)))
    return bn, SIMT_CONFIG[bits][1], SIMT_CONFIG[bits][2]


def kernel_path(
    path: str,
    bits: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    nuq: bool,
    max_len: int,
    group_size: int,
) -> str:
    """The kernel a `decode_kivi` call runs: "simt" (CUDA cores), "frag" (codes dequantized in the MMA operand
    registers), "tc" (the word kernel) or "slice" (channel slices), from its `path` argument and the cache's
    shape. "frag" runs only where `frag_applies`. "tc" names the word kernel only where its whole-word
    layout applies to uniform codes; nuq codebooks and other layouts run the slice kernel. "auto": frag where it
    applies (GQA and MHA; FRAG_CONFIG's note gives the measurements); otherwise simt for
    MHA where its word layout applies, and for GQA the slice kernel for 2/4-bit caches of at most SLICE_MAX_TOKENS
    tokens, else tc."""
    simt_ok = q_heads == kv_heads and (head_dim * bits) % 32 == 0 and head_dim // (16 if bits == 3 else 32 // bits) >= 2
    if path == "simt" and not simt_ok:
        raise ValueError(
            "path='simt' needs one query head per KV head and head_dim * bits a multiple of 32 (>= 2 words)"
        )
    frag = frag_applies(bits, head_dim, group_size, nuq)
    if path == "frag":
        if not frag:
            raise ValueError(
                "path='frag' needs uniform 2/3/4/8-bit codes, channel slices of >= 16 channels (head_dim / "
                "codes a container, frag_geometry) and group_size >= head_dim"
            )
        return "frag"
    if path == "simt":
        return "simt"
    if path == "auto" and frag:
        return "frag"
    if path == "auto" and simt_ok:
        return "simt"
    # whole int32 words per row (3-bit: whole words of each plane)
    words_ok = (head_dim * bits) % 32 == 0 and (bits != 3 or head_dim % 32 == 0)
    if path == "slice" or nuq or not words_ok:
        return "slice"
    if path == "auto" and bits in (2, 4) and max_len <= SLICE_MAX_TOKENS:
        return "slice"  # short caches: the slice kernel is faster than the word kernel (SLICE_MAX_TOKENS)
    return "tc"


def _maxnreg(block_n: int, num_warps: int, bits: int, rows: int) -> dict:
    cap = WORDS_MAXNREG.get((block_n, num_warps))
    use = cap and bits in (2, 4) and rows <= WORDS_MAXNREG_ROWS and not interpreting()
    return {"maxnreg": cap} if use else {}


@dataclass(frozen=True)
class LaunchPlan:
    """What a `decode_kivi` call launches (`launch_plan`): the kernel path ("simt", "frag", "tc", "slice"), its tile
    of BLOCK_N tokens, warps and stages, the context splits and their tokens, the fp16-tail programs per row, and
    the programs per SM the compiled kernel keeps resident (`resident_programs`), which sized the splits; 0 where
    none was needed (`splits` given, or the CUDA-core kernel, whose split rule does not fill waves)."""

    path: str
    block_n: int
    num_warps: int
    num_stages: int
    splits: int
    tokens_per_split: int
    tail_programs: int
    resident_programs: int


def launch_plan(
    q: torch.Tensor,
    cache: KiviCache,
    splits: int | None = None,
    block_n: int | None = None,
    max_len: int | None = None,
    validate_lens: bool = True,
    num_warps: int | None = None,
    num_stages: int | None = None,
    path: str = "auto",
    prefetch: bool = True,
    defer: bool = True,
) -> LaunchPlan:
    """The `LaunchPlan` of `decode_kivi(q, cache, ...)` with these arguments, after the same checks (ValueError
    on bad input); compiles the kernel (no launch) the first time a launch config needs its resources."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [batch, query_heads, head_dim] tensor, got {getattr(q, 'shape', type(q))}")
    batch, hq, d = q.shape
    longest = check_cache(cache, q.device, validate_lens)
    check("q", q, (torch.float16, torch.float32), (cache.batch, hq, cache.head_dim))
    check_launchable(q.device)
    h_kv = cache.kv_heads
    if hq < 1 or hq % h_kv:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of kv heads ({h_kv})")
    if splits is not None:
        check_int("splits", splits, 1)
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    g = cache.group_size
    if max_len is None:
        max_len = cache.quant_capacity
    else:
        check_int("max_len", max_len, 0, cache.capacity)
        n_vq = cache.counts(longest)["n_vq"] if longest is not None else 0
        if max_len < n_vq:
            raise ValueError(
                f"max_len ({max_len}) is below the {n_vq} quantized tokens of the longest sequence ({longest} "
                "tokens), whose attention would be cut short; pass max_len >= max(lens) or leave it None"
            )
    rows = batch * h_kv
    kernel = kernel_path(path, cache.bits, hq, h_kv, d, cache.codebook is not None, max_len, g)
    simt = kernel == "simt"
    bn0, warps0, stages0 = launch_config(kernel, cache.bits, g, rows, max_len)
    block_n = bn0 if block_n is None else check_pow2("block_n", block_n, *BLOCK_N_RANGE)
    num_warps = warps0 if num_warps is None else check_pow2("num_warps", num_warps, 1, 32)
    num_stages = stages0 if num_stages is None else check_int("num_stages", num_stages, 1, 8)
    if g % block_n:
        raise ValueError(f"block_n ({block_n}) must divide group_size ({g}): a tile never straddles a key group")
    if not simt and _dot_dtype(q) == tl.float16 and d < 32 and cache.bits < 8:
        # measured on an H100: fp16 q at head_dim 16 with 2/3/4-bit codes gave errors of 0.3-1.6 against the
        # fp64 reference (fp32 q, 8-bit codes, head_dim >= 32 and the CUDA-core path: at most 6e-4)
        raise ValueError(
            f"the tensor-core path gives wrong attention for fp16 q at head_dim {d} with {cache.bits}-bit codes; "
            "pass q in fp32, or path='simt' (one query head per KV head)"
        )
    # the CUDA-core kernel is latency-bound per program: 8 waves of programs measured faster than 4 (tune_decode.py)
    n_split = splits or num_splits(rows, max_len, block_n, q.device, waves=8 if simt else 4, fill=not simt)
    # CUDA-core, fragment and word kernels: the sinks and fp16 window are shared by ceil((S + R) / 32) programs
    n_tail = triton.cdiv(cache.sink_tokens + cache.residual_tokens, TAIL_TOKENS) if kernel != "slice" else 1
    plan = LaunchPlan(kernel, block_n, num_warps, num_stages, n_split, 0, n_tail, 0)
    resident = 0
    if splits is None and not simt:
        # whole waves of the programs an SM holds at once: the compiled kernel's registers and shared memory
        placeholder = torch.empty(0, dtype=torch.float32, device=q.device)
        fn, args, kwargs = kernel_call(plan, q, cache, 1.0, (placeholder,) * 3, prefetch, defer)
        resident = resident_programs(fn, args, kwargs, q.device)
        n_split = num_splits(rows, max_len, block_n, q.device, waves=4, fill=True, resident=resident)
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_len, 1), n_split), block_n) * block_n
    n_split = max(1, triton.cdiv(max(max_len, 1), tokens_per_split))
    return LaunchPlan(kernel, block_n, num_warps, num_stages, n_split, tokens_per_split, n_tail, resident)


#: tokens of the fp16 tail (sinks, residual window) one tail program takes
TAIL_TOKENS = 32


def _dot_dtype(q: torch.Tensor):
    return tl.float32 if (q.dtype == torch.float32 or interpreting()) else tl.float16


def kernel_call(plan: LaunchPlan, q, cache: KiviCache, scale: float, partials, prefetch: bool, defer: bool):
    """(Triton kernel, positional arguments, keyword arguments) of a plan's main launch over grid (batch * kv heads,
    splits + tail programs); partials: (m, l, acc) from `combine.alloc_partials`; scale: sm_scale * log2(e)."""
    c, (m, l_part, acc) = cache, partials
    hq, d, h_kv, g = q.shape[1], q.shape[2], cache.kv_heads, cache.group_size
    cb = c.codebook if c.codebook is not None else c.k_scale  # unused pointer when uniform
    lengths = (c.quant_capacity, c.residual_tokens, c.sink_tokens, plan.tokens_per_split, plan.splits)
    launch = dict(num_warps=plan.num_warps, num_stages=plan.num_stages)
    common = dict(BITS=c.bits, GROUP=g, HEAD_DIM=d, BLOCK_N=plan.block_n, DOT_DTYPE=_dot_dtype(q), **launch)
    gqa = dict(HQ_PER_KV=hq // h_kv, HQ_PAD=max(16, next_pow2(hq // h_kv)))
    if plan.path == "simt":
        args = (q, c.k_codes, c.k_codes.view(torch.int32), c.k_scale, c.k_zero, c.v_codes.view(torch.int32),
                c.v_scale, c.v_zero, c.k_res, c.v_win, c.k_sink, c.v_sink, c.lens, cb, m, l_part, acc, scale, h_kv,
                *lengths, plan.tail_programs)  # fmt: skip
        kw = dict(NUQ=c.codebook is not None, TAIL_TOKENS=TAIL_TOKENS, PREFETCH=prefetch, DEFER=defer,
                  FMA=not interpreting(), **common)  # fmt: skip
        return _decode_kivi_simt_kernel, args, kw
    if plan.path == "frag":
        container, per = frag_geometry(c.bits)
        # 3-bit: the 2-bit plane's bytes, zero-extended into the kernel's 16-bit containers
        cdt = torch.uint8 if c.bits == 3 else torch.int8 if container == 8 else torch.int16
        args = (q, c.k_codes, c.k_codes.view(cdt), c.k_scale, c.k_zero, c.v_codes, c.v_codes.view(cdt), c.v_scale,
                c.v_zero, c.k_res, c.v_win, c.k_sink, c.v_sink, c.lens, m, l_part, acc, scale, h_kv, *lengths,
                plan.tail_programs)  # fmt: skip
        kw = dict(TAIL_N=WORDS_TAIL_N, TAIL_TOKENS=TAIL_TOKENS, ASM=not interpreting(), PER=per,
                  ROW=c.k_codes.shape[-1] * 8 // container, GP=max(8, next_pow2(hq // h_kv)),
                  PREFETCH=prefetch and plan.num_warps >= FRAG_PREFETCH_MIN_WARPS, **gqa, **common)  # fmt: skip
        return _decode_kivi_frag_kernel, args, kw
    if plan.path == "tc":
        args = (q, c.k_codes, c.k_codes.view(torch.int32), c.k_scale, c.k_zero, c.v_codes.view(torch.int32),
                c.v_scale, c.v_zero, c.k_res, c.v_win, c.k_sink, c.v_sink, c.lens, cb, m, l_part, acc, scale, h_kv,
                *lengths, plan.tail_programs)  # fmt: skip
        kw = dict(TAIL_N=WORDS_TAIL_N, TAIL_TOKENS=TAIL_TOKENS, ASM=not interpreting(), **gqa, **common,
                  **_maxnreg(plan.block_n, plan.num_warps, c.bits, q.shape[0] * h_kv))  # fmt: skip
        return _decode_kivi_words_kernel, args, kw
    args = (q, c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero, c.k_res, c.v_win, c.k_sink, c.v_sink,
            c.lens, cb, m, l_part, acc, scale, h_kv, *lengths)  # fmt: skip
    return _decode_kivi_kernel, args, dict(NUQ=c.codebook is not None, **gqa, **common)


def decode_kivi(
    q: torch.Tensor,
    cache: KiviCache,
    sm_scale: float | None = None,
    splits: int | None = None,
    block_n: int | None = None,
    max_len: int | None = None,
    validate_lens: bool = True,
    num_warps: int | None = None,
    num_stages: int | None = None,
    path: str = "auto",
    prefetch: bool = True,
    defer: bool = True,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over a packed KIVI cache (`kivi_layout.KiviCache`).

    q: [batch, query_heads, head_dim] fp16 (fp32 for CPU tests); query head j reads KV head
    j // (query_heads // kv_heads) (GQA; MHA when equal). Uniform codes dequantize as c * scale + zero,
    nuq codes (cache.codebook set) as codebook[c] * scale + zero. sm_scale: a positive number, default
    1/sqrt(head_dim). splits: >= 1 (default: waves of programs over the SMs). max_len (tokens) sizes the
    splits: at least the most quantized tokens (n_vq, see `kivi_layout`) of any sequence, which max(lens)
    always is; default the quantized capacity (no host sync). validate_lens=True reads lens on the host
    (one device sync) to check them against the capacity and max_len; False skips that sync (for
    CUDA-graph capture): the caller then guarantees them. path: "tc" (tensor cores, any GQA group:
    `decode_kivi_words` for uniform codes, channel slices for nuq), "frag" (`decode_kivi_frag`: uniform
    2/3/4/8-bit, `frag_applies`), "slice" (channel slices always), "simt" (CUDA cores, `decode_kivi_simt`; one
    query head per KV head only) or "auto" (`kernel_path`: frag where it applies, GQA and MHA; otherwise simt for
    MHA, slices for GQA 2/4-bit caches of at most SLICE_MAX_TOKENS tokens, the rest on tc). block_n (a power of two in [16, 256]
    dividing group_size), num_warps (1-32, a power of two) and num_stages (1-8) left None take the path's measured
    defaults (`launch_config`). NaN/Inf in q or the fp16 parts of the cache are not checked (a sync per call): they
    propagate to the output. prefetch and defer pick loop variants, for timing them against each other (the
    attention is the same): prefetch loads the next tile ahead (the CUDA-core kernel's code words; the fragment
    kernel's value scales and zeros, on launches of at least FRAG_PREFETCH_MIN_WARPS warps), defer has the CUDA-core
    kernel keep per-token sums and reduce them once a program. Returns [batch, query_heads, head_dim] in q's dtype.
    """
    check_sm_scale(sm_scale)
    plan = launch_plan(q, cache, splits, block_n, max_len, validate_lens, num_warps, num_stages, path, prefetch, defer)
    return combine(*decode_kivi_state(q, cache, plan, sm_scale, prefetch, defer), torch.empty_like(q))


def decode_kivi_state(q: torch.Tensor, cache: KiviCache, plan: LaunchPlan, sm_scale=None, prefetch=True, defer=True):
    """The softmax state (m, l, acc) per split that `decode_kivi` combines (log2 units, `combine.alloc_partials`
    shapes), from one launch of `plan` (`launch_plan(q, cache, ...)`); for callers that merge states themselves."""
    batch, hq, d = q.shape
    partials = alloc_partials(batch * hq, plan.splits + plan.tail_programs, d, q.device)
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    fn, args, kwargs = kernel_call(plan, q, cache, scale, partials, prefetch, defer)
    fn[(batch * cache.kv_heads, plan.splits + plan.tail_programs)](*args, **kwargs)
    return partials


def dequantize_cache(cache: KiviCache, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence b's keys and values [H, T, D] in token order (fp32), dequantized by kvq_core (the spec)."""
    c, t = cache, int(cache.lens[b])
    n = c.counts(t)
    d, g, r, bits = c.head_dim, c.group_size, c.residual_tokens, c.bits

    def deq(codes, scale, zero, axis):
        if codes.shape[1] == 0:  # kvq_core.packing.unpack cannot reshape 0 rows
            return torch.zeros(codes.shape[0], 0, d, device=codes.device)
        u = unpack(codes, bits, d)
        if c.codebook is None:
            return dequantize(u, scale, zero, bits, axis=axis, group_size=g)
        return nuq_dequantize(u, c.codebook, scale, zero, axis=axis, group_size=g)

    kq = deq(
        c.k_codes[b, :, : n["n_kq"]], c.k_scale[b, :, : n["n_kq"] // g], c.k_zero[b, :, : n["n_kq"] // g], "channel"
    )
    vq = deq(c.v_codes[b, :, : n["n_vq"]], c.v_scale[b, :, : n["n_vq"]], c.v_zero[b, :, : n["n_vq"]], "token")
    kr = c.k_res[b, :, [p % r for p in range(n["n_kq"], n["rest"])]].float()
    vw = c.v_win[b, :, [p % r for p in range(n["n_vq"], n["rest"])]].float()
    s = n["sinks"]
    k = torch.cat([c.k_sink[b, :, :s].float(), kq, kr], dim=1)
    v = torch.cat([c.v_sink[b, :, :s].float(), vq, vw], dim=1)
    return k, v


def decode_kivi_reference(q: torch.Tensor, cache: KiviCache, sm_scale=None, dtype=torch.float64) -> torch.Tensor:
    """The spec: attention in `dtype` over kvq_core's dequantization of the cache; shapes as `decode_kivi`."""
    batch, hq, d = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    rep = hq // cache.kv_heads
    out = torch.zeros(batch, hq, d, dtype=dtype, device=q.device)
    for b in range(batch):
        k, v = dequantize_cache(cache, b)
        if k.shape[1] == 0:
            continue
        k = k.to(dtype).repeat_interleave(rep, dim=0)
        v = v.to(dtype).repeat_interleave(rep, dim=0)
        s = torch.einsum("hd,hnd->hn", q[b].to(dtype), k) * scale
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(s, dim=-1), v)
    return out
