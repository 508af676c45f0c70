"""Fused dequantize + split-KV decode attention over a packed KIVI cache on CUDA cores, for GQA groups.

`decode_kivi_simt` serves one query head per KV head. Here one program serves the whole group of query heads
that share a KV head, so each code is unpacked once for the group (uniform 2/4/8-bit codes left in place under
the fp32 magic exponent, one AND a code, as there) and then enters one fused multiply-add per query head for
the score and one for the value sum. The tensor-core word kernel (`decode_kivi_words`) instead writes every
dequantized code to shared memory for its dot; that traffic, not HBM, bounds it (docs/kernel-performance.md).

Per tile of BLOCK_N tokens: the key scale of the tile's group folds into the queries ([G, D]); scores are
sum_c a[g, c] * code[n, c] + q[g] . z, a [G, BLOCK_N, HEAD_DIM] product reduced over channels; values are
scaled per token group once ([BLOCK_N, HEAD_DIM], shared by the group) and summed over tokens with each head's
probabilities, their zeros per token group. Grid, splits, the fp16 tail (`decode_kivi_words._tail_part`) and
the combine pass are the word kernel's: partial states per query head, rows b * HQ + h.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_kivi_simt import _inplace_scale, _load_words, _scaled, _unpack
from .decode_kivi_words import _tail_part


@triton.jit
def _decode_kivi_simt_gqa_kernel(
    Q, KC8, KC, KS, KZ, VC, VS, VZ, KRES, VWIN, KSINK, VSINK, LENS, M_PART, L_PART, ACC_PART,
    qk_scale, H_KV, T_QCAP, R, S, TOKENS_PER_SPLIT, NUM_SPLITS, N_TAIL,
    BITS: tl.constexpr, GROUP: tl.constexpr, HQ_PER_KV: tl.constexpr, HQ_PAD: tl.constexpr,
    TAIL_HQ_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
    TAIL_TOKENS: tl.constexpr, DOT_DTYPE: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """KC / VC: the code rows viewed as int32 (KC8: the key rows as bytes, for the tail); uniform 2/4/8-bit codes.
    HQ_PAD: the group padded to a power of two (main loop); TAIL_HQ_PAD: to >= 16 (the tail's tensor-core dot).
    Programs NUM_SPLITS .. NUM_SPLITS + N_TAIL - 1 of a row take TAIL_TOKENS each of its sinks and window."""
    NGV: tl.constexpr = HEAD_DIM // (GROUP if GROUP < HEAD_DIM else HEAD_DIM)  # value groups per token
    ROW_WORDS: tl.constexpr = HEAD_DIM * BITS // 32
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H_KV
    bh = pid_bh.to(tl.int64)
    seq_len = tl.load(LENS + b)
    n_sink = tl.minimum(seq_len, S)
    rest = seq_len - n_sink
    n_kq = rest - rest % R
    n_vq = rest - tl.minimum(rest, R)
    if split < NUM_SPLITS:
        offs_h = tl.arange(0, HQ_PAD)
        h_mask = offs_h < HQ_PER_KV
        row0 = bh * HQ_PER_KV  # b * HQ + first query head of this KV head
        offs_d = tl.arange(0, HEAD_DIM)
        offs_g = tl.arange(0, NGV)
        q = tl.load(Q + (row0 + offs_h)[:, None] * HEAD_DIM + offs_d[None, :], mask=h_mask[:, None], other=0.0)
        q = q.to(tl.float32) * qk_scale  # [HQ_PAD, D], log2 units
        sc = _inplace_scale(offs_d, BITS)  # 2**-(BITS * (c % H)): the weight of an in-place code
        acc = tl.zeros([HQ_PAD, HEAD_DIM], tl.float32)  # sum_n p_n s_n code_n * 2**j, per head
        acc_z = tl.zeros([HQ_PAD, NGV], tl.float32)  # sum_n p_n z_n per value group, per head
        m_i = tl.full([HQ_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([HQ_PAD], tl.float32)
        start = split * TOKENS_PER_SPLIT
        end = tl.minimum(start + TOKENS_PER_SPLIT, n_vq)
        KH = KC + bh * T_QCAP * ROW_WORDS
        VH = VC + bh * T_QCAP * ROW_WORDS
        VSH = VS + bh * T_QCAP * NGV
        VZH = VZ + bh * T_QCAP * NGV
        for t0 in range(start, end, BLOCK_N):
            rows = t0 + tl.arange(0, BLOCK_N)
            c_mask = rows < end
            kl, kh = _load_words(KH, rows, c_mask, BITS, HEAD_DIM, False)
            vl, vh = _load_words(VH, rows, c_mask, BITS, HEAD_DIM, False)
            vmeta = rows[:, None] * NGV + offs_g[None, :]
            vs = tl.load(VSH + vmeta, mask=c_mask[:, None], other=0.0).to(tl.float32)  # [N, NGV]
            vz = tl.load(VZH + vmeta, mask=c_mask[:, None], other=0.0).to(tl.float32)
            g = bh * (T_QCAP // GROUP) + t0 // GROUP  # the whole tile lies in one key group
            ks = tl.load(KS + g * HEAD_DIM + offs_d).to(tl.float32)
            kz = tl.load(KZ + g * HEAD_DIM + offs_d).to(tl.float32)
            a = q * (ks * sc)[None, :]
            bias = tl.sum(q * kz[None, :], 1)  # [HQ_PAD]
            k = _unpack(kl, kh, BITS, True).to(tl.float32, bitcast=True)  # [N, D]: 2**23 + code * 2**j
            qk = tl.sum(_scaled(k[None, :, :], a[:, None, :], True, FMA), 2) + bias[:, None]  # [HQ_PAD, N]
            qk = tl.where(c_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc_z = acc_z * alpha[:, None]
            m_i = m_new
            v = _unpack(vl, vh, BITS, True).to(tl.float32, bitcast=True)
            # the token's value scale once per code for the whole group: code * 2**j * s_n
            vsc = tl.reshape(tl.broadcast_to(vs[:, :, None], (BLOCK_N, NGV, HEAD_DIM // NGV)), (BLOCK_N, HEAD_DIM))
            v = _scaled(v, vsc, True, FMA)
            acc += tl.sum(p[:, :, None] * v[None, :, :], 1)
            acc_z += tl.sum(p[:, :, None] * vz[None, :, :], 1)
        z = tl.reshape(tl.broadcast_to(acc_z[:, :, None], (HQ_PAD, NGV, HEAD_DIM // NGV)), (HQ_PAD, HEAD_DIM))
        out = acc * sc[None, :] + z
        prow = (row0 + offs_h.to(tl.int64)) * (NUM_SPLITS + N_TAIL) + split
        tl.store(M_PART + prow, m_i, mask=h_mask)
        tl.store(L_PART + prow, l_i, mask=h_mask)
        tl.store(ACC_PART + prow[:, None] * HEAD_DIM + offs_d[None, :], out, mask=h_mask[:, None])
    else:
        t_lo = (split - NUM_SPLITS) * TAIL_TOKENS
        _tail_part(
            Q, KC8, KS, KZ, KRES, VWIN, KSINK, VSINK, M_PART, L_PART, ACC_PART,
            qk_scale, bh, T_QCAP, R, S, n_sink, rest, n_kq, n_vq, split, NUM_SPLITS + N_TAIL, t_lo, t_lo + TAIL_TOKENS,
            BITS, GROUP, HQ_PER_KV, TAIL_HQ_PAD, HEAD_DIM, TAIL_N, DOT_DTYPE,
        )  # fmt: skip
