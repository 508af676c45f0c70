"""Bit packing of integer codes into uint8 rows, in the layout `formats.packed_row_bytes` counts.

Layout of one row of n codes (packed along the last dimension):

- 8 bits: one code per byte.
- 1/2/4 bits: 8/w codes per byte, code j in byte j // (8/w) at bit offset w * (j % (8/w))
  (little-endian within the byte: code 0 in the low bits).
- 3/5/6/7 bits: bit planes (`formats.bit_planes`), e.g. 3 = a 2-bit plane (bits 0-1 of every code)
  followed by a 1-bit plane (bit 2), concatenated along the row:
  ``row = [plane0 bytes (ceil(n*2/8)) | plane1 bytes (ceil(n/8))]``. 8 codes of 3 bits take 3 bytes.
  The 2- and 4-bit planes are packed as above. The 1-bit plane pairs nibbles within each block of 32 codes
  (4 bytes): byte b of block k holds codes 32k + 4b .. 32k + 4b + 3 in bits 0-3 and codes 32k + 16 + 4b ..
  32k + 16 + 4b + 3 in bits 4-7. A last, partial block of m codes pairs at 4 * ceil(m / 8) instead of 16 (its
  ceil(m / 8) bytes). So every 32-bit word of the plane still holds the high bits of its own 32 codes, and the
  2-bit plane's byte w (codes 4w .. 4w + 3) finds them in one nibble of byte (w // 8) * 4 + w % 4: a GPU
  kernel that reads the 2-bit plane's bytes as one tile reads the 1-bit plane four contiguous bytes at a time
  (`kvq_kernels.decode_kivi_frag`).
- 1.5 (ternary, codes 0..2): 5 codes per byte, byte = sum(code_i * 3**i), i = 0..4.

A partial last byte is zero-padded; `unpack` takes the row length n to drop the padding.
"""

from __future__ import annotations

import math

import torch

from .formats import TERNARY, TRITS_PER_BYTE, bit_planes, packed_row_bytes

__all__ = ["pack", "unpack", "packed_row_bytes"]


def _pack_plane(codes: torch.Tensor, w: int) -> torch.Tensor:
    per = 8 // w
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * w
    return (c << shifts).sum(-1).to(torch.uint8)


def _unpack_plane(packed: torch.Tensor, w: int, n: int) -> torch.Tensor:
    per = 8 // w
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * w
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << w) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n].to(torch.uint8)


def _pair_nibbles(bits1: torch.Tensor, nb: int) -> torch.Tensor:
    """0/1 int32 [..., 8 * nb] -> uint8 [..., nb]: byte u holds codes 4u .. 4u + 3 (bits 0-3) and 4 nb + 4u ..
    4 nb + 4u + 3 (bits 4-7)."""
    halves = bits1.reshape(*bits1.shape[:-1], 2, nb, 4)  # [..., half, byte, bit of the nibble]
    shifts = 4 * torch.arange(2, device=bits1.device)[:, None, None] + torch.arange(4, device=bits1.device)
    return (halves << shifts).sum((-3, -1)).to(torch.uint8)


