"""Device helpers that read and write kvq-core's packed code rows (`kvq_core.packing` layout).

Row of HEAD_DIM codes: 8 bits one code a byte; 4/2/1 bits 8/W codes a byte, code j at bit W * (j % (8/W))
of byte j // (8/W); 3 bits = a 2-bit plane (bits 0-1) of HEAD_DIM/4 bytes, then a 1-bit plane (bit 2)
of HEAD_DIM/8 bytes that pairs nibbles in blocks of 32 channels: byte b of block k holds channels 32k + 4b + i
in bits i = 0-3 and 32k + H + 4b + i in bits 4-7, H = 16 (8 when HEAD_DIM is 16: one block of 16). HEAD_DIM is a
power of two >= 16, so no row has a partial byte.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _spread(b, W: tl.constexpr, OUT: tl.constexpr):
    """uint8 bytes as int32 [N, NB] -> codes [N, NB, 8 // W] of dtype OUT in channel order (code 0 in the low bits).

    Codes become OUT (fp16 on the GPU: exact for codes <= 255) before they are interleaved, so the
    [N, HEAD_DIM] tile takes half the registers of int32.
    """
    MASK: tl.constexpr = (1 << W) - 1
    if W == 8:
        return b.to(OUT)[:, :, None]
    elif W == 4:
        return tl.join((b & MASK).to(OUT), ((b >> 4) & MASK).to(OUT))
    elif W == 2:
        c0 = (b & MASK).to(OUT)
        c1 = ((b >> 2) & MASK).to(OUT)
        c2 = ((b >> 4) & MASK).to(OUT)
        c3 = ((b >> 6) & MASK).to(OUT)
        # join(x, y) interleaves along a new last axis: (c0, c2), (c1, c3) -> c0 c1 c2 c3
        return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (b.shape[0], b.shape[1], 4))
    else:
        c0 = (b & 1).to(OUT)
        c1 = ((b >> 1) & 1).to(OUT)
        c2 = ((b >> 2) & 1).to(OUT)
        c3 = ((b >> 3) & 1).to(OUT)
        c4 = ((b >> 4) & 1).to(OUT)
        c5 = ((b >> 5) & 1).to(OUT)
        c6 = ((b >> 6) & 1).to(OUT)
        c7 = ((b >> 7) & 1).to(OUT)
        x = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
        return tl.reshape(x, (b.shape[0], b.shape[1], 8))


@triton.jit
def _load_plane(ROW_PTRS, row_mask, byte0, W: tl.constexpr, HEAD_DIM: tl.constexpr, OUT: tl.constexpr):
    """Codes [N, HEAD_DIM] of one W-bit plane starting at byte `byte0` of each row."""
    NB: tl.constexpr = HEAD_DIM * W // 8
    offs_b = tl.arange(0, NB)
    b = tl.load(ROW_PTRS[:, None] + byte0 + offs_b[None, :], mask=row_mask[:, None], other=0).to(tl.int32)
    return tl.reshape(_spread(b, W, OUT), (b.shape[0], HEAD_DIM))


@triton.constexpr_function
def pair_span(head_dim):
    """H of the 1-bit plane's nibble pairs (module docstring): 16, or 8 for a row of 16 channels."""
    return min(16, head_dim // 2)


@triton.jit
def _load_high_bits(ROW_PTRS, row_mask, HEAD_DIM: tl.constexpr, OUT: tl.constexpr):
    """Bit 2 [N, HEAD_DIM] of 3-bit codes from the 1-bit plane's HEAD_DIM / 8 bytes: spread as a plain 1-bit plane
    (bit 4h + i of byte b of a block -> channel H h + 4b + i of the block), then one permute puts them in order."""
    NB: tl.constexpr = HEAD_DIM // 8
    H: tl.constexpr = pair_span(HEAD_DIM)
    offs_b = tl.arange(0, NB)
    b = tl.load(ROW_PTRS[:, None] + HEAD_DIM // 4 + offs_b[None, :], mask=row_mask[:, None], other=0).to(tl.int32)
    h = tl.reshape(_spread(b, 1, OUT), (b.shape[0], HEAD_DIM // (2 * H), H // 4, 2, 4))  # [N, block, b, h, i]
    return tl.reshape(tl.permute(h, (0, 1, 3, 2, 4)), (b.shape[0], HEAD_DIM))


@triton.jit
def nibbles16(x):
    """The low nibbles of an int32's four bytes packed into bits 0-15 (byte b's at bits 4b .. 4b + 3)."""
    t = x & 0x0F0F0F0F
    t = (t | (t >> 4)) & 0x00FF00FF
    return (t & 0xFF) | ((t >> 8) & 0xFF00)


@triton.jit
def high_bits16(hw, w):
    """3-bit rows read as int32 words (HEAD_DIM >= 32): bit 2 of the 16 channels of 2-bit-plane word w (channels
    16w + k) as bits k of an int32, from `hw`, the 1-bit plane's word w // 2 read for each w: its low nibbles for
    even w, its high nibbles for odd w. w broadcasts against hw."""
    return nibbles16(hw >> ((w % 2) * 4))


@triton.jit
def load_codes(ROW_PTRS, row_mask, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, OUT: tl.constexpr):
    """Codes [N, HEAD_DIM] (dtype OUT: int32, fp16 or fp32) of N packed rows; ROW_PTRS [N] point at each row's first byte."""
    if BITS == 3:
        lo = _load_plane(ROW_PTRS, row_mask, 0, 2, HEAD_DIM, OUT)
        return lo + _load_high_bits(ROW_PTRS, row_mask, HEAD_DIM, OUT) * 4
    else:
        return _load_plane(ROW_PTRS, row_mask, 0, BITS, HEAD_DIM, OUT)


@triton.jit
def _store_bytes(ROW_PTRS, row_mask, byte0, b):
    """Bytes b [N, NB] (int32 < 256) to bytes byte0 .. byte0 + NB - 1 of N rows."""
    offs_b = tl.arange(0, b.shape[1])
    tl.store(ROW_PTRS[:, None] + byte0 + offs_b[None, :], b.to(tl.uint8), mask=row_mask[:, None])


@triton.jit
def _store_plane(ROW_PTRS, row_mask, byte0, codes, W: tl.constexpr, HEAD_DIM: tl.constexpr):
    PER: tl.constexpr = 8 // W
    NB: tl.constexpr = HEAD_DIM // PER
    c = tl.reshape(codes, (codes.shape[0], NB, PER))
    shifts = tl.arange(0, PER) * W
    _store_bytes(ROW_PTRS, row_mask, byte0, tl.sum(c << shifts[None, None, :], axis=2))  # disjoint bits: sum == or


@triton.jit
def store_codes(ROW_PTRS, row_mask, codes, BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Pack int32 codes [N, HEAD_DIM] (each < 2**BITS) into N rows starting at ROW_PTRS [N]."""
    if BITS == 3:
        _store_plane(ROW_PTRS, row_mask, 0, codes & 3, 2, HEAD_DIM)
        # nibble pairs: bit i of [N, block, h, b, i] goes to bit 4h + i of byte (block, b); disjoint bits: sum == or
        H: tl.constexpr = pair_span(HEAD_DIM)
        h = tl.reshape((codes >> 2) & 1, (codes.shape[0], HEAD_DIM // (2 * H), 2, H // 4, 4))
        shifts = 4 * tl.arange(0, 2)[:, None, None] + tl.arange(0, 4)[None, None, :]
        byte = tl.sum(tl.sum(h << shifts[None, None, :, :, :], axis=4), axis=2)
        _store_bytes(ROW_PTRS, row_mask, HEAD_DIM // 4, tl.reshape(byte, (codes.shape[0], HEAD_DIM // 8)))
    else:
        _store_plane(ROW_PTRS, row_mask, 0, codes, BITS, HEAD_DIM)
