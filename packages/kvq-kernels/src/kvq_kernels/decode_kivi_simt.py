"""Fused dequantize + split-KV decode attention over a packed KIVI cache on CUDA cores (one query head per KV head).

With one query head per KV head (MHA), a tensor-core dot would pad the query to 16 rows and need
the dequantized tile rewritten into its operand layout through shared memory; both cost more than
the arithmetic. Here each program streams 32-bit words of codes instead: a word holds PER = 32 / BITS
channels of one token (channel c at word c // PER, bit BITS * (c % PER), which is
`kvq_core.packing`'s byte order read little-endian; 3-bit: the 2-bit plane's words plus the 1-bit
plane's bits, gathered from its nibble pairs into channel order, `packed.high_bits16`). Codes become exact fp32
without an int->float conversion: the bits 0x4B000000 | c are the float 2**23 + c, and one subtraction leaves c. Uniform codes stay where
they sit in their 16-bit half (one AND a code, `_c`); a 3-bit code is its two planes read that way, the
2-bit part and 4 x the 1-bit part, each with its own per-channel power of two, so neither plane is
shifted into the other (nuq 3-bit codes, which index a codebook, are assembled as integers instead).

Scores are q.k = sum_c (q_c s_c) code_c + q.z (key scale folded into the query once per tile, as
in `decode_kivi`); values accumulate as sum_n (p_n s_n) code_n + sum_n p_n z_n. Grid, splits, the
fp16 tail program and the combine pass are `decode_kivi`'s.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kivi_tail import fp16_tail_one_head
from .packed import high_bits16, nibbles16

MAGIC = tl.constexpr(0x4B000000)  # fp32 bits of 2**23
TWO_23 = tl.constexpr(8388608.0)


@triton.jit
def _c(x, s: tl.constexpr, BITS: tl.constexpr, INPLACE: tl.constexpr):
    """Code s of each word: shifted down (the int code), or, INPLACE, left where it sits within its 16-bit
    half and or-ed with MAGIC: the fp32 2**23 + code * 2**(BITS * (s % H)), H = 16 // BITS codes a half
    (one AND-OR per code; `_inplace_scale` undoes the power of two)."""
    if INPLACE:
        H: tl.constexpr = 16 // BITS
        # (x | MAGIC) & (mask | MAGIC) == (x & mask) | MAGIC: one AND with an immediate per code
        if s < H:
            return (x | MAGIC) & ((((1 << BITS) - 1) << (BITS * s)) | 0x4B000000)
        else:
            return ((x >> 16) | MAGIC) & ((((1 << BITS) - 1) << (BITS * (s - H))) | 0x4B000000)
    else:
        return (x >> (BITS * s)) & ((1 << BITS) - 1)


@triton.jit
def _inplace_scale(offs_d, BITS: tl.constexpr):
    """2**-(BITS * (c % H)) per channel c (H = 16 // BITS): the weight of an INPLACE code."""
    return tl.exp2(-(BITS * (offs_d % (16 // BITS))).to(tl.float32))


@triton.jit
def _spread(x, BITS: tl.constexpr, INPLACE: tl.constexpr = False):
    """int32 words [N, W] -> codes [N, W * PER] in channel order (PER = 32 / BITS; channel k of word w at bit BITS * k).

    join() adds a minor dimension held in registers; joining (evens, odds) recursively (bit-reversed
    leaves) makes the flattened index equal the channel, so the final reshape moves no data.
    """
    N: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    if BITS == 1:  # 32 channels a word: the even channels' tree joined with the odd ones'
        return tl.reshape(tl.join(_codes16(x, 0, 2, 1, INPLACE), _codes16(x, 1, 2, 1, INPLACE)), (N, W * 32))
    elif BITS == 8:
        y = tl.join(
            tl.join(_c(x, 0, 8, INPLACE), _c(x, 2, 8, INPLACE)), tl.join(_c(x, 1, 8, INPLACE), _c(x, 3, 8, INPLACE))
        )
        return tl.reshape(y, (N, W * 4))
    elif BITS == 4:
        e = tl.join(
            tl.join(_c(x, 0, 4, INPLACE), _c(x, 4, 4, INPLACE)), tl.join(_c(x, 2, 4, INPLACE), _c(x, 6, 4, INPLACE))
        )
        o = tl.join(
            tl.join(_c(x, 1, 4, INPLACE), _c(x, 5, 4, INPLACE)), tl.join(_c(x, 3, 4, INPLACE), _c(x, 7, 4, INPLACE))
        )
        return tl.reshape(tl.join(e, o), (N, W * 8))
    else:  # BITS 2: 16 channels a word
        return tl.reshape(_codes16(x, 0, 1, 2, INPLACE), (N, W * 16))


@triton.jit
def _codes16(x, s0: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr, INPLACE: tl.constexpr):
    """[..., 16] whose index k holds code s0 + step * k of each word (`_c`)."""
    return _tree16(
        _c(x, s0, BITS, INPLACE), _c(x, s0 + step, BITS, INPLACE), _c(x, s0 + 2 * step, BITS, INPLACE),
        _c(x, s0 + 3 * step, BITS, INPLACE), _c(x, s0 + 4 * step, BITS, INPLACE), _c(x, s0 + 5 * step, BITS, INPLACE),
        _c(x, s0 + 6 * step, BITS, INPLACE), _c(x, s0 + 7 * step, BITS, INPLACE), _c(x, s0 + 8 * step, BITS, INPLACE),
        _c(x, s0 + 9 * step, BITS, INPLACE), _c(x, s0 + 10 * step, BITS, INPLACE),
        _c(x, s0 + 11 * step, BITS, INPLACE), _c(x, s0 + 12 * step, BITS, INPLACE),
        _c(x, s0 + 13 * step, BITS, INPLACE), _c(x, s0 + 14 * step, BITS, INPLACE),
        _c(x, s0 + 15 * step, BITS, INPLACE),
    )  # fmt: skip


@triton.jit
def _tree16(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
    """[..., 16] whose index k holds c_k: join puts its new axis last, so each level pairs the indices that
    differ in their highest remaining bit (bit-reversed leaves)."""
    e0 = tl.join(tl.join(c0, c8), tl.join(c4, c12))
    e1 = tl.join(tl.join(c2, c10), tl.join(c6, c14))
    o0 = tl.join(tl.join(c1, c9), tl.join(c5, c13))
    o1 = tl.join(tl.join(c3, c11), tl.join(c7, c15))
    return tl.join(tl.join(e0, e1), tl.join(o0, o1))


@triton.jit
def _load_words(BASE, rows, n_mask, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, PLANES: tl.constexpr):
    """The int32 words of N code rows (`BASE` + rows * row words; rows int32 within one head, BASE that
    head's first word, so that offsets are 32-bit): (lo, hi), hi only for 3-bit (else lo). 3-bit: hi holds bit 2
    of the channels in channel order, from the 1-bit plane's nibble pairs (`packed`): with PLANES, HEAD_DIM // 32
    words of 32 channels (channel 32 k + i at bit i of word k; each stored word holds the same 32 channels, its
    low nibbles first); else one word per 2-bit-plane word w, its 16 channels 16 w + i at bit i
    (`packed.high_bits16`)."""
    ROW_WORDS: tl.constexpr = HEAD_DIM * BITS // 32
    if BITS == 3:
        W: tl.constexpr = HEAD_DIM // 16  # 2-bit plane words; the 1-bit plane's HEAD_DIM // 32 follow
        offs_w = tl.arange(0, W)
        row = BASE + rows[:, None] * ROW_WORDS
        lo = tl.load(row + offs_w[None, :], mask=n_mask[:, None], other=0)
        if PLANES:
            hw = tl.load(row + (W + tl.arange(0, HEAD_DIM // 32))[None, :], mask=n_mask[:, None], other=0)
            hi = nibbles16(hw) | (nibbles16(hw >> 4) << 16)
        else:
            hw = tl.load(row + (W + offs_w // 2)[None, :], mask=n_mask[:, None], other=0)
            hi = high_bits16(hw, offs_w[None, :])
        return lo, hi
    else:
        offs_w = tl.arange(0, ROW_WORDS)
        lo = tl.load(BASE + rows[:, None] * ROW_WORDS + offs_w[None, :], mask=n_mask[:, None], other=0)
        return lo, lo


@triton.jit
def _unpack(lo, hi, BITS: tl.constexpr, INPLACE: tl.constexpr):
    """int32 codes [N, HEAD_DIM] in channel order from `_load_words` (INPLACE: see `_c`; not for 3-bit)."""
    if BITS == 3:
        # spread the 16 high bits as a 2-bit plane (bit k -> bit 2k) so both planes spread alike
        h = (hi | (hi << 8)) & 0x00FF00FF
        h = (h | (h << 4)) & 0x0F0F0F0F
        h = (h | (h << 2)) & 0x33333333
        h = (h | (h << 1)) & 0x55555555
        return _spread(lo, 2) | (_spread(h, 2) << 2)
    else:
        return _spread(lo, BITS, INPLACE)


@triton.jit
def _levels_f32(codes, CB, NUQ: tl.constexpr):
    """fp32 levels of int32 codes: the code (uniform) or codebook[code] (nuq)."""
    if NUQ:
        return tl.load(CB + codes).to(tl.float32)
    else:
        return (codes | MAGIC).to(tl.float32, bitcast=True) - TWO_23


@triton.jit
def _scaled(v, w, INPLACE: tl.constexpr, FMA: tl.constexpr):
    """v * w for levels v; INPLACE levels (2**23 + code * 2**j) give code * 2**j * w: with FMA in one
    rounding, fma(v, w, -2**23 w) (2**23 w is exact); else (v - 2**23) * w (the CPU interpreter does not fuse)."""
    if INPLACE:
        if FMA:
            return tl.fma(v, w, -TWO_23 * w)
        else:
            return (v - TWO_23) * w
    else:
        return v * w


@triton.jit
def _token_scaled(v, ps, INPLACE: tl.constexpr, FMA: tl.constexpr, NGV: tl.constexpr):
    """v [N, HEAD_DIM] times ps [N, NGV], the weight of each token's value group (`_scaled`)."""
    if NGV == 1:
        return _scaled(v, ps, INPLACE, FMA)
    else:
        N: tl.constexpr = v.shape[0]
        D: tl.constexpr = v.shape[1]
        v3 = tl.reshape(v, (N, NGV, D // NGV))
        return tl.reshape(_scaled(v3, ps[:, :, None], INPLACE, FMA), (N, D))


@triton.jit
def _decode_kivi_simt_kernel(
    Q, KC8, KC, KS, KZ, VC, VS, VZ, KRES, VWIN, KSINK, VSINK, LENS, CB, M_PART, L_PART, ACC_PART,
    qk_scale, H_KV, T_QCAP, R, S, TOKENS_PER_SPLIT, NUM_SPLITS, N_TAIL,
    BITS: tl.constexpr, GROUP: tl.constexpr, NUQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL_TOKENS: tl.constexpr, DOT_DTYPE: tl.constexpr, PREFETCH: tl.constexpr, DEFER: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """KC / VC: the code rows viewed as int32 (KC8: the key rows as bytes, for the tail); one query head per KV head.
    Programs NUM_SPLITS .. NUM_SPLITS + N_TAIL - 1 of a row take TAIL_TOKENS each of its sinks and window."""
    NGV: tl.constexpr = HEAD_DIM // (GROUP if GROUP < HEAD_DIM else HEAD_DIM)  # value groups per token
    ROW_WORDS: tl.constexpr = HEAD_DIM * BITS // 32
    INPLACE: tl.constexpr = (not NUQ) and BITS != 3  # codes kept in place under the magic exponent (`_c`)
    PLANES: tl.constexpr = (not NUQ) and BITS == 3  # each plane in place: 2-bit part + 4 x 1-bit part
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
        offs_d = tl.arange(0, HEAD_DIM)
        offs_g = tl.arange(0, NGV)
        q = tl.load(Q + bh * HEAD_DIM + offs_d).to(tl.float32) * qk_scale  # log2 units
        if INPLACE:
            sc = _inplace_scale(offs_d, BITS)
        elif PLANES:
            sc = _inplace_scale(offs_d, 2)
        else:
            sc = tl.full([HEAD_DIM], 1.0, tl.float32)
        sc_hi = 4.0 * _inplace_scale(offs_d, 1)  # PLANES: weight of the 1-bit plane's in-place bit
        if DEFER:  # per-token partials, summed over tokens once at the end (no cross-warp sum per tile)
            acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)  # sum_n p_n s_n code_n (value groups: s_n,g)
            acc_z = tl.zeros([BLOCK_N, NGV], tl.float32)  # sum_n p_n z_n per value group
            acc_hi = tl.zeros([BLOCK_N if PLANES else 1, HEAD_DIM], tl.float32)  # PLANES: the 1-bit plane's part
        else:
            acc = tl.zeros([HEAD_DIM], tl.float32)
            acc_z = tl.zeros([NGV], tl.float32)
            acc_hi = tl.zeros([HEAD_DIM], tl.float32)
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        start = split * TOKENS_PER_SPLIT
        end = tl.minimum(start + TOKENS_PER_SPLIT, n_vq)
        # tile t0's code words, scales and zeros are loaded one iteration ahead (registers double-buffer)
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        # 64-bit bases of this (batch, kv head); token offsets below are 32-bit (capacity * row words < 2**31)
        KH = KC + bh * T_QCAP * ROW_WORDS
        VH = VC + bh * T_QCAP * ROW_WORDS
        VSH = VS + bh * T_QCAP * NGV
        VZH = VZ + bh * T_QCAP * NGV
        kl, kh = _load_words(KH, offs_n, n_mask, BITS, HEAD_DIM, PLANES)
        vl, vh = _load_words(VH, offs_n, n_mask, BITS, HEAD_DIM, PLANES)
        vmeta = offs_n[:, None] * NGV + offs_g[None, :]
        vs = tl.load(VSH + vmeta, mask=n_mask[:, None], other=0.0)
        vz = tl.load(VZH + vmeta, mask=n_mask[:, None], other=0.0)
        for t0 in range(start, end, BLOCK_N):
            ckl, ckh, cvl, cvh, cvs, cvz, c_mask = kl, kh, vl, vh, vs, vz, n_mask
            if PREFETCH:
                offs_n += BLOCK_N
                n_mask = offs_n < end
                kl, kh = _load_words(KH, offs_n, n_mask, BITS, HEAD_DIM, PLANES)
                vl, vh = _load_words(VH, offs_n, n_mask, BITS, HEAD_DIM, PLANES)
                vmeta = offs_n[:, None] * NGV + offs_g[None, :]
                vs = tl.load(VSH + vmeta, mask=n_mask[:, None], other=0.0)
                vz = tl.load(VZH + vmeta, mask=n_mask[:, None], other=0.0)
            else:
                crows = t0 + tl.arange(0, BLOCK_N)
                c_mask = crows < end
                ckl, ckh = _load_words(KH, crows, c_mask, BITS, HEAD_DIM, PLANES)
                cvl, cvh = _load_words(VH, crows, c_mask, BITS, HEAD_DIM, PLANES)
                vmeta = crows[:, None] * NGV + offs_g[None, :]
                cvs = tl.load(VSH + vmeta, mask=c_mask[:, None], other=0.0)
                cvz = tl.load(VZH + vmeta, mask=c_mask[:, None], other=0.0)
            g = bh * (T_QCAP // GROUP) + t0 // GROUP  # the whole tile lies in one key group
            qs = q * tl.load(KS + g * HEAD_DIM + offs_d).to(tl.float32)
            bias = tl.sum(q * tl.load(KZ + g * HEAD_DIM + offs_d).to(tl.float32), 0)
            if INPLACE:  # k = 2**23 + code * 2**j exactly; fma(k, a, -2**23 a) = code * 2**j * a, one rounding
                a = qs * sc
                k = _unpack(ckl, ckh, BITS, True).to(tl.float32, bitcast=True)
                qk = tl.sum(_scaled(k, a[None, :], True, FMA), 1) + bias
            elif PLANES:  # each plane's product rounded once, then added
                k_lo = _spread(ckl, 2, True).to(tl.float32, bitcast=True)
                k_hi = _spread(ckh, 1, True).to(tl.float32, bitcast=True)
                a_lo = (qs * sc)[None, :]
                a_hi = (qs * sc_hi)[None, :]
                qk = tl.sum(_scaled(k_lo, a_lo, True, FMA) + _scaled(k_hi, a_hi, True, FMA), 1) + bias
            else:
                k = _levels_f32(_unpack(ckl, ckh, BITS, False), CB, NUQ)
                qk = tl.sum(k * qs[None, :], 1) + bias
            qk = tl.where(c_mask, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 0))
            if m_new > m_i:  # rescale only when the running max grows (rare after the first tiles)
                alpha = tl.exp2(m_i - m_new)
                acc = acc * alpha
                acc_z = acc_z * alpha
                if PLANES:
                    acc_hi = acc_hi * alpha
                l_i = l_i * alpha
                m_i = m_new
            p = tl.exp2(qk - m_i)
            l_i = l_i + tl.sum(p, 0)
            ps = p[:, None] * cvs.to(tl.float32)  # [N, NGV]
            if INPLACE:
                v = _unpack(cvl, cvh, BITS, True).to(tl.float32, bitcast=True)
            elif PLANES:
                v = _spread(cvl, 2, True).to(tl.float32, bitcast=True)
            else:
                v = _levels_f32(_unpack(cvl, cvh, BITS, False), CB, NUQ)
            pv = _token_scaled(v, ps, INPLACE or PLANES, FMA, NGV)
            pz = p[:, None] * cvz.to(tl.float32)
            if DEFER:
                acc += pv
                acc_z += pz
            else:
                acc += tl.sum(pv, 0)
                acc_z += tl.sum(pz, 0)
            if PLANES:
                pv_hi = _token_scaled(_spread(cvh, 1, True).to(tl.float32, bitcast=True), ps, True, FMA, NGV)
                if DEFER:
                    acc_hi += pv_hi
                else:
                    acc_hi += tl.sum(pv_hi, 0)
        if DEFER:
            out = tl.sum(acc, 0) * sc
            if PLANES:
                out += tl.sum(acc_hi, 0) * sc_hi
            z = tl.sum(acc_z, 0)  # [NGV]
        else:
            out = acc * sc
            if PLANES:
                out += acc_hi * sc_hi
            z = acc_z
        if NGV == 1:
            out = out + z
        else:
            out = tl.reshape(tl.reshape(out, (NGV, HEAD_DIM // NGV)) + z[:, None], (HEAD_DIM,))
        prow = bh * (NUM_SPLITS + N_TAIL) + split
        tl.store(M_PART + prow, m_i)
        tl.store(L_PART + prow, l_i)
        tl.store(ACC_PART + prow * HEAD_DIM + offs_d, out)
    else:
        fp16_tail_one_head(
            Q, KC8, KS, KZ, KRES, VWIN, KSINK, VSINK, CB, M_PART, L_PART, ACC_PART,
            qk_scale, bh, T_QCAP, R, S, n_sink, rest, n_kq, n_vq, split, NUM_SPLITS + N_TAIL,
            (split - NUM_SPLITS) * TAIL_TOKENS, (split - NUM_SPLITS + 1) * TAIL_TOKENS,
            BITS, GROUP, NUQ, HEAD_DIM, 16,
        )  # fmt: skip
