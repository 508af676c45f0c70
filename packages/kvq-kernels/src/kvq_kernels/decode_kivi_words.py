"""Fused dequantize + split-KV decode attention on tensor cores, codes unpacked from 32-bit words (2/3/4/8-bit uniform).

The query heads of a GQA group are the rows of both dots (padded to 16): one program reads each KV tile
once for all heads of its group. Code rows are read as int32 words (`kvq_core.packing`'s bytes read
little-endian: a word holds PER = 32 / BITS channels of one token, channel PER * w + k at bit BITS * k).
Two codes become an fp16 pair with three instructions and no int->float conversion: a shift and an AND-OR put
code j in the low half and code j + PER / 2 in the high half under the fp16 exponent of 1024 (`0x6400 | c` is
the fp16 1024 + c, exact for c < 1024), and one `sub.f16x2` removes the 1024s. 3-bit rows are a 2-bit plane's
words (16 channels each) then a 1-bit plane's, whose bits join each pair before the exponent (about six
instructions a pair).

The tile keeps the word's pair order (columns k = 2j, 2j + 1 of a word hold channels j, j + PER / 2), so
nothing is shuffled into channel order: the query is gathered in that order once per program and the
output scattered back once. Scales fold out of the dots as in `decode_kivi`: keys (per channel, one group
a tile) into the query, values (per token, NGV == 1) into the probabilities. Grid, splits, the fp16 tail
program and the combine pass are `decode_kivi`'s.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_fp16 import _dot, _softmax_update, _store_partial
from .kivi_tail import _levels
from .packed import high_bits16


@triton.jit
def _pair(y, ASM: tl.constexpr):
    """int32 y = (0x6400 | a) | (0x6400 | b) << 16 (a, b < 1024) -> fp16 (a, b), exact."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, m; mov.b32 m, 0x64006400; sub.f16x2 t, $2, m; mov.b32 {$0, $1}, t; }",
            "=h,=h,r",
            [y],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=1,
        )
    else:  # CPU interpreter (no inline PTX): the same values from the mantissa bits
        return (y & 0x3FF).to(tl.float32), ((y >> 16) & 0x3FF).to(tl.float32)


@triton.jit
def _pairj(x, h, j: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """fp16 pair (code j, code j + PER / 2) of each word; the codes are in place within their 16-bit halves.
    BITS 3: x is a 2-bit-plane word, h its 16 high bits spread to bits 2-9 and 18-25 (`_high_bits`), so that
    code j's bit 2 is bit j + 2 of h: two shifts and two AND-ORs a pair."""
    if BITS == 3:
        y = ((x >> (2 * j)) & 0x00030003) | ((h >> j) & 0x00040004)
    else:
        y = (x >> (BITS * j)) & (((1 << BITS) - 1) * 0x10001)
    return _pair(y | 0x64006400, ASM)


@triton.jit
def _high_bits(hw, offs_w):
    """3-bit: `packed.high_bits16` of 2-bit-plane words offs_w -> bits k < 8 at bit k + 2, bits k >= 8 at bit
    k + 10 (bit 2 of code k's place in the pair's low or high half once shifted down by k % 8; done once a word,
    not once a pair)."""
    h16 = high_bits16(hw, offs_w[None, :])
    return ((h16 & 0xFF) << 2) | ((h16 & 0xFF00) << 10)


@triton.jit
def _tree(c0, c1, c2, c3, c4, c5, c6, c7, n: tl.constexpr):
    """Join n (2, 4 or 8) tensors along new minor axes so that the flattened index k holds c_k: join puts its
    new axis last, so the first join pairs indices that differ in their highest bit (bit-reversed leaves)."""
    if n == 2:
        return tl.join(c0, c1)
    elif n == 4:
        return tl.join(tl.join(c0, c2), tl.join(c1, c3))
    else:
        return tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))


@triton.jit
def unpack_words(x, h, BITS: tl.constexpr, ASM: tl.constexpr):
    """int32 words [N, W] -> code levels [N, W * PER] in pair order (see `pair_order`), fp16 (fp32 under ASM=False).
    BITS 3: x the 2-bit plane's words, h their high bits (`_high_bits`); else h is unused.

    The pair (lo, hi) of one instruction lands in adjacent columns, so a tile's fp16 pairs are the registers
    the unpack produced; the reshape moves no data."""
    N: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    NP: tl.constexpr = 8 if BITS == 3 else 16 // BITS  # pairs a word
    l0, h0 = _pairj(x, h, 0, BITS, ASM)
    l1, h1 = _pairj(x, h, 1, BITS, ASM)
    l2, h2, l3, h3 = l0, h0, l1, h1
    l4, h4, l5, h5, l6, h6, l7, h7 = l0, h0, l1, h1, l0, h0, l1, h1
    if NP >= 4:
        l2, h2 = _pairj(x, h, 2, BITS, ASM)
        l3, h3 = _pairj(x, h, 3, BITS, ASM)
    if NP == 8:
        l4, h4 = _pairj(x, h, 4, BITS, ASM)
        l5, h5 = _pairj(x, h, 5, BITS, ASM)
        l6, h6 = _pairj(x, h, 6, BITS, ASM)
        l7, h7 = _pairj(x, h, 7, BITS, ASM)
    lo = _tree(l0, l1, l2, l3, l4, l5, l6, l7, NP)
    hi = _tree(h0, h1, h2, h3, h4, h5, h6, h7, NP)
    return tl.reshape(tl.join(lo, hi), (N, W * 2 * NP))


