"""Experiment: the word kernel with the codes as the A operand of the MMAs (S^T = K Q^T, O^T = V^T P^T)."""

import triton
import triton.language as tl

from kvq_kernels.decode_fp16 import _dot
from kvq_kernels.decode_kivi_words import _high_bits, _tail_part, pair_order, unpack_words


@triton.jit
def words_swap_kernel(
    Q, KC, KW, KS, KZ, VW, VS, VZ, KRES, VWIN, KSINK, VSINK, LENS, CB, M_PART, L_PART, ACC_PART,
    qk_scale, H_KV, T_QCAP, R, S, TOKENS_PER_SPLIT, NUM_SPLITS, N_TAIL,
    BITS: tl.constexpr, GROUP: tl.constexpr, HQ_PER_KV: tl.constexpr, HQ_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, TAIL_TOKENS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ASM: tl.constexpr, VA: tl.constexpr = False,
):  # fmt: skip
    ROW_WORDS: tl.constexpr = HEAD_DIM * BITS // 32
    HEAD_DIM // (GROUP if GROUP < HEAD_DIM else HEAD_DIM)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H_KV
    bh = pid_bh.to(tl.int64)
    seq_len = tl.load(LENS + b)
    n_sink = tl.minimum(seq_len, S)
    rest = seq_len - n_sink
    n_kq = rest - rest % R
    n_vq = rest - tl.minimum(rest, R)
    offs_h = tl.arange(0, HQ_PAD)
    h_mask = offs_h < HQ_PER_KV
    row0 = bh * HQ_PER_KV
    if split < NUM_SPLITS:
        start = split * TOKENS_PER_SPLIT
        end = tl.minimum(start + TOKENS_PER_SPLIT, n_vq)
        ch = pair_order(HEAD_DIM, BITS)
        LO_WORDS: tl.constexpr = HEAD_DIM // 16 if BITS == 3 else ROW_WORDS
        offs_w = tl.arange(0, LO_WORDS)
        # q^T [D, HQ_PAD] in pair order
        qT = tl.load(Q + (row0 + offs_h)[None, :] * HEAD_DIM + ch[:, None], mask=h_mask[None, :], other=0.0)
        qT = qT.to(tl.float32) * qk_scale
        m_i = tl.full([HQ_PAD], float("-inf"), tl.float32)
        l_n = tl.zeros([BLOCK_N, HQ_PAD], tl.float32)
        z_n = tl.zeros([BLOCK_N, HQ_PAD], tl.float32)
        accT = tl.zeros([HEAD_DIM, HQ_PAD], tl.float32)
        acc = tl.zeros([HQ_PAD, HEAD_DIM], tl.float32)
        kw_base = KW + bh * T_QCAP * ROW_WORDS
        vw_base = VW + bh * T_QCAP * ROW_WORDS
        g_base = bh * (T_QCAP // GROUP)
        g0 = (g_base + start // GROUP) * HEAD_DIM + ch
        any_tile = (ch * 0 + start) < end
        qsT = (qT * tl.load(KS + g0, mask=any_tile, other=0.0).to(tl.float32)[:, None]).to(DOT_DTYPE)
        bias = tl.sum(qT * tl.load(KZ + g0, mask=any_tile, other=0.0).to(tl.float32)[:, None], 0)
        for t0 in range(start, end, BLOCK_N):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            wptr = offs_n[:, None] * ROW_WORDS + offs_w[None, :]
            kw = tl.load(kw_base + wptr, mask=n_mask[:, None], other=0)
            vw = tl.load(vw_base + wptr, mask=n_mask[:, None], other=0)
            kh = kw
            vh = vw
            if BITS == 3:
                hptr = offs_n[:, None] * ROW_WORDS + (LO_WORDS + offs_w // 2)[None, :]
                kh = _high_bits(tl.load(kw_base + hptr, mask=n_mask[:, None], other=0), offs_w)
                vh = _high_bits(tl.load(vw_base + hptr, mask=n_mask[:, None], other=0), offs_w)
            if (t0 % GROUP == 0) & (t0 != start):
                g = g_base + t0 // GROUP
                qsT = (qT * tl.load(KS + g * HEAD_DIM + ch).to(tl.float32)[:, None]).to(DOT_DTYPE)
                bias = tl.sum(qT * tl.load(KZ + g * HEAD_DIM + ch).to(tl.float32)[:, None], 0)
            k_lev = unpack_words(kw, kh, BITS, ASM)  # [N, D]
            sT = bias[None, :] + _dot(k_lev.to(DOT_DTYPE), qsT, DOT_DTYPE)  # [N, HQ_PAD]
            sT = tl.where(n_mask[:, None], sT, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sT, 0))
            alpha = tl.exp2(m_i - m_new)
            pT = tl.exp2(sT - m_new[None, :])
            l_n = l_n * alpha[None, :] + pT
            rows = bh * T_QCAP + offs_n
            v_lev = unpack_words(vw, vh, BITS, ASM)
            vs = tl.load(VS + rows, mask=n_mask, other=0.0).to(tl.float32)
            vz = tl.load(VZ + rows, mask=n_mask, other=0.0).to(tl.float32)
            z_n = z_n * alpha[None, :] + pT * vz[:, None]
            pvs = (pT * vs[:, None]).to(DOT_DTYPE)
            if VA:
                accT = accT * alpha[None, :] + _dot(tl.trans(v_lev.to(DOT_DTYPE)), pvs, DOT_DTYPE)
            else:
                acc = acc * alpha[:, None] + _dot(tl.trans(pvs), v_lev.to(DOT_DTYPE), DOT_DTYPE)
            m_i = m_new
        l_i = tl.sum(l_n, 0)
        if VA:
            acc = tl.trans(accT)
        acc += tl.trans(tl.sum(z_n, 0)[None, :])  # [HQ_PAD, 1]
        prow = (row0 + offs_h.to(tl.int64)) * (NUM_SPLITS + N_TAIL) + split
        tl.store(M_PART + prow, m_i, mask=h_mask)
        tl.store(L_PART + prow, l_i, mask=h_mask)
        tl.store(ACC_PART + prow[:, None] * HEAD_DIM + ch[None, :], acc, mask=h_mask[:, None])
    else:
        t_lo = (split - NUM_SPLITS) * TAIL_TOKENS
        _tail_part(
            Q, KC, KS, KZ, KRES, VWIN, KSINK, VSINK, M_PART, L_PART, ACC_PART,
            qk_scale, bh, T_QCAP, R, S, n_sink, rest, n_kq, n_vq, split, NUM_SPLITS + N_TAIL, t_lo, t_lo + TAIL_TOKENS,
            BITS, GROUP, HQ_PER_KV, HQ_PAD, HEAD_DIM, TAIL_N, DOT_DTYPE,
        )  # fmt: skip