def _split_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pair_nibbles`: uint8 [..., nb] -> 0/1 int32 [..., 8 * nb]."""
    shifts = 4 * torch.arange(2, device=packed.device)[:, None, None] + torch.arange(4, device=packed.device)
    b = packed.to(torch.int32)[..., None, :, None]  # [..., 1, byte, 1]
    return ((b >> shifts) & 1).reshape(*packed.shape[:-1], 8 * packed.shape[-1])


def _pack_high_plane(bits1: torch.Tensor) -> torch.Tensor:
    """The 1-bit plane of a multi-plane row (0/1 int32 [..., n]) -> uint8 [..., ceil(n / 8)] (module docstring)."""
    n = bits1.shape[-1]
    full, m = divmod(n, 32)
    parts = [torch.zeros(*bits1.shape[:-1], 0, dtype=torch.uint8, device=bits1.device)]  # rows of 0 codes
    if full:
        blocks = bits1[..., : 32 * full].reshape(*bits1.shape[:-1], full, 32)
        parts.append(_pair_nibbles(blocks, 4).reshape(*bits1.shape[:-1], 4 * full))
    if m:
        nb = math.ceil(m / 8)
        parts.append(_pair_nibbles(torch.nn.functional.pad(bits1[..., 32 * full :], (0, 8 * nb - m)), nb))
    return torch.cat(parts, dim=-1)


def _unpack_high_plane(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `_pack_high_plane`: uint8 [..., ceil(n / 8)] -> 0/1 int32 [..., n]."""
    full, m = divmod(n, 32)
    parts = [torch.zeros(*packed.shape[:-1], 0, dtype=torch.int32, device=packed.device)]  # rows of 0 codes
    if full:
        blocks = packed[..., : 4 * full].reshape(*packed.shape[:-1], full, 4)
        parts.append(_split_nibbles(blocks).reshape(*packed.shape[:-1], 32 * full))
    if m:
        parts.append(_split_nibbles(packed[..., 4 * full :])[..., :m])
    return torch.cat(parts, dim=-1)


def pack(codes: torch.Tensor, bits: float) -> torch.Tensor:
    """Pack integer codes in ``[0, levels)`` along the last dim into uint8 ``[..., packed_row_bytes(bits, n)]``.

    >>> pack(torch.tensor([1, 2, 3, 0, 3]), 2)   # 1 | 2<<2 | 3<<4 | 0<<6 = 57; then 3
    tensor([57,  3], dtype=torch.uint8)
    """
    n = codes.shape[-1]
    if codes.dtype.is_floating_point:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    levels = 3 if bits == TERNARY else 2 ** int(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= levels):
        raise ValueError(f"codes out of range for {bits}-bit packing: need 0..{levels - 1}")
    if bits == TERNARY:
        pad = (-n) % TRITS_PER_BYTE
        c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
        c = c.reshape(*c.shape[:-1], c.shape[-1] // TRITS_PER_BYTE, TRITS_PER_BYTE).to(torch.int32)
        powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int32, device=codes.device)
        out = (c * powers).sum(-1).to(torch.uint8)
    else:
        planes, shift, ws = [], 0, bit_planes(int(bits))
        for w in ws:
            part = (codes.to(torch.int32) >> shift) & ((1 << w) - 1)
            planes.append(_pack_high_plane(part) if w == 1 and len(ws) > 1 else _pack_plane(part, w))
            shift += w
        out = torch.cat(planes, dim=-1) if len(planes) > 1 else planes[0]
    assert out.shape[-1] == packed_row_bytes(bits, n)
    return out.contiguous()


def unpack(packed: torch.Tensor, bits: float, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 ``[..., packed_row_bytes(bits, n)]`` -> uint8 codes ``[..., n]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_row_bytes(bits, n):
        raise ValueError(
            f"packed row has {packed.shape[-1]} bytes, {bits}-bit rows of {n} codes need {packed_row_bytes(bits, n)}"
        )
    if bits == TERNARY:
        powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int32, device=packed.device)
        c = (packed.to(torch.int32).unsqueeze(-1) // powers) % 3
        return c.reshape(*packed.shape[:-1], packed.shape[-1] * TRITS_PER_BYTE)[..., :n].to(torch.uint8)
    out = torch.zeros(*packed.shape[:-1], n, dtype=torch.int32, device=packed.device)
    start, shift, ws = 0, 0, bit_planes(int(bits))
    for w in ws:
        nb = math.ceil(n * w / 8)
        plane = packed[..., start : start + nb]
        part = _unpack_high_plane(plane, n) if w == 1 and len(ws) > 1 else _unpack_plane(plane, w, n).to(torch.int32)
        out |= part << shift
        start += nb
        shift += w
    return out.to(torch.uint8)