@triton.jit
def pair_order(HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """Channel held by each tile column: column PER * w + 2j + i holds channel PER * w + j + i * PER / 2."""
    PER: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    col = tl.arange(0, HEAD_DIM)
    k = col % PER
    return col - k + k // 2 + (k % 2) * (PER // 2)


@triton.jit
def _tail_part(
    Q, KC, KS, KZ, KRES, VWIN, KSINK, VSINK, M_PART, L_PART, ACC_PART,
    qk_scale, bh, T_QCAP, R, S, n_sink, rest, n_kq, n_vq, part, NUM_PARTS, tail_start, tail_end,
    BITS: tl.constexpr, GROUP: tl.constexpr, HQ_PER_KV: tl.constexpr, HQ_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, TAIL_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """Partial state `part` of NUM_PARTS over tokens [tail_start, tail_end) of row bh's fp16 tail (the sinks, then
    the window p in [n_vq, rest) whose keys are codes for p < n_kq, else the fp16 ring)."""
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
    # one stage: a tail program runs one or two tiles, so a software pipeline would gain nothing, and its buffers
    # (33 KiB of shared memory in a local sm_90 compile of the fragment kernel, against 10-18 KiB for its main
    # loop) would count for every program of the launch and hold one-warp launches to 6 programs an SM
    for t0 in tl.range(tail_start, tl.minimum(tail_end, n_sink + rest - n_vq), TAIL_N, num_stages=1):
        offs_t = t0 + tl.arange(0, TAIL_N)
        is_sink = offs_t < n_sink
        offs_n = n_vq + offs_t - n_sink  # post-sink index of window tokens
        n_mask = (offs_t < n_sink + rest - n_vq) & (offs_t < tail_end)
        win = n_mask & ~is_sink
        kq = win & (offs_n < n_kq)
        sptr = (bh * S + offs_t)[:, None] * HEAD_DIM + offs_d[None, :]
        ring = (bh * R + offs_n % R)[:, None] * HEAD_DIM + offs_d[None, :]
        mptr = (bh * (T_QCAP // GROUP) + offs_n // GROUP)[:, None] * HEAD_DIM + offs_d[None, :]
        ks = tl.load(KS + mptr, mask=kq[:, None], other=0.0).to(tl.float32)
        kz = tl.load(KZ + mptr, mask=kq[:, None], other=0.0).to(tl.float32)
        kc = _levels(KC + (bh * T_QCAP + offs_n) * ROW_BYTES, kq, KS, BITS, HEAD_DIM, False, tl.float32)
        k = tl.load(KSINK + sptr, mask=(n_mask & is_sink)[:, None], other=0.0).to(tl.float32)
        k += tl.load(KRES + ring, mask=(win & ~kq)[:, None], other=0.0).to(tl.float32)
        k = tl.where(kq[:, None], kc * ks + kz, k)
        v = tl.load(VSINK + sptr, mask=(n_mask & is_sink)[:, None], other=0.0).to(tl.float32)
        v += tl.load(VWIN + ring, mask=win[:, None], other=0.0).to(tl.float32)
        qk = _dot(qd, tl.trans(k.to(DOT_DTYPE)), DOT_DTYPE)
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_i, l_i, acc = _softmax_update(m_i, l_i, acc, qk, v, DOT_DTYPE)
    _store_partial(M_PART, L_PART, ACC_PART, row0, offs_h, h_mask, part, NUM_PARTS, m_i, l_i, acc, HEAD_DIM)


@triton.jit
def _decode_kivi_words_kernel(
    Q, KC, KW, KS, KZ, VW, VS, VZ, KRES, VWIN, KSINK, VSINK, LENS, CB, M_PART, L_PART, ACC_PART,
    qk_scale, H_KV, T_QCAP, R, S, TOKENS_PER_SPLIT, NUM_SPLITS, N_TAIL,
    BITS: tl.constexpr, GROUP: tl.constexpr, HQ_PER_KV: tl.constexpr, HQ_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, TAIL_TOKENS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """KC: key code rows as bytes (for the tail); KW / VW: key / value code rows as int32 words. TAIL_N: the fp16
    tail's tile (its [TAIL_N, D] fp16 tiles set the kernel's register count: 64 spilled at 4 warps). Programs
    NUM_SPLITS .. NUM_SPLITS + N_TAIL - 1 of a row take TAIL_TOKENS each of its sinks-then-window tail, so that
    at short contexts no program walks the whole fp16 window."""
    ROW_WORDS: tl.constexpr = HEAD_DIM * BITS // 32
    NGV: tl.constexpr = HEAD_DIM // (GROUP if GROUP < HEAD_DIM else HEAD_DIM)
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
    row0 = bh * HQ_PER_KV
    if split < NUM_SPLITS:
        start = split * TOKENS_PER_SPLIT
        end = tl.minimum(start + TOKENS_PER_SPLIT, n_vq)
        ch = pair_order(HEAD_DIM, BITS)  # channel of each tile column
        LO_WORDS: tl.constexpr = HEAD_DIM // 16 if BITS == 3 else ROW_WORDS  # 3-bit: the 2-bit plane's words
        offs_w = tl.arange(0, LO_WORDS)
        q = tl.load(Q + (row0 + offs_h)[:, None] * HEAD_DIM + ch[None, :], mask=h_mask[:, None], other=0.0)
        q = q.to(tl.float32) * qk_scale  # [HQ_PAD, D] in pair order, log2 units
        m_i = tl.full([HQ_PAD], float("-inf"), tl.float32)
        # per-token partial sums of p (the softmax denominator) and p * value zero, reduced once per program
        # (a per-tile sum over the tile's tokens crosses warps)
        l_n = tl.zeros([HQ_PAD, BLOCK_N], tl.float32)
        z_n = tl.zeros([HQ_PAD, BLOCK_N], tl.float32)
        acc = tl.zeros([HQ_PAD, HEAD_DIM], tl.float32)
        kw_base = KW + bh * T_QCAP * ROW_WORDS  # this head's first word; row offsets below stay 32-bit
        vw_base = VW + bh * T_QCAP * ROW_WORDS
        g_base = bh * (T_QCAP // GROUP)
        g0 = (g_base + start // GROUP) * HEAD_DIM + ch
        any_tile = (ch * 0 + start) < end  # a split past n_vq reads no scales
        qs = (q * tl.load(KS + g0, mask=any_tile, other=0.0).to(tl.float32)[None, :]).to(DOT_DTYPE)
        bias = tl.sum(q * tl.load(KZ + g0, mask=any_tile, other=0.0).to(tl.float32)[None, :], 1)
        for t0 in range(start, end, BLOCK_N):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            wptr = offs_n[:, None] * ROW_WORDS + offs_w[None, :]
            kw = tl.load(kw_base + wptr, mask=n_mask[:, None], other=0)
            vw = tl.load(vw_base + wptr, mask=n_mask[:, None], other=0)
            kh = kw
            vh = vw
            if BITS == 3:  # the 1-bit plane's words follow the 2-bit plane's
                hptr = offs_n[:, None] * ROW_WORDS + (LO_WORDS + offs_w // 2)[None, :]
                kh = _high_bits(tl.load(kw_base + hptr, mask=n_mask[:, None], other=0), offs_w)
                vh = _high_bits(tl.load(vw_base + hptr, mask=n_mask[:, None], other=0), offs_w)
            if (t0 % GROUP == 0) & (t0 != start):  # a new key group: its scales fold into the query
                g = g_base + t0 // GROUP
                qs = (q * tl.load(KS + g * HEAD_DIM + ch).to(tl.float32)[None, :]).to(DOT_DTYPE)
                bias = tl.sum(q * tl.load(KZ + g * HEAD_DIM + ch).to(tl.float32)[None, :], 1)
            k_lev = unpack_words(kw, kh, BITS, ASM)  # [N, D] codes
            qk = bias[:, None] + _dot(qs, tl.trans(k_lev.to(DOT_DTYPE)), DOT_DTYPE)
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_n = l_n * alpha[:, None] + p
            rows = bh * T_QCAP + offs_n
            v_lev = unpack_words(vw, vh, BITS, ASM)
            if NGV == 1:
                vs = tl.load(VS + rows, mask=n_mask, other=0.0).to(tl.float32)
                vz = tl.load(VZ + rows, mask=n_mask, other=0.0).to(tl.float32)
                pv = _dot((p * vs[None, :]).to(DOT_DTYPE), v_lev.to(DOT_DTYPE), DOT_DTYPE)
                z_n = z_n * alpha[:, None] + p * vz[None, :]
            else:
                mptr = rows[:, None] * NGV + (ch // (HEAD_DIM // NGV))[None, :]
                vs = tl.load(VS + mptr, mask=n_mask[:, None], other=0.0).to(tl.float32)
                vz = tl.load(VZ + mptr, mask=n_mask[:, None], other=0.0).to(tl.float32)
                pv = _dot(p.to(DOT_DTYPE), (v_lev.to(tl.float32) * vs + vz).to(DOT_DTYPE), DOT_DTYPE)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        l_i = tl.sum(l_n, 1)
        if NGV == 1:
            acc += tl.sum(z_n, 1)[:, None]
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
