"""Batched, capacity-preallocated tensors of a KIVI cache (one layer) as the kernels read and write them.

Per sequence the tokens are: S sinks (fp16), then the post-sink stream p = 0, 1, ..., rest - 1 with
rest = T - min(T, S). With R = residual_tokens and G = group_size (R % G == 0):

- keys   (per-channel, block flush): p < n_kq = rest - rest % R are quantized; the rest % R newest sit in
         the fp16 ring ``k_res`` at slot p % R. Key groups cover tokens [g*G, (g+1)*G), always full.
- values (per-token, sliding window): p < n_vq = rest - min(rest, R) are quantized; the min(rest, R)
         newest sit in the fp16 ring ``v_win`` at slot p % R.

This holds exactly the tensors `kvq_core.formats.kivi_format(bits, G, R)` counts (plus fp16 sinks),
laid out with a batch axis and a fixed capacity so that one launch serves the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvq_core.formats import packed_row_bytes

from ._launch import check, check_device, check_int, check_lens


@dataclass
class KiviCache:
    """Tensors (shapes with B = batch, H = kv_heads, Tq = quantized-token capacity, D = head_dim):

    k_codes, v_codes: uint8 [B, H, Tq, packed_row_bytes(bits, D)]   codes packed along channels
    k_scale, k_zero:  fp16  [B, H, Tq // G, D]                      per-channel key groups of G tokens
    v_scale, v_zero:  fp16  [B, H, Tq, D // min(G, D)]              per-token value groups of G channels
    k_res, v_win:     fp16  [B, H, R, D]                            rings, slot = post-sink index % R
    k_sink, v_sink:   fp16  [B, H, S, D]                            first S tokens
    lens:             int32 [B]                                     tokens T per sequence (sinks included)
    codebook:         fp16 [2**bits] levels in [-1, 1] for nuq (x = codebook[c] * scale + zero), else None
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    k_res: torch.Tensor
    v_win: torch.Tensor
    k_sink: torch.Tensor
    v_sink: torch.Tensor
    lens: torch.Tensor
    bits: int
    group_size: int
    residual_tokens: int
    sink_tokens: int
    codebook: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.k_codes.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k_codes.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_res.shape[-1]

    @property
    def quant_capacity(self) -> int:
        return self.k_codes.shape[2]

    @property
    def capacity(self) -> int:
        """Most tokens a sequence can hold: sinks + quantized capacity + R - 1. The key ring flushes when it
        holds R tokens, so at S + Tq + R tokens n_kq = Tq + R key rows would overrun the Tq-row codes."""
        return self.sink_tokens + self.quant_capacity + self.residual_tokens - 1

    def counts(self, t: int) -> dict[str, int]:
        """Where a T-token sequence's tokens live: sinks, n_kq, n_vq, rest (post-sink tokens)."""
        s = min(t, self.sink_tokens)
        rest = t - s
        r = self.residual_tokens
        return {"sinks": s, "rest": rest, "n_kq": rest - rest % r, "n_vq": rest - min(rest, r)}

    def bytes_read(self) -> int:
        """Bytes a decode step reads at the current lens: valid codes, metadata, rings, sinks (host sync)."""
        h, d, g = self.kv_heads, self.head_dim, self.group_size
        row = packed_row_bytes(self.bits, d)
        ngv = d // min(g, d)
        total = 0
        for t in self.lens.tolist():
            c = self.counts(t)
            total += h * (c["n_kq"] + c["n_vq"]) * row  # codes
            total += h * (c["n_kq"] // g) * d * 2 * 2  # key scale + zero
            total += h * c["n_vq"] * ngv * 2 * 2  # value scale + zero
            total += h * (c["rest"] - c["n_kq"] + c["rest"] - c["n_vq"] + 2 * c["sinks"]) * d * 2
        return total


def quant_rows(capacity: int, residual_tokens: int, sink_tokens: int = 0) -> int:
    """Quantized rows `allocate` gives a cache of `capacity` tokens: the post-sink tokens in whole flush blocks."""
    tq = max(0, capacity - sink_tokens)
    return -(-tq // residual_tokens) * residual_tokens


def allocate(
    batch: int,
    kv_heads: int,
    head_dim: int,
    capacity: int,
    bits: int,
    group_size: int = 32,
    residual_tokens: int = 128,
    sink_tokens: int = 0,
    device: torch.device | str = "cpu",
    codebook: torch.Tensor | None = None,
) -> KiviCache:
    """An empty cache able to hold `capacity` tokens per sequence (lens = 0).

    codebook: None (uniform codes) or finite fp16 [2**bits] levels in [-1, 1] (nuq), on `device`.
    """
    check_int("batch", batch, 0)
    check_int("kv_heads", kv_heads, 1)
    check_int("capacity", capacity, 0)
    check_int("sink_tokens", sink_tokens, 0)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits!r}")
    if not isinstance(head_dim, int) or head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim!r}")
    if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size!r}")
    if not isinstance(residual_tokens, int) or residual_tokens < group_size or residual_tokens % group_size:
        raise ValueError(
            f"residual_tokens ({residual_tokens!r}) must be a positive multiple of group_size ({group_size})"
        )
    tq = quant_rows(capacity, residual_tokens, sink_tokens)
    b, h, d, g, r, s = batch, kv_heads, head_dim, group_size, residual_tokens, sink_tokens
    row = packed_row_bytes(bits, d)
    f16 = dict(dtype=torch.float16, device=device)
    cache = KiviCache(
        k_codes=torch.zeros(b, h, tq, row, dtype=torch.uint8, device=device),
        k_scale=torch.zeros(b, h, tq // g, d, **f16),
        k_zero=torch.zeros(b, h, tq // g, d, **f16),
        v_codes=torch.zeros(b, h, tq, row, dtype=torch.uint8, device=device),
        v_scale=torch.zeros(b, h, tq, d // min(g, d), **f16),
        v_zero=torch.zeros(b, h, tq, d // min(g, d), **f16),
        k_res=torch.zeros(b, h, r, d, **f16),
        v_win=torch.zeros(b, h, r, d, **f16),
        k_sink=torch.zeros(b, h, s, d, **f16),
        v_sink=torch.zeros(b, h, s, d, **f16),
        lens=torch.zeros(b, dtype=torch.int32, device=device),
        bits=bits,
        group_size=g,
        residual_tokens=r,
        sink_tokens=s,
        codebook=codebook,
    )
    if codebook is not None:
        check_codebook(codebook, bits, cache.k_codes.device)
    return cache


def check_codebook(codebook: torch.Tensor, bits: int, device: torch.device) -> None:
    """fp16 [2**bits] finite levels in [-1, 1] on `device` (reads the levels on the host: not for hot paths)."""
    check("codebook", codebook, torch.float16, (2**bits,))
    check_device("codebook", codebook, device)
    if not bool(torch.isfinite(codebook).all()) or float(codebook.abs().max()) > 1:
        raise ValueError(f"codebook levels must be finite and in [-1, 1], got {codebook.tolist()}")


def check_cache(c: KiviCache, device: torch.device, validate_lens: bool = True) -> int | None:
    """Raise ValueError unless every tensor of `c` has the dtype, shape and device its parameters imply.
    With validate_lens, reads lens on the host (one device sync), checks them and returns the longest."""
    if not isinstance(c, KiviCache):
        raise ValueError(f"cache must be a kvq_kernels.kivi_layout.KiviCache, got {type(c).__name__}")
    if c.bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {c.bits}")
    for name in ("k_codes", "k_res"):
        t = getattr(c, name)
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"cache.{name} must be a 4-D [batch, kv_heads, ...] tensor, got {getattr(t, 'shape', t)!r}"
            )
    b, h, tq = c.k_codes.shape[:3]
    d = c.k_res.shape[-1]
    g, r, s = c.group_size, c.residual_tokens, c.sink_tokens
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if g < 16 or g & (g - 1) or r < g or r % g or tq % r:
        raise ValueError(
            "need group_size a power of two >= 16 dividing residual_tokens dividing the quantized capacity; "
            f"got G={g}, R={r}, Tq={tq}"
        )
    if h < 1:
        raise ValueError(f"cache needs at least one kv head, got k_codes of shape {list(c.k_codes.shape)}")
    row = packed_row_bytes(c.bits, d)
    ngv = d // min(g, d)
    shapes = {
        "k_codes": (torch.uint8, (b, h, tq, row)),
        "v_codes": (torch.uint8, (b, h, tq, row)),
        "k_scale": (torch.float16, (b, h, tq // g, d)),
        "k_zero": (torch.float16, (b, h, tq // g, d)),
        "v_scale": (torch.float16, (b, h, tq, ngv)),
        "v_zero": (torch.float16, (b, h, tq, ngv)),
        "k_res": (torch.float16, (b, h, r, d)),
        "v_win": (torch.float16, (b, h, r, d)),
        "k_sink": (torch.float16, (b, h, s, d)),
        "v_sink": (torch.float16, (b, h, s, d)),
    }
    for name, (dtype, shape) in shapes.items():
        check(f"cache.{name}", getattr(c, name), dtype, shape)
        check_device(f"cache.{name}", getattr(c, name), device)
    if c.codebook is not None:
        check("cache.codebook", c.codebook, torch.float16, (2**c.bits,))
        check_device("cache.codebook", c.codebook, device)
    return check_lens(c.lens, b, c.capacity, device, validate_lens)
