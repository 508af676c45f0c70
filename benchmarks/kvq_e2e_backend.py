"""kvq-kernels attention backend for `e2e_decode.py`: one cache per layer, fused decode kernels.

bits 16: `decode_fp16` over fp16 K/V [B, H, T + 1, D]; bits 8 / 4 / 3 / 2: `decode_kivi` over a packed KIVI
cache, group and residual window kvq_sim.calibrate.E2E_KIVI_GROUP / E2E_KIVI_RESIDUAL (128 each, at every bit
width: the format kvq-sim counts for these rows), no sinks. The cache holds `context` random tokens (never
zero) plus the step's token: lens = context + 1 is fixed, so the step writes the new K/V into one fixed slot
(the fp16 tail / residual rings) with a plain copy and launches the kernel: no host syncs, no index lists,
CUDA-graph capturable. (A real server would quantize-and-flush through `append_kivi`; at one token per step
that is a ring write on 127 of 128 steps.)
"""

from __future__ import annotations

import torch

from kvq_kernels.benchmarking import fill_random
from kvq_kernels.decode_fp16 import decode_fp16
from kvq_kernels.decode_kivi import decode_kivi
from kvq_kernels.kivi_layout import allocate
from kvq_sim.calibrate import E2E_KIVI_GROUP as GROUP
from kvq_sim.calibrate import E2E_KIVI_RESIDUAL as RESIDUAL

#: decode_kivi launch config (BLOCK_N, num_warps, num_stages, prefetch) per bit width for LLaMA-7B's MHA (its
#: CUDA-core path), not a group size: fastest seen at 1 x 32 heads x 128K on the H100
#: (packages/kvq-kernels/benchmarks/tune_decode.py)
KIVI_CONFIG = {8: (32, 4, 1, True), 4: (32, 4, 1, True), 3: (32, 4, 1, False), 2: (64, 4, 1, False)}


class KvqCache:
    def __init__(self, s, batch: int, context: int, bits: int, device: str):
        self.bits, self.t = bits, context
        g = torch.Generator(device=device).manual_seed(1)
        lens = torch.full((batch,), context + 1, dtype=torch.int32, device=device)
        if bits == 16:
            shape = (batch, s.kv_heads, context + 1, s.head_dim)
            self.k = [torch.randn(shape, device=device, dtype=torch.float16, generator=g) for _ in range(s.layers)]
            self.v = [torch.randn(shape, device=device, dtype=torch.float16, generator=g) for _ in range(s.layers)]
            self.lens = lens
            return
        self.caches = []
        for _ in range(s.layers):
            c = allocate(batch, s.kv_heads, s.head_dim, context + 1, bits, GROUP, RESIDUAL, 0, device=device)
            fill_random(c, g)
            c.lens.copy_(lens)
            self.caches.append(c)
        self.slot = context % RESIDUAL  # post-sink index of the new token = context; ring slot p % R
        self.cfg = KIVI_CONFIG[bits]

    def attend(self, i, q, k, v):
        b, hq, _, d = q.shape
        if self.bits == 16:
            self.k[i][:, :, self.t] = k[:, :, 0]
            self.v[i][:, :, self.t] = v[:, :, 0]
            out = decode_fp16(q.view(b, hq, d), self.k[i], self.v[i], self.lens, validate_lens=False)
            return out.view(b, hq, 1, d)
        c = self.caches[i]
        c.k_res[:, :, self.slot] = k[:, :, 0]  # n_kq = context (a multiple of R): the new key is in the ring
        c.v_win[:, :, self.slot] = v[:, :, 0]
        bn, warps, stages, prefetch = self.cfg
        out = decode_kivi(
            q.view(b, hq, d), c, validate_lens=False, block_n=bn, num_warps=warps, num_stages=stages, prefetch=prefetch
        )
        return out.view(b, hq, 1, d)

    @property
    def nbytes(self) -> int:
        if self.bits == 16:
            return sum(t.nbytes for t in self.k + self.v) + self.lens.nbytes
        n = 0
        for c in self.caches:
            for name in (
                "k_codes",
                "k_scale",
                "k_zero",
                "v_codes",
                "v_scale",
                "v_zero",
                "k_res",
                "v_win",
                "k_sink",
                "v_sink",
                "lens",
            ):
                n += getattr(c, name).nbytes
        return n
