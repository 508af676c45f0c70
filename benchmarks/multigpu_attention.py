"""One GPU's share of decode attention for `multigpu_decode.py`: its KV cache, attention, and softmax-state merge.

Tensor parallelism: a GPU holds all tokens of its KV heads and calls the public kvq kernels (`decode_fp16`,
`decode_kivi`), whose output is final. Context parallelism: a GPU holds a slice of every sequence's tokens
and needs the softmax state of its slice (max m, sum l, unnormalized acc, log2 units as in
`kvq_kernels.combine`), which the public launchers fold away. `fp16_state` (`decode_fp16_state`) and
`kivi_state` (`decode_kivi`'s own `launch_plan` and `decode_kivi_state`) therefore launch the same split-KV
kernels and return the partial states; `merge_splits` folds a GPU's splits into one state and `merge_ranks`
merges the GPUs' states with kvq's `combine` kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvq_core.formats import packed_row_bytes
from kvq_kernels.benchmarking import fill_random
from kvq_kernels.combine import combine
from kvq_kernels.decode_fp16 import decode_fp16, decode_fp16_state
from kvq_kernels.decode_kivi import decode_kivi, decode_kivi_state, dequantize_cache, launch_plan
from kvq_kernels.kivi_layout import KiviCache, allocate
from kvq_sim.calibrate import E2E_KIVI_GROUP as GROUP  # e2e_decode's packed format
from kvq_sim.calibrate import E2E_KIVI_RESIDUAL as RESIDUAL

#: KV format name -> bits per element (16 = fp16 K and V; else KIVI, group 128, residual 128, no sinks)
KV_BITS = {"fp16": 16, "kivi4": 4, "kivi2": 2}


def kv_bits(kv: str) -> int:
    if kv not in KV_BITS:
        raise ValueError(f"unknown KV format {kv!r}; valid: {', '.join(KV_BITS)}")
    return KV_BITS[kv]


@dataclass(frozen=True)
class KvSpec:
    """The cache one GPU holds for one layer: `old_tokens` cached tokens per sequence, plus one slot for the
    step's new token when `appends` (tensor parallelism: every GPU; context parallelism: the last one)."""

    kv: str
    batch: int
    kv_heads: int
    head_dim: int
    old_tokens: int
    appends: bool

    @property
    def tokens(self) -> int:
        return self.old_tokens + int(self.appends)

    def layer_bytes(self) -> int:
        """Bytes of the tensors `LayerCache` allocates for one layer (the CPU test holds them equal)."""
        b, h, d, t = self.batch, self.kv_heads, self.head_dim, self.tokens
        bits = kv_bits(self.kv)
        if bits == 16:
            return 2 * b * h * t * d * 2 + b * 4  # K, V fp16 + int32 lens
        tq = -(-t // RESIDUAL) * RESIDUAL  # allocate(): whole flush blocks of quantized capacity
        codes = 2 * b * h * tq * packed_row_bytes(bits, d)
        k_meta = 2 * b * h * (tq // GROUP) * d * 2  # per-channel key scale + zero
        v_meta = 2 * b * h * tq * (d // min(GROUP, d)) * 2  # per-token value scale + zero
        rings = 2 * b * h * RESIDUAL * d * 2
        return codes + k_meta + v_meta + rings + b * 4


class LayerCache:
    """One layer's KV cache on one GPU, filled with random data (never zeros), lens = spec.tokens.

    fp16: k, v [batch, kv_heads, tokens, head_dim] in `dtype` (the kernel reads K/V in q's dtype: fp32 in the
    CPU test); the new token goes to slot old_tokens.
    KIVI: a `KiviCache` (group 128, residual 128); old_tokens is a multiple of 128, so the new token is the
    first of a fresh key ring and the newest of the value window: both fp16 rings, slot old_tokens % 128,
    written with a plain copy (no host sync, CUDA-graph capturable).
    """

    def __init__(self, spec: KvSpec, heads: int, seed: int, device, dtype=torch.float16):
        self.spec, self.heads = spec, heads
        self.bits = kv_bits(spec.kv)
        b, h, d, t = spec.batch, spec.kv_heads, spec.head_dim, spec.tokens
        g = torch.Generator(device=device).manual_seed(seed)
        self.lens = torch.full((b,), t, dtype=torch.int32, device=device)
        if self.bits == 16:
            self.k = torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g)
            self.v = torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g)
            return
        if spec.old_tokens % RESIDUAL:
            raise ValueError(f"a KIVI shard holds a multiple of {RESIDUAL} tokens, got {spec.old_tokens}")
        c = fill_random(allocate(b, h, d, t, self.bits, GROUP, RESIDUAL, 0, device=device), g)
        c.lens.copy_(self.lens)
        self.kivi: KiviCache = c
        self.slot = spec.old_tokens % RESIDUAL

    @property
    def nbytes(self) -> int:
        if self.bits == 16:
            return self.k.nbytes + self.v.nbytes + self.lens.nbytes
        c = self.kivi
        parts = (c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero, c.k_res, c.v_win, c.k_sink, c.v_sink)
        return sum(x.nbytes for x in parts) + c.lens.nbytes

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the step's new token: k, v [batch, kv_heads, head_dim]; no-op on a GPU that does not append."""
        if not self.spec.appends:
            return
        if self.bits == 16:
            t = self.spec.old_tokens
            self.k[:, :, t] = k
            self.v[:, :, t] = v
        else:
            self.kivi.k_res[:, :, self.slot] = k
            self.kivi.v_win[:, :, self.slot] = v

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention output [batch, heads, head_dim] of q [batch, heads, head_dim] over this cache."""
        if self.bits == 16:
            return decode_fp16(q, self.k, self.v, self.lens, validate_lens=False)
        return decode_kivi(q, self.kivi, validate_lens=False)  # its own path and launch defaults

    def state(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-split softmax state of q over this cache: m, l [B * heads, splits], acc [B * heads, splits, D]."""
        if self.bits == 16:
            return fp16_state(q, self.k, self.v, self.lens)
        return kivi_state(q, self.kivi)

    def old_kv(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 K, V [len(rows), kv_heads, old_tokens, head_dim] of the cached tokens (KIVI: kvq_core's
        dequantization, the spec), for the single-process reference."""
        t = self.spec.old_tokens
        if self.bits == 16:
            return self.k[rows, :, :t].float(), self.v[rows, :, :t].float()
        kv = [dequantize_cache(self.kivi, b) for b in rows]
        return torch.stack([k[:, :t] for k, _ in kv]), torch.stack([v[:, :t] for _, v in kv])


def fp16_state(q, k, v, lens):
    """`decode_fp16`'s launch without its combine; shapes as there (lens guaranteed by the caller)."""
    return decode_fp16_state(q, k, v, lens, validate_lens=False)


def kivi_state(q, c: KiviCache):
    """`decode_kivi`'s launch (its `launch_plan`, path "auto") without its combine (lens guaranteed by the caller)."""
    return decode_kivi_state(q, c, launch_plan(q, c, validate_lens=False))


def merge_splits(m: torch.Tensor, l_part: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Fold the splits of one GPU into one state, packed [rows, D + 2] fp32 as (acc, m, l).

    The same merge as `combine.merge_state`, in torch: m = max_s m_s, l = sum_s l_s 2^(m_s - m),
    acc = sum_s acc_s 2^(m_s - m). Every split of a GPU's slice holds tokens, so m is finite.
    """
    m_max = m.amax(1, keepdim=True)  # [rows, 1]
    w = torch.exp2(m - m_max)  # [rows, splits]
    l_sum = (l_part * w).sum(1, keepdim=True)
    acc_sum = (acc * w[:, :, None]).sum(1)  # [rows, D]
    return torch.cat([acc_sum, m_max, l_sum], 1)


def merge_ranks(states: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Merge the GPUs' states [world, rows, D + 2] (each from `merge_splits`) into out [B, heads, D] with
    kvq's split-KV combine kernel: the GPUs are its splits."""
    d = states.shape[2] - 2
    acc = states[:, :, :d].transpose(0, 1).contiguous()  # [rows, world, D]
    m = states[:, :, d].t().contiguous()  # [rows, world]
    l_part = states[:, :, d + 1].t().contiguous()
    return combine(m, l_part, acc, out)
