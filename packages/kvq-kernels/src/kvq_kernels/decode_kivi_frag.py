"""Fused dequantize + split-KV decode attention on tensor cores, codes dequantized in the MMA operand registers
(2/3/4/8-bit uniform, value groups of at least head_dim channels).

A packed row read as 16-bit containers (`kvq_core.packing`'s bytes, little-endian) holds PER = 16 / BITS codes each:
container w holds channels PER * w + j at bit BITS * j (8-bit containers, CONTAINER = 8: PER = 8 / BITS, the same
rule byte by byte; a 3-bit row is read as its 2-bit plane's bytes, each merged with the four high bits of its
channels from the 1-bit plane into a 16-bit container, PER = 4: from head_dim 128 as two half tiles whose
containers share the 1-bit plane's bytes, `_halves3`, else as one tile, `_merge3`). Code j of every container is
channel slice j (channels PER * w + j, w < W = head_dim / PER; `_channel`), so each tile is PER dots of width W
over the same [BLOCK_N, W] (keys) or [W, BLOCK_N] (values) container tile: scores s = sum_j k_j . q_j, and value
slice j's own accumulator. Every step from the loaded containers to the dot operand is elementwise (one inline-PTX block per pair
of containers: a LOP3 that masks code j in place under the fp16 exponent whose mantissa bit is worth 1 there, a
shift first when the code sits above the 10 mantissa bits; the fp16 is the code plus a power of two,
`code_offset`, exact). The offset stays in the operand: the scores subtract offset x (sum of the query slice as
the dot reads it) once per key group, the value accumulators offset x (sum of the probabilities as the dot reads
them, one more MMA of ones a tile) once per program, so no fp16 op per pair of codes remains (8-bit codes: offset
0, a `sub.f16x2` a pair). Triton's dot-operand pass then moves the shared-memory round trip of the operand above
the unpack: shared memory holds the 16-bit containers (the cache's own bytes, copied in by cp.async), `ldmatrix`
loads them in the MMA fragment layout, and the fp16 codes exist only in registers. The word kernel
(`decode_kivi_words`) unpacks in the load layout and so stores and re-reads every fp16 code through shared memory
(4.5 bytes of shared-memory traffic for a 4-bit code).

The codes are the M side of both products: scores S^T = K Q^T ([BLOCK_N, GP], key codes the A operand, the query
slices of the group the B operand) and values O^T = V^T P^T ([W, GP] a slice). An MMA (m16n8k16) is 8 wide on
its N side and 16 on its M side, so the query group pads to GP = 8 columns (a power of two >= the group) where,
as the rows of the products, it padded to 16: at 32/8 heads half the MMAs, and the scores, probabilities,
per-token sums and value accumulators a thread keeps halve (registers 255 with spills -> 220 at (128, 2, 2) in a
local sm_90 compile, 4-bit). MHA's single query head pads to 8 columns as well. The softmax runs along the tokens
(axis 0). Key scales (per channel, one group a tile) fold into the query slices once per key group; value scales
(per token) into the probabilities; softmax denominators and value zeros are kept per token and reduced once per
program. Grid, splits, the fp16 tail programs and the combine pass are the word kernel's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_kivi_words import _tail_part


@triton.constexpr_function
def code_place(bits, j):
    """(shift, p): a container pair is shifted right by `shift` (8 when code j's bits, 2j .. 2j + 2 for 3-bit, else
    bits * j .., reach past the fp16 mantissa's 10 bits, else 0), and code j then sits at bit p."""
    p, width = (2 * j, 3) if bits == 3 else (bits * j, bits)
    shift = 8 if p + width > 10 else 0
    return shift, p - shift


@triton.constexpr_function
def code_exponent(bits, j):
    """fp16 exponent bits of 2**(10 - p) (code j at bit p, `code_place`), twice (both halves of a b32)."""
    return ((25 - code_place(bits, j)[1]) << 10) * 0x10001


@triton.constexpr_function
def code_offset(bits, j):
    """What the unpack adds to code j of a container: the code sits at bit p (`code_place`) under the fp16 exponent
    of 2**(10 - p), whose mantissa bit p weighs 1, so the fp16 is 2**(10 - p) + c, exact. The scores subtract it
    once per key group and the value accumulators once per program, instead of an fp16 op per pair of codes.
    8-bit codes: 0, the unpack subtracts 1024 itself (8-bit launches run 4 warps, where the per-group correction
    raised registers from 125 to 159 a thread in a local sm_90 compile, one resident program an SM fewer)."""
    return 0.0 if bits == 8 else float(1 << (10 - code_place(bits, j)[1]))


@triton.constexpr_function
def unpack_ptx(bits, j):
    """PTX of one pair of 16-bit containers ($1, a b32) -> the fp16 pair code j + `code_offset` of each, exact:
    one LOP3 that masks the code in place under the exponent of 2**(10 - p) (`code_place`), a shift by 8 first
    when the code reaches past bit 10, and for an offset of 0 a `sub.f16x2` of 1024."""
    sh, p = code_place(bits, j)
    m = ((1 << bits) - 1) << p
    src = f"shr.b32 t, $1, {sh}; " if sh else "mov.b32 t, $1; "
    if code_offset(bits, j):
        return f"{{ .reg .b32 t; {src}lop3.b32 $0, t, {m * 0x10001}, {code_exponent(bits, j)}, 0xEA; }}"
    return (
        f"{{ .reg .b32 t, c; {src}lop3.b32 t, t, {m * 0x10001}, {code_exponent(bits, j)}, 0xEA; "
        "mov.b32 c, 0x64006400; sub.f16x2 $0, t, c; }"
    )


@triton.constexpr_function
def unpack_ptx8(bits, j):
    """PTX of four 8-bit containers ($2, one b32) -> four fp16, code j + `code_offset` of each, in $0 (containers
    0, 1) and $1 (2, 3), exact: two PRMTs spread the bytes into 16-bit lanes, then one LOP3 a pair masks code j in
    place under the exponent of 2**(10 - p) (an 8-bit container's codes never pass bit 10), and for an offset of
    0 a `sub.f16x2` of 1024."""
    m = ((1 << bits) - 1) << (bits * j)
    e = code_exponent(bits, j)
    spread = "prmt.b32 lo, $2, 0, 0x7170; prmt.b32 hi, $2, 0, 0x7372; "
    if code_offset(bits, j):
        return (
            f"{{ .reg .b32 lo, hi; {spread}"
            f"lop3.b32 $0, lo, {m * 0x10001}, {e}, 0xEA; lop3.b32 $1, hi, {m * 0x10001}, {e}, 0xEA; }}"
        )
    return (
        f"{{ .reg .b32 lo, hi, c; {spread}"
        f"lop3.b32 lo, lo, {m * 0x10001}, {e}, 0xEA; lop3.b32 hi, hi, {m * 0x10001}, {e}, 0xEA; "
        "mov.b32 c, 0x64006400; sub.f16x2 $0, lo, c; sub.f16x2 $1, hi, c; }"
    )


@triton.constexpr_function
def unpack_ptx3(j):
    """PTX of two 16-bit 3-bit containers ($1, a b32) -> the fp16 pair code j + `code_offset` of each, exact. A
    container holds four codes: the low two bits of code j at bits 2j, 2j + 1 and its high bit at bit 8 + j. One
    shift brings the high bit to 2j + 2 (the bits that cross from the upper container land at 10 + j and above,
    outside both masks); two LOP3s merge it and the low bits in place under the exponent of the offset."""
    p = 2 * j
    hm, lm = (4 << p) * 0x10001, (3 << p) * 0x10001
    return (
        f"{{ .reg .b32 x; shr.b32 x, $1, {6 - j}; lop3.b32 x, x, {hm}, {code_exponent(3, j)}, 0xEA; "
        f"lop3.b32 $0, $1, {lm}, x, 0xEA; }}"
    )


@triton.jit
def _codes(x, j: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """int16 or int8 containers -> code j + `code_offset(BITS, j)` of each as DOT_DTYPE (elementwise: the
    dot-operand pass hoists through it). 3-bit: x the 16-bit containers of `_merge3`."""
    if ASM:
        if BITS == 3:
            return tl.inline_asm_elementwise(unpack_ptx3(j), "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2)
        elif x.dtype == tl.int8:
            return tl.inline_asm_elementwise(
                unpack_ptx8(BITS, j), "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4
            )
        else:
            return tl.inline_asm_elementwise(unpack_ptx(BITS, j), "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2)
    elif BITS == 3:  # CPU interpreter (no inline PTX); the masks drop the sign extension
        c = ((x.to(tl.int32) >> (2 * j)) & 3) | (((x.to(tl.int32) >> (8 + j)) & 1) << 2)
        return c.to(DOT_DTYPE) + code_offset(BITS, j)
    else:  # CPU interpreter; >> is arithmetic on the sign-extended int32, the mask drops the sign
        return ((x.to(tl.int32) >> (BITS * j)) & ((1 << BITS) - 1)).to(DOT_DTYPE) + code_offset(BITS, j)


@triton.constexpr_function
def half_tiles(bits, head_dim):
    """Tiles a row is read as: 2 for 3-bit rows of whole 128-channel halves (`_halves3`), else 1 (3-bit: `_merge3`)."""
    return 2 if bits == 3 and head_dim >= 128 else 1


@triton.jit
def _channel(offs_w, s: tl.constexpr, PER: tl.constexpr, HALVES: tl.constexpr):
    """Channel of slice s at container position offs_w: PER * w + s, or with two half tiles (3-bit, `_halves3`)
    code s % 4 of 2-bit-plane byte (w // 4) * 8 + w % 4 (+ 4 in the second half)."""
    if HALVES == 2:
        return ((offs_w // 4) * 8 + offs_w % 4 + 4 * (s // PER)) * PER + s % PER
    else:
        return offs_w * PER + s


@triton.jit
def _slice_codes(x, xb, s: tl.constexpr, PER: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
                 DOT_DTYPE: tl.constexpr):  # fmt: skip
    """Slice s's codes as the dot operand: code s of tile x, or with two half tiles code s - PER of xb."""
    if s < PER:
        return _codes(x, s, BITS, ASM, DOT_DTYPE)
    else:
        return _codes(xb, s - PER, BITS, ASM, DOT_DTYPE)


@triton.jit
def _halves3(base, n_row, offs_w, hi, mask, KEYS: tl.constexpr):
    """3-bit containers (int16) as two half tiles of W = head_dim / 8: the 1-bit plane's byte w (at row offset hi;
    it pairs nibbles within each block of 32 channels, `kvq_core.packing`) holds the high bits of the 2-bit
    plane's byte (w // 4) * 8 + w % 4 in its low nibble and of that byte + 4 in its high nibble. Each half tile
    merges its bytes with its nibble in bits 8-11: three unmasked loads of contiguous runs (the 1-bit plane's 16
    bytes, the 2-bit plane's in runs of 4)."""
    lo = (offs_w // 4) * 8 + offs_w % 4
    if KEYS:  # [W, N]
        row, lo, offs_w, mask = n_row[None, :], lo[:, None], offs_w[:, None], mask[None, :]
    else:  # [N, W]
        row, lo, offs_w, mask = n_row[:, None], lo[None, :], offs_w[None, :], mask[:, None]
    a = tl.load(base + row + lo, mask=mask, other=0)
    b = tl.load(base + row + lo + 4, mask=mask, other=0)
    h = tl.load(base + row + hi + offs_w, mask=mask, other=0)
    return a.to(tl.int16) | ((h & 15).to(tl.int16) << 8), b.to(tl.int16) | ((h >> 4).to(tl.int16) << 8)


@triton.jit
def _merge3(C, hrow, offs_w, n_mask, lo, KEYS: tl.constexpr):
    """3-bit containers, int16: byte w of the 2-bit plane (`lo`, uint8; channels 4w .. 4w + 3) in bits 0-7 and
    the same channels' high bits in bits 8-11. The 1-bit plane pairs nibbles within each block of 32 channels
    (`kvq_core.packing`): they are nibble (w // 4) % 2 of its byte (w // 8) * 4 + w % 4, so the bytes each w reads
    run contiguously four at a time (at row offset `hrow`), as a cp.async copy needs. Two loads of them, one
    masked to the low nibbles' w and one to the high nibbles', keep every step from load to container elementwise:
    the dot-operand pass hoists the layout change through loads and arithmetic, not through a shift that depends
    on w (nor through a two-operand asm). The low nibbles' containers also carry the high nibble in bits 12-15,
    which `unpack_ptx3` never reads."""
    byte = (offs_w // 8) * 4 + offs_w % 4
    high = (offs_w // 4) % 2
    if KEYS:  # [W, N]
        ptr, high, n_mask = C + hrow[None, :] + byte[:, None], high[:, None], n_mask[None, :]
    else:  # [N, W]
        ptr, high, n_mask = C + hrow[:, None] + byte[None, :], high[None, :], n_mask[:, None]
    a = tl.load(ptr, mask=(high == 0) & n_mask, other=0)
    b = tl.load(ptr, mask=(high == 1) & n_mask, other=0)
    return lo.to(tl.int16) | ((a.to(tl.int16) | (b.to(tl.int16) >> 4)) << 8)


@triton.jit
def _dot_acc(a, b, acc, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _q_slice(Q, row0, offs_g, g_mask, offs_w, j: tl.constexpr, PER: tl.constexpr, HALVES: tl.constexpr,
             HEAD_DIM: tl.constexpr, qk_scale):  # fmt: skip
    """The query group's channel slice j as columns, [W, GP] (channels `_channel`), fp32, log2 units."""
    ch = _channel(offs_w, j, PER, HALVES)
    q = tl.load(Q + (row0 + offs_g)[None, :] * HEAD_DIM + ch[:, None], mask=g_mask[None, :], other=0.0)
    return q.to(tl.float32) * qk_scale


@triton.constexpr_function
def reduce_once(bits, group):
    """Whether the score's constant is summed over channels once a key group (the slices' [W, GP] shares added
    first) rather than once a slice. Both, default launches, H200 (reports/measurements/ab_layouts_h200.csv, one
    run, two passes of each, batch 1 x 128K and 8 x 32K): once took 0.91-0.99x the time for GQA 2/4/8-bit at 32/8,
    32/4 and 64/8 heads and 3-bit at 32/8 (0.97x), but 1.03-1.05x for 3-bit at groups of 8, and for MHA 1.02x
    (4-bit) and 1.06-1.08x (8-bit: 3 resident programs an SM against 4; 155 registers a thread against 128 in a
    local sm_90 compile), where one query head's masked columns fold out of the per-slice sums."""
    return group > 1 and not (bits == 3 and group > 4)


@triton.jit
def _scaled(q, KS, KZ, g, offs_w, j: tl.constexpr, PER: tl.constexpr, HALVES: tl.constexpr, HEAD_DIM: tl.constexpr,
            ok, DOT_DTYPE: tl.constexpr, BITS: tl.constexpr, ONCE: tl.constexpr):  # fmt: skip
    """Slice j of the query times key group g's scales (the score product's B operand, [W, GP]) and its share of
    the score's constant: q x zero, less the unpack's offset (`code_offset`) times the operand as the dot reads it
    (rounded to DOT_DTYPE), so that the offset cancels to the operand's own rounding; per channel ([W, GP], the
    caller sums the slices and reduces once) when ONCE (`reduce_once`), else summed over the slice's channels."""
    ch = g * HEAD_DIM + _channel(offs_w, j, PER, HALVES)
    ks = tl.load(KS + ch, mask=ok, other=0.0).to(tl.float32)
    kz = tl.load(KZ + ch, mask=ok, other=0.0).to(tl.float32)
    qs = (q * ks[:, None]).to(DOT_DTYPE)
    const = q * kz[:, None]
    if code_offset(BITS, j % PER) != 0:
        const -= code_offset(BITS, j % PER) * qs.to(tl.float32)
    if ONCE:
        return qs, const
    else:
        return qs, tl.sum(const, 0)


@triton.jit
def _reduced(cst, ONCE: tl.constexpr):
    """The score's constant [GP] from the slices' summed shares (`_scaled`): [W, GP] reduced over channels when
    ONCE, else already reduced."""
    if ONCE:
        return tl.sum(cst, 0)
    else:
        return cst


@triton.jit
def _store_slice(ACC_PART, prow, g_mask, acc, zsum, psum, offs_w, j: tl.constexpr, PER: tl.constexpr,
                 HALVES: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
    """Value slice j's accumulator [W, GP] into the partial state's rows (query heads) and channels, with the value
    zeros' share zsum and without the unpack's offset (`code_offset`) times psum, the sum of the value operand."""
    ch = _channel(offs_w, j, PER, HALVES)
    out = acc + zsum
    if code_offset(BITS, j % PER) != 0:
        out -= code_offset(BITS, j % PER) * psum
    tl.store(ACC_PART + prow[None, :] * HEAD_DIM + ch[:, None], out, mask=g_mask[None, :])


@triton.jit
def _decode_kivi_frag_kernel(
    Q, KC, KW, KS, KZ, VC, VW, VS, VZ, KRES, VWIN, KSINK, VSINK, LENS, M_PART, L_PART, ACC_PART,
    qk_scale, H_KV, T_QCAP, R, S, TOKENS_PER_SPLIT, NUM_SPLITS, N_TAIL,
    BITS: tl.constexpr, GROUP: tl.constexpr, HQ_PER_KV: tl.constexpr, HQ_PAD: tl.constexpr, GP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, TAIL_TOKENS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ASM: tl.constexpr, PER: tl.constexpr, ROW: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """KC / VC: key / value code rows as bytes (the fp16 tail's quantized keys; 3-bit: the 1-bit plane); KW / VW:
    the same rows as containers (16- or 8-bit integers; 3-bit: bytes, uint8), ROW a row. PER codes a container
    (slices); 3-bit: 4, the 2-bit plane's bytes. GP: the query group padded to a power of two >= 8 (the columns of
    both products); the fp16 tail programs take the group as HQ_PAD rows. Programs NUM_SPLITS .. NUM_SPLITS +
    N_TAIL - 1 of a row take TAIL_TOKENS each of its tail."""
    HALVES: tl.constexpr = half_tiles(BITS, HEAD_DIM)
    ONCE: tl.constexpr = reduce_once(BITS, HQ_PER_KV)
    SL: tl.constexpr = PER * HALVES  # channel slices, one dot each
    W: tl.constexpr = HEAD_DIM // SL  # containers of a slice a row (3-bit: of the 2-bit plane)
    HI: tl.constexpr = HEAD_DIM // 4  # 3-bit: the 1-bit plane's byte offset in a row
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H_KV
    bh = pid_bh.to(tl.int64)  # = b * H_KV + h; every base offset below is 64-bit
    seq_len = tl.load(LENS + b)
    n_sink = tl.minimum(seq_len, S)
    rest = seq_len - n_sink
    n_kq = rest - rest % R
    n_vq = rest - tl.minimum(rest, R)
    row0 = bh * HQ_PER_KV
    if split < NUM_SPLITS:
        offs_g = tl.arange(0, GP)
        g_mask = offs_g < HQ_PER_KV
        start = split * TOKENS_PER_SPLIT
        end = tl.minimum(start + TOKENS_PER_SPLIT, n_vq)
        offs_w = tl.arange(0, W)
        ok = (offs_w * 0 + start) < end  # a split past n_vq reads no scales
        g = bh * (T_QCAP // GROUP) + start // GROUP
        # slices 0..PER-1 (PER is 1, 2, 4 or 8); the names past PER - 1 alias slice 0 and are never used
        q0 = _q_slice(Q, row0, offs_g, g_mask, offs_w, 0, PER, HALVES, HEAD_DIM, qk_scale)
        q1 = q0
        if SL >= 2:
            q1 = _q_slice(Q, row0, offs_g, g_mask, offs_w, 1, PER, HALVES, HEAD_DIM, qk_scale)
        qs0, cst = _scaled(q0, KS, KZ, g, offs_w, 0, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
        qs1 = qs0
        if SL >= 2:
            qs1, z1 = _scaled(q1, KS, KZ, g, offs_w, 1, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
            cst += z1
        q2, q3, q4, q5, q6, q7 = q0, q0, q0, q0, q0, q0
        qs2, qs3, qs4, qs5, qs6, qs7 = qs0, qs0, qs0, qs0, qs0, qs0
        if SL >= 4:
            q2 = _q_slice(Q, row0, offs_g, g_mask, offs_w, 2, PER, HALVES, HEAD_DIM, qk_scale)
            q3 = _q_slice(Q, row0, offs_g, g_mask, offs_w, 3, PER, HALVES, HEAD_DIM, qk_scale)
            qs2, z2 = _scaled(q2, KS, KZ, g, offs_w, 2, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
            qs3, z3 = _scaled(q3, KS, KZ, g, offs_w, 3, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
            cst += z2 + z3
        if SL == 8:
            q4 = _q_slice(Q, row0, offs_g, g_mask, offs_w, 4, PER, HALVES, HEAD_DIM, qk_scale)
            q5 = _q_slice(Q, row0, offs_g, g_mask, offs_w, 5, PER, HALVES, HEAD_DIM, qk_scale)
            q6 = _q_slice(Q, row0, offs_g, g_mask, offs_w, 6, PER, HALVES, HEAD_DIM, qk_scale)
            q7 = _q_slice(Q, row0, offs_g, g_mask, offs_w, 7, PER, HALVES, HEAD_DIM, qk_scale)
            qs4, z4 = _scaled(q4, KS, KZ, g, offs_w, 4, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
            qs5, z5 = _scaled(q5, KS, KZ, g, offs_w, 5, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
            qs6, z6 = _scaled(q6, KS, KZ, g, offs_w, 6, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
            qs7, z7 = _scaled(q7, KS, KZ, g, offs_w, 7, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
            cst += z4 + z5 + z6 + z7
        bias = _reduced(cst, ONCE)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        # per-token partial sums of p (the softmax denominator) and p * value zero, reduced once per program
        l_n = tl.zeros([BLOCK_N, GP], tl.float32)
        z_n = tl.zeros([BLOCK_N, GP], tl.float32)
        # the sum of the value products' B operand (pv) over the tokens, as 16 equal rows of one more product (ones
        # times pv: four MMAs a 64-token tile, no reduction across threads or warps), rescaled with the accumulators
        ones = tl.full([16, BLOCK_N], 1.0, DOT_DTYPE)
        psum16 = tl.zeros([16, GP], tl.float32)
        a0 = tl.zeros([W, GP], tl.float32)
        a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
        kw_base = KW + bh * T_QCAP * ROW
        vw_base = VW + bh * T_QCAP * ROW
        if PREFETCH:  # each tile's value scales and zeros, loaded a tile ahead
            rows = bh * T_QCAP + start + tl.arange(0, BLOCK_N)
            vs_next = tl.load(VS + rows, mask=rows < bh * T_QCAP + end, other=0.0)
            vz_next = tl.load(VZ + rows, mask=rows < bh * T_QCAP + end, other=0.0)
        for t0 in range(start, end, BLOCK_N):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            if PREFETCH:
                rows = bh * T_QCAP + offs_n
                vs, vz = vs_next.to(tl.float32), vz_next.to(tl.float32)
                vs_next = tl.load(VS + rows + BLOCK_N, mask=offs_n + BLOCK_N < end, other=0.0)
                vz_next = tl.load(VZ + rows + BLOCK_N, mask=offs_n + BLOCK_N < end, other=0.0)
            if HALVES == 2:
                kt, kb = _halves3(kw_base, offs_n * ROW, offs_w, HI, n_mask, False)  # [N, W] each
                vt, vb = _halves3(vw_base, offs_n * ROW, offs_w, HI, n_mask, True)  # [W, N] each
            else:
                kt = tl.load(kw_base + offs_n[:, None] * ROW + offs_w[None, :], mask=n_mask[:, None], other=0)  # [N, W]
                vt = tl.load(vw_base + offs_n[None, :] * ROW + offs_w[:, None], mask=n_mask[None, :], other=0)  # [W, N]
                kb, vb = kt, vt
            if (BITS == 3) and (HALVES == 1):
                hrow = (bh * T_QCAP + offs_n) * ROW + HI  # each row's 1-bit plane
                kt = _merge3(KC, hrow, offs_w, n_mask, kt, False)
                vt = _merge3(VC, hrow, offs_w, n_mask, vt, True)
            if (t0 % GROUP == 0) & (t0 != start):  # a new key group: its scales fold into the query slices
                g = bh * (T_QCAP // GROUP) + t0 // GROUP
                qs0, cst = _scaled(q0, KS, KZ, g, offs_w, 0, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
                if SL >= 2:
                    qs1, z1 = _scaled(q1, KS, KZ, g, offs_w, 1, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
                    cst += z1
                if SL >= 4:
                    qs2, z2 = _scaled(q2, KS, KZ, g, offs_w, 2, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
                    qs3, z3 = _scaled(q3, KS, KZ, g, offs_w, 3, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
                    cst += z2 + z3
                if SL == 8:
                    qs4, z4 = _scaled(q4, KS, KZ, g, offs_w, 4, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
                    qs5, z5 = _scaled(q5, KS, KZ, g, offs_w, 5, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
                    qs6, z6 = _scaled(q6, KS, KZ, g, offs_w, 6, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
                    qs7, z7 = _scaled(q7, KS, KZ, g, offs_w, 7, PER, HALVES, HEAD_DIM, ok, DOT_DTYPE, BITS, ONCE)
                    cst += z4 + z5 + z6 + z7
                bias = _reduced(cst, ONCE)
            # scores S^T [BLOCK_N, GP]: the key codes are the A operand (M = tokens), the query slices the B operand
            s = tl.zeros([BLOCK_N, GP], tl.float32) + bias[None, :]
            s = _dot_acc(_slice_codes(kt, kb, 0, PER, BITS, ASM, DOT_DTYPE), qs0, s, DOT_DTYPE)
            if SL >= 2:
                s = _dot_acc(_slice_codes(kt, kb, 1, PER, BITS, ASM, DOT_DTYPE), qs1, s, DOT_DTYPE)
            if SL >= 4:
                s = _dot_acc(_slice_codes(kt, kb, 2, PER, BITS, ASM, DOT_DTYPE), qs2, s, DOT_DTYPE)
                s = _dot_acc(_slice_codes(kt, kb, 3, PER, BITS, ASM, DOT_DTYPE), qs3, s, DOT_DTYPE)
            if SL == 8:
                s = _dot_acc(_slice_codes(kt, kb, 4, PER, BITS, ASM, DOT_DTYPE), qs4, s, DOT_DTYPE)
                s = _dot_acc(_slice_codes(kt, kb, 5, PER, BITS, ASM, DOT_DTYPE), qs5, s, DOT_DTYPE)
                s = _dot_acc(_slice_codes(kt, kb, 6, PER, BITS, ASM, DOT_DTYPE), qs6, s, DOT_DTYPE)
                s = _dot_acc(_slice_codes(kt, kb, 7, PER, BITS, ASM, DOT_DTYPE), qs7, s, DOT_DTYPE)
            s = tl.where(n_mask[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])
            l_n = l_n * alpha[None, :] + p
            if not PREFETCH:
                rows = bh * T_QCAP + offs_n
                vs = tl.load(VS + rows, mask=n_mask, other=0.0).to(tl.float32)
                vz = tl.load(VZ + rows, mask=n_mask, other=0.0).to(tl.float32)
            z_n = z_n * alpha[None, :] + p * vz[:, None]
            # values O^T [W, GP] a slice: the value codes (transposed tile) the A operand, P^T the B operand
            pv = (p * vs[:, None]).to(DOT_DTYPE)
            if code_offset(BITS, 0) != 0:
                psum16 = _dot_acc(ones, pv, psum16 * alpha[None, :], DOT_DTYPE)
            a0 = _dot_acc(_slice_codes(vt, vb, 0, PER, BITS, ASM, DOT_DTYPE), pv, a0 * alpha[None, :], DOT_DTYPE)
            if SL >= 2:
                a1 = _dot_acc(_slice_codes(vt, vb, 1, PER, BITS, ASM, DOT_DTYPE), pv, a1 * alpha[None, :], DOT_DTYPE)
            if SL >= 4:
                a2 = _dot_acc(_slice_codes(vt, vb, 2, PER, BITS, ASM, DOT_DTYPE), pv, a2 * alpha[None, :], DOT_DTYPE)
                a3 = _dot_acc(_slice_codes(vt, vb, 3, PER, BITS, ASM, DOT_DTYPE), pv, a3 * alpha[None, :], DOT_DTYPE)
            if SL == 8:
                a4 = _dot_acc(_slice_codes(vt, vb, 4, PER, BITS, ASM, DOT_DTYPE), pv, a4 * alpha[None, :], DOT_DTYPE)
                a5 = _dot_acc(_slice_codes(vt, vb, 5, PER, BITS, ASM, DOT_DTYPE), pv, a5 * alpha[None, :], DOT_DTYPE)
                a6 = _dot_acc(_slice_codes(vt, vb, 6, PER, BITS, ASM, DOT_DTYPE), pv, a6 * alpha[None, :], DOT_DTYPE)
                a7 = _dot_acc(_slice_codes(vt, vb, 7, PER, BITS, ASM, DOT_DTYPE), pv, a7 * alpha[None, :], DOT_DTYPE)
            m_i = m_new
        zsum = tl.sum(z_n, 0)[None, :]  # every channel's value zero, weighted by p
        psum = tl.sum(psum16, 0)[None, :] * (1.0 / 16)  # 16 equal rows: exact
        prow = (row0 + offs_g.to(tl.int64)) * (NUM_SPLITS + N_TAIL) + split
        tl.store(M_PART + prow, m_i, mask=g_mask)
        tl.store(L_PART + prow, tl.sum(l_n, 0), mask=g_mask)
        _store_slice(ACC_PART, prow, g_mask, a0, zsum, psum, offs_w, 0, PER, HALVES, HEAD_DIM, BITS)
        if SL >= 2:
            _store_slice(ACC_PART, prow, g_mask, a1, zsum, psum, offs_w, 1, PER, HALVES, HEAD_DIM, BITS)
        if SL >= 4:
            _store_slice(ACC_PART, prow, g_mask, a2, zsum, psum, offs_w, 2, PER, HALVES, HEAD_DIM, BITS)
            _store_slice(ACC_PART, prow, g_mask, a3, zsum, psum, offs_w, 3, PER, HALVES, HEAD_DIM, BITS)
        if SL == 8:
            _store_slice(ACC_PART, prow, g_mask, a4, zsum, psum, offs_w, 4, PER, HALVES, HEAD_DIM, BITS)
            _store_slice(ACC_PART, prow, g_mask, a5, zsum, psum, offs_w, 5, PER, HALVES, HEAD_DIM, BITS)
            _store_slice(ACC_PART, prow, g_mask, a6, zsum, psum, offs_w, 6, PER, HALVES, HEAD_DIM, BITS)
            _store_slice(ACC_PART, prow, g_mask, a7, zsum, psum, offs_w, 7, PER, HALVES, HEAD_DIM, BITS)
    else:
        t_lo = (split - NUM_SPLITS) * TAIL_TOKENS
        _tail_part(
            Q, KC, KS, KZ, KRES, VWIN, KSINK, VSINK, M_PART, L_PART, ACC_PART,
            qk_scale, bh, T_QCAP, R, S, n_sink, rest, n_kq, n_vq, split, NUM_SPLITS + N_TAIL, t_lo, t_lo + TAIL_TOKENS,
            BITS, GROUP, HQ_PER_KV, HQ_PAD, HEAD_DIM, TAIL_N, DOT_DTYPE,
        )  # fmt: skip
