"""Quantize + pack new tokens into a `KiviCache` (prefill blocks and single decode tokens).

Two Triton kernels do the arithmetic; the launcher (`append_kivi`) gathers which rows leave the fp16
rings and writes the rings, sinks and lens with torch indexing:

- `_quantize_tokens`: per-token value rows [N, D] -> packed codes + scale/zero per group of G channels.
- `_quantize_channels`: KIVI key flush, blocks of G tokens [G, D] -> G packed rows + one scale/zero per channel.

Both compute the grid exactly as `kvq_core.quant.choose_qparams` / `quantize` do for fp16 input, so the
output is bit-identical: zero = group min (an fp16 value, exact), scale = the smallest fp16 >= (max - min)
/ (levels - 1) evaluated in fp64, code = round-half-even((x - zero) / scale) in fp64, clamped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvq_core.packing import pack
from kvq_core.quant import check_finite, choose_qparams, quantize

from ._launch import check, check_device, check_int, check_launchable
from .kivi_layout import KiviCache, check_cache
from .packed import store_codes


@triton.jit
def _qparams(mn, mx, LEVELS: tl.constexpr):
    """fp64 group min/max -> (scale fp64 of the fp16 rounded up, zero fp64); as kvq_core.quant.choose_qparams."""
    s64 = tl.maximum(mx - mn, 0.0) / (LEVELS - 1)
    s16 = s64.to(tl.float16)
    up = (s16.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)  # next fp16 up (s >= 0)
    s16 = tl.where(s16.to(tl.float64) < s64, up, s16)
    return s16.to(tl.float64), mn


@triton.jit
def _codes(x, scale, zero, LEVELS: tl.constexpr):
    """round-half-even((x - zero) / scale) clamped to [0, LEVELS - 1] (fp64, as torch.round); 0 where scale is 0."""
    y = (x - zero) / tl.where(scale > 0, scale, 1.0)
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where((r - y == 0.5) & odd, r - 1.0, r)  # tie to even
    r = tl.minimum(tl.maximum(r, 0.0), LEVELS - 1.0)
    return tl.where(scale > 0, r, 0.0).to(tl.int32)


@triton.jit
def _quantize_tokens(
    X, CODES, SCALE, ZERO, DST_ROWS,
    BITS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, N,
):  # fmt: skip
    """Rows X[i] (fp16 [N, D]) -> packed codes at row DST_ROWS[i] of CODES and scale/zero [D // GROUP] there."""
    NG: tl.constexpr = HEAD_DIM // GROUP
    LEVELS: tl.constexpr = 1 << BITS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    x = tl.reshape(x.to(tl.float64), (BLOCK_M, NG, GROUP))
    scale, zero = _qparams(tl.min(x, 2), tl.max(x, 2), LEVELS)  # [BLOCK_M, NG]
    c = tl.reshape(_codes(x, scale[:, :, None], zero[:, :, None], LEVELS), (BLOCK_M, HEAD_DIM))
    dst = tl.load(DST_ROWS + offs_m, mask=m_mask, other=0)  # int64 row index into [B * H * Tq]
    store_codes(CODES + dst * (HEAD_DIM * BITS // 8), m_mask, c, BITS, HEAD_DIM)
    offs_g = tl.arange(0, NG)
    mptr = dst[:, None] * NG + offs_g[None, :]
    tl.store(SCALE + mptr, scale.to(tl.float16), mask=m_mask[:, None])
    tl.store(ZERO + mptr, zero.to(tl.float16), mask=m_mask[:, None])


@triton.jit
def _quantize_channels(
    X, CODES, SCALE, ZERO, DST_ROW0,
    BITS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """Block i of X (fp16 [N, GROUP, D]) -> GROUP packed rows from row DST_ROW0[i]; per-channel scale/zero
    [D] at group row DST_ROW0[i] // GROUP. A negative DST_ROW0[i] skips block i (a caller that decides on the
    device which blocks are full, as a CUDA graph must)."""
    LEVELS: tl.constexpr = 1 << BITS
    i = tl.program_id(0).to(tl.int64)
    if tl.load(DST_ROW0 + i) < 0:
        return
    offs_t = tl.arange(0, GROUP)
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + (i * GROUP + offs_t)[:, None] * HEAD_DIM + offs_d[None, :]).to(tl.float64)
    scale, zero = _qparams(tl.min(x, 0), tl.max(x, 0), LEVELS)  # [D]
    c = _codes(x, scale[None, :], zero[None, :], LEVELS)
    row0 = tl.load(DST_ROW0 + i)
    rows = row0 + offs_t
    store_codes(CODES + rows * (HEAD_DIM * BITS // 8), offs_t < GROUP, c, BITS, HEAD_DIM)
    tl.store(SCALE + (row0 // GROUP) * HEAD_DIM + offs_d, scale.to(tl.float16))
    tl.store(ZERO + (row0 // GROUP) * HEAD_DIM + offs_d, zero.to(tl.float16))


def quantize_token_rows(x: torch.Tensor, codes, scale, zero, dst_rows: torch.Tensor, bits: int, group: int) -> None:
    """x fp16 [N, D]; codes uint8 [..., row_bytes], scale/zero fp16 [..., D // min(G, D)] viewed flat by row."""
    n, d = x.shape
    if n == 0:
        return
    block_m = 16
    _quantize_tokens[(triton.cdiv(n, block_m),)](
        x, codes, scale, zero, dst_rows, BITS=bits, HEAD_DIM=d, GROUP=min(group, d), BLOCK_M=block_m, N=n
    )


def quantize_channel_blocks(x: torch.Tensor, codes, scale, zero, dst_row0: torch.Tensor, bits: int) -> None:
    """x fp16 [N, G, D] blocks of G tokens; dst_row0 int64 [N]: each block's first row in the flat codes, or
    negative to leave that block unwritten."""
    n, g, d = x.shape
    if n == 0:
        return
    _quantize_channels[(n,)](x, codes, scale, zero, dst_row0, BITS=bits, HEAD_DIM=d, GROUP=g)


def append_kivi(
    cache: KiviCache,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    lens_host: list[int] | None = None,
    check_values: bool = True,
) -> None:
    """Append n new tokens per sequence (k_new, v_new fp16 [B, H, n, D], on the cache's device) to `cache` in place.

    Values leaving the R-token window are quantized per token; each time R keys have gathered in the
    residual ring they are quantized per channel in groups of G (block flush). Reads lens on the host
    (one sync) unless the caller passes them as `lens_host` (it must equal cache.lens).
    check_values=True raises, as kvq_core.quant does, if k_new or v_new holds NaN or Inf (the group min/max
    would store them as finite codes), and checks lens_host against cache.lens: one device sync, which waits
    for all queued GPU work. A caller that cannot sync per token (a decode loop, CUDA-graph capture) passes
    False and handles non-finite input itself (`hf_attention.KiviKernelStore` turns its output to NaN).
    """
    c = cache
    if not isinstance(c, KiviCache) or not isinstance(c.k_codes, torch.Tensor):
        raise ValueError(f"cache must be a KiviCache (kivi_layout.allocate), got {type(c).__name__}")
    dev = c.k_codes.device
    check_cache(c, dev, validate_lens=False)
    b, h, d = c.batch, c.kv_heads, c.head_dim
    if not isinstance(k_new, torch.Tensor) or k_new.dim() != 4:
        raise ValueError(f"k_new must be [batch, kv_heads, new_tokens, head_dim], got {getattr(k_new, 'shape', None)}")
    n = k_new.shape[2]
    check("k_new", k_new, torch.float16, (b, h, n, d))
    check("v_new", v_new, torch.float16, (b, h, n, d))
    check_device("k_new", k_new, dev)
    check_device("v_new", v_new, dev)
    check_launchable(dev)
    if lens_host is None:
        lens = c.lens.tolist()
    else:
        if not isinstance(lens_host, (list, tuple)) or len(lens_host) != b:
            raise ValueError(f"lens_host must be a list of {b} lengths, got {lens_host!r}")
        for x in lens_host:
            check_int("lens_host entry", x, 0, c.capacity)
        lens = list(lens_host)
        if check_values and lens != c.lens.tolist():
            raise ValueError(f"lens_host {lens} differs from cache.lens {c.lens.tolist()}")
    if min(lens, default=0) < 0 or max(lens, default=0) > c.capacity:
        raise ValueError(f"cache.lens must lie in [0, {c.capacity}] (the cache capacity), got {lens}")
    if max(lens, default=0) + n > c.capacity:
        raise ValueError(f"appending {n} tokens to lens up to {max(lens)} exceeds the capacity {c.capacity}")
    if check_values:
        check_finite(k_new, "k_new")
        check_finite(v_new, "v_new")
    s, r, g, tq = c.sink_tokens, c.residual_tokens, c.group_size, c.quant_capacity
    v_src, v_dst, k_src, k_dst = [], [], [], []
    ring_writes = []  # (b, kv, slot tensor, new-token index tensor)
    for i, t0 in enumerate(lens):
        t1 = t0 + n
        if t0 < s:  # sinks
            e = min(t1, s)
            c.k_sink[i, :, t0:e] = k_new[i, :, : e - t0]
            c.v_sink[i, :, t0:e] = v_new[i, :, : e - t0]
        r0, r1 = max(t0 - s, 0), max(t1 - s, 0)
        off = s - t0  # post-sink index p is new token p + off
        vq0, vq1 = r0 - min(r0, r), r1 - min(r1, r)
        kq0, kq1 = r0 - r0 % r, r1 - r1 % r
        for ring, new, q0, q1, src, dst in (
            (c.v_win, v_new, vq0, vq1, v_src, v_dst),
            (c.k_res, k_new, kq0, kq1, k_src, k_dst),
        ):
            if q1 > q0:
                old = list(range(q0, min(q1, r0)))
                fresh = list(range(max(q0, r0), q1))
                parts = [ring[i][:, [p % r for p in old]]] if old else []
                parts += [new[i][:, [p + off for p in fresh]]] if fresh else []
                src.append(torch.cat(parts, dim=1))  # [H, q1 - q0, D] in token order
                dst.append((i, q0, q1))
            keep0 = max(r0, q1)
            if r1 > keep0:
                ps = list(range(keep0, r1))
                ring_writes.append((ring, i, [p % r for p in ps], new[i][:, [p + off for p in ps]]))
    if v_src:
        x = torch.cat([t.reshape(-1, d) for t in v_src])  # rows ordered (seq, head, token)
        rows = [((i * h + hh) * tq + p) for i, q0, q1 in v_dst for hh in range(h) for p in range(q0, q1)]
        quantize_token_rows(
            x.contiguous(), c.v_codes, c.v_scale, c.v_zero, torch.tensor(rows, dtype=torch.int64, device=dev), c.bits, g
        )
    if k_src:
        x = torch.cat([t.reshape(h, -1, g, d).reshape(-1, g, d) for t in k_src])  # blocks (seq, head, group)
        row0 = [((i * h + hh) * tq + p) for i, q0, q1 in k_dst for hh in range(h) for p in range(q0, q1, g)]
        quantize_channel_blocks(
            x.contiguous(), c.k_codes, c.k_scale, c.k_zero, torch.tensor(row0, dtype=torch.int64, device=dev), c.bits
        )
    for ring, i, slots, vals in ring_writes:  # after the gathers above read the old ring contents
        ring[i][:, slots] = vals
    c.lens += n


def kivi_from_dense(cache: KiviCache, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> None:
    """The spec: fill an empty `cache` from dense fp16 k, v [B, H, T, D] with kvq_core.quant + packing."""
    c = cache
    r, g, bits = c.residual_tokens, c.group_size, c.bits
    for i, t in enumerate(lens):
        n = c.counts(t)
        ns = n["sinks"]
        c.k_sink[i, :, :ns] = k[i, :, :ns]
        c.v_sink[i, :, :ns] = v[i, :, :ns]
        post_k, post_v = k[i, :, ns:t], v[i, :, ns:t]
        if n["n_kq"]:
            x = post_k[:, : n["n_kq"]]
            sc, z = choose_qparams(x, bits, axis="channel", group_size=g)
            c.k_codes[i, :, : n["n_kq"]] = pack(quantize(x, sc, z, bits, axis="channel", group_size=g), bits)
            c.k_scale[i, :, : n["n_kq"] // g], c.k_zero[i, :, : n["n_kq"] // g] = sc, z
        if n["n_vq"]:
            x = post_v[:, : n["n_vq"]]
            sc, z = choose_qparams(x, bits, axis="token", group_size=g)
            c.v_codes[i, :, : n["n_vq"]] = pack(quantize(x, sc, z, bits, axis="token", group_size=g), bits)
            c.v_scale[i, :, : n["n_vq"]], c.v_zero[i, :, : n["n_vq"]] = sc, z
        for p in range(n["n_kq"], n["rest"]):
            c.k_res[i, :, p % r] = post_k[:, p]
        for p in range(n["n_vq"], n["rest"]):
            c.v_win[i, :, p % r] = post_v[:, p]
        c.lens[i] = t
