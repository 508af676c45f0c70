"""End-to-end decode step of a LLaMA-7B-shaped model with random fp16 weights, over a quantized KV cache.

Each layer: RMSNorm, fused QKV projection, RoPE, append of the new token's K/V, decode attention over the
cache, output projection, RMSNorm, SwiGLU MLP; then the final norm and LM head. One step decodes one token
per sequence at a fixed context. The shape is configs/models/llama-7b.yaml (kvq_sim.calibrate.E2E_MODEL,
the model kvq-sim's e2e calibration assumes), read through kvq_sim. Timed per step with CUDA graph replays
(median of `triton.testing.do_bench`); memory from `torch.cuda.max_memory_allocated` and the cache
tensors' bytes. Writes CSV rows with provenance (kvq_core.provenance); prints a short table last.

    python benchmarks/e2e_decode.py --out $OUT/e2e_decode.csv [--quick]

Attention backends: `sdpa` (torch SDPA flash, fp16 KV, the baseline), and the kvq-kernels fused
kernels for fp16 and KIVI 4/2-bit caches (`kvq`, benchmarks/kvq_e2e_backend.py).
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
from dataclasses import dataclass

import torch

from kvq_core.attention import apply_rope
from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_sim.calibrate import E2E_MODEL

#: RoPE base: configs/models/ hold none (a step's cost does not depend on it); LLaMA's (Touvron et al. 2023)
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class Shape:
    """A dense LLaMA-shaped decoder (RMSNorm, RoPE, SwiGLU) as the benchmarks build it."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float = ROPE_THETA


def model_shape(name: str) -> Shape:
    """A model of configs/models/ by exact name, read through kvq_sim (as kvq-sim plans it); dense
    full-attention models without biases only. An unknown name is an error listing the valid ones."""
    from kvq_sim.errors import SimInputError
    from kvq_sim.models import load_model

    try:
        m = load_model(name)
    except SimInputError as e:
        raise ValueError(str(e)) from None
    if m.is_moe or m.sliding_window is not None or m.attention_bias:
        raise ValueError(f"{name}: the benchmarks build dense full-attention LLaMA layers without biases only")
    return Shape(
        name, m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim,
        m.intermediate_size, m.vocab_size,
    )  # fmt: skip


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """kvq_core's rotate-half RoPE (`apply_rope`) of x [B, H, 1, D] at per-sequence positions pos [B], computed
    in fp32 and returned in x's dtype. The cos/sin tables [B, 1, 1, D] are built here, on x's device in fp32,
    in every call (kvq-sim's EAGER_KERNELS_PER_LAYER counts these kernels): `rope_cos_sin` builds tables
    along T (one position per token, shared by the batch) on the CPU in fp64, which a CUDA graph cannot
    capture."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv[None]  # [B, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, None]  # [B, 1, 1, D]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, None]
    return apply_rope(x, cos=cos, sin=sin).to(x.dtype)


class Weights:
    """Random fp16 weights of every layer (std 0.02), allocated once."""

    def __init__(self, s: Shape, device: str, dtype=torch.float16):
        g = torch.Generator(device=device).manual_seed(0)

        def w(*shape):
            return (torch.randn(*shape, device=device, dtype=dtype, generator=g) * 0.02).contiguous()

        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.layers = [
            dict(
                n1=torch.ones(s.hidden, device=device, dtype=dtype),
                wqkv=w(s.hidden, qkv),
                wo=w(s.heads * s.head_dim, s.hidden),
                n2=torch.ones(s.hidden, device=device, dtype=dtype),
                wgu=w(s.hidden, 2 * s.ffn),
                wd=w(s.ffn, s.hidden),
            )
            for _ in range(s.layers)
        ]
        self.norm = torch.ones(s.hidden, device=device, dtype=dtype)
        self.lm_head = w(s.hidden, s.vocab)

    @property
    def nbytes(self) -> int:
        per = sum(t.nbytes for layer in self.layers for t in layer.values())
        return per + self.norm.nbytes + self.lm_head.nbytes


def decode_step(x: torch.Tensor, pos: torch.Tensor, W: Weights, s: Shape, attend) -> torch.Tensor:
    """One decode step. x [B, hidden]; `attend(layer, q [B,Hq,1,D], k, v [B,Hkv,1,D]) -> [B,Hq,1,D]`."""
    b = x.shape[0]
    for i, L in enumerate(W.layers):
        h = rms_norm(x, L["n1"]) @ L["wqkv"]
        q, k, v = h.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        q = rope(q.view(b, s.heads, 1, s.head_dim), pos, s.rope_theta)
        k = rope(k.view(b, s.kv_heads, 1, s.head_dim), pos, s.rope_theta)
        o = attend(i, q, k, v.view(b, s.kv_heads, 1, s.head_dim))
        x = x + o.reshape(b, -1) @ L["wo"]
        gu = rms_norm(x, L["n2"]) @ L["wgu"]
        g_, u = gu.chunk(2, -1)
        x = x + (torch.nn.functional.silu(g_) * u) @ L["wd"]
    return rms_norm(x, W.norm) @ W.lm_head


class SdpaCache:
    """fp16 KV [B, Hkv, T+1, D] per layer; the step writes slot T and attends over T+1 tokens."""

    def __init__(self, s: Shape, batch: int, context: int, device: str):
        g = torch.Generator(device=device).manual_seed(1)
        shape = (batch, s.kv_heads, context + 1, s.head_dim)
        self.k = [torch.randn(shape, device=device, dtype=torch.float16, generator=g) for _ in range(s.layers)]
        self.v = [torch.randn(shape, device=device, dtype=torch.float16, generator=g) for _ in range(s.layers)]
        self.t = context
        self.gqa = s.heads != s.kv_heads

    def attend(self, i, q, k, v):
        self.k[i][:, :, self.t : self.t + 1] = k
        self.v[i][:, :, self.t : self.t + 1] = v
        return torch.nn.functional.scaled_dot_product_attention(q, self.k[i], self.v[i], enable_gqa=self.gqa)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)


def build_cache(backend: str, bits: int, s: Shape, batch: int, context: int, device: str):
    if backend == "sdpa":
        if bits != 16:
            raise ValueError("the sdpa backend holds fp16 KV only")
        return SdpaCache(s, batch, context, device)
    if backend == "kvq":
        from kvq_e2e_backend import KvqCache  # benchmarks/kvq_e2e_backend.py

        return KvqCache(s, batch, context, bits, device)
    raise ValueError(f"unknown backend {backend!r}; valid: sdpa, kvq")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="a few points only")
    ap.add_argument("--backends", default="sdpa,kvq")
    args = ap.parse_args(argv)
    import triton

    dev = "cuda"
    s = model_shape(E2E_MODEL)
    W = Weights(s, dev)
    usable = torch.cuda.get_device_properties(0).total_memory
    contexts = [4096, 32768] if args.quick else [4096, 32768, 131072]
    rows = []
    prov = provenance(fields=CSV_FIELDS)
    for backend in args.backends.split(","):
        for bits in [16] if backend == "sdpa" else [16, 4, 2]:
            for batch in [1, 8] if args.quick else [1, 8, 32]:
                for context in contexts:
                    kv_fp16 = 2 * s.layers * batch * (context + 1) * s.kv_heads * s.head_dim * 2
                    if W.nbytes + kv_fp16 * bits / 16 * 1.3 > 0.92 * usable:
                        continue  # does not fit (with a margin for metadata and activations)
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    if torch.cuda.memory_allocated() > W.nbytes + (
                        512 << 20
                    ):  # do_bench keeps a 256 MB L2-flush buffer
                        raise RuntimeError("memory of the previous point is still allocated")
                    cache = build_cache(backend, bits, s, batch, context, dev)
                    x = torch.randn(batch, s.hidden, device=dev, dtype=torch.float16)
                    pos = torch.full((batch,), context, device=dev)
                    step = functools.partial(decode_step, x, pos, W, s, cache.attend)
                    out = step()
                    if not torch.isfinite(out).all():
                        raise RuntimeError(f"non-finite logits: {backend} {bits} {batch} {context}")
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        step()
                    ms = triton.testing.do_bench(g.replay, warmup=50, rep=300, return_mode="median")
                    rows.append(
                        dict(
                            backend=backend,
                            bits=bits,
                            batch=batch,
                            context=context,
                            step_us=round(ms * 1e3, 2),
                            tokens_per_s=round(batch / (ms / 1e3), 1),
                            weights_bytes=W.nbytes,
                            cache_bytes=cache.nbytes,
                            max_allocated_bytes=torch.cuda.max_memory_allocated(),
                            **prov,
                        )
                    )
                    del cache, g, step, out  # the partial holds the cache: drop it before the next point
    with open(args.out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"{'backend':8s} {'bits':>4s} {'batch':>5s} {'context':>8s} {'step_us':>10s} {'tok/s':>9s} {'cache GB':>9s}")
    for r in rows:
        print(
            f"{r['backend']:8s} {r['bits']:4d} {r['batch']:5d} {r['context']:8d} {r['step_us']:10.1f} "
            f"{r['tokens_per_s']:9.1f} {r['cache_bytes'] / 1e9:9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
