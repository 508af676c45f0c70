"""Prefill of one sequence through a LLaMA-7B-shaped model with random fp16 weights, and its linear layers alone.

What kvq-sim's `latency.prefill_seconds` models: the time from a prompt of M tokens to the first token's logits,
on one GPU, at batch 1. Per layer RMSNorm, fused QKV, RoPE, causal attention (torch SDPA, flash), output
projection, SwiGLU MLP; the final norm and LM head on the last token only (as fused engines compute them). The
whole prefill is captured in a CUDA graph (no host launch gaps: what a fused engine's prefill costs on this GPU's
libraries) and timed as the median replay (`triton.testing.do_bench`, L2 flushed). Each linear layer is also
timed alone at the same M (cuBLAS through torch.matmul, weights larger than L2), giving its FLOP/s and the rate
its weights stream at. kvq-sim's prediction for the GPU named by --gpu is printed beside each measured prefill.

    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src:packages/kvq-sim/src KVQ_COMMIT=<sha> \\
        python benchmarks/prefill.py --gpu h200 --out $OUT/prefill_h200.csv

Writes one CSV (rows `prefill` and `linear`, with provenance) and prints a short table last.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys

TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
FIELDS = ("kind", "name", "tokens", "time_us", "flops", "weight_bytes", "tflops", "weight_gb_s", "predicted_us")


def prefill(x, W, s, pos):
    """Logits [1, vocab] of the last of M tokens x [M, hidden] (batch 1, causal)."""
    import torch
    import torch.nn.functional as F

    from kvq_kernels.decode_step import rms_norm, rope

    m = x.shape[0]
    for L in W.layers:
        h = rms_norm(x, L["n1"]) @ L["wqkv"]
        q, k, v = h.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        # rope over [M, H, 1, D] with one position per token (the decode step's rope, tokens as its batch)
        q = rope(q.view(m, s.heads, 1, s.head_dim), pos, s.rope_theta).view(m, s.heads, s.head_dim)
        k = rope(k.view(m, s.kv_heads, 1, s.head_dim), pos, s.rope_theta).view(m, s.kv_heads, s.head_dim)
        k, v = k.transpose(0, 1), v.view(m, s.kv_heads, s.head_dim).transpose(0, 1)  # [Hkv, M, D]
        if s.heads != s.kv_heads:
            k, v = (t.repeat_interleave(s.heads // s.kv_heads, 0) for t in (k, v))
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True)
        x = x + o[0].transpose(0, 1).reshape(m, -1) @ L["wo"]
        gu = rms_norm(x, L["n2"]) @ L["wgu"]
        g_, u = gu.chunk(2, -1)
        x = x + (torch.nn.functional.silu(g_) * u) @ L["wd"]
    return rms_norm(x[-1:], W.norm) @ W.lm_head


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpu", required=True, help="kvq-sim hardware config this GPU is (e.g. h200, h100-80g)")
    ap.add_argument("--model", default="llama-7b")
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        print(f"error: {args.out} exists", file=sys.stderr)
        return 2
    import torch
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kvq_core.provenance import CSV_FIELDS, provenance
    from kvq_kernels.decode_step import Weights, graph_median_ms, shape_from_config
    from kvq_sim import api
    from kvq_sim.latency import prefill_seconds
    from kvq_sim.models import load_model

    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    s = shape_from_config(args.model, load_model(args.model))
    dep = api.deployment(args.model, args.gpu, bits="16", method="fp16")
    prov = provenance(os.environ.get("KVQ_COMMIT"), fields=CSV_FIELDS)
    W = Weights(s, "cuda")
    rows = []
    for m in TOKENS:
        x = torch.randn(m, s.hidden, device="cuda", dtype=torch.float16)
        pos = torch.arange(m, device="cuda")
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            us = graph_median_ms(functools.partial(prefill, x, W, s, pos), f"{m} tokens", 25, 200) * 1e3
        rows.append(dict(kind="prefill", name=args.model, tokens=m, time_us=round(us, 2),
                         predicted_us=round(prefill_seconds(dep, m) * 1e6, 2)))  # fmt: skip
        L = W.layers[0]
        for name, w in (("qkv", L["wqkv"]), ("o", L["wo"]), ("gate_up", L["wgu"]), ("down", L["wd"])):
            a = torch.randn(m, w.shape[0], device="cuda", dtype=torch.float16)
            t = triton.testing.do_bench(lambda a=a, w=w: a @ w, warmup=25, rep=100, return_mode="median") * 1e3
            flops, nbytes = 2 * m * w.shape[0] * w.shape[1], w.nbytes
            rows.append(dict(kind="linear", name=name, tokens=m, time_us=round(t, 2), flops=flops, weight_bytes=nbytes,
                             tflops=round(flops / t / 1e6, 1), weight_gb_s=round(nbytes / t / 1e3, 1)))  # fmt: skip
        print(rows[-5], flush=True)
    with open(args.out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=[*FIELDS, *CSV_FIELDS], restval="")
        wr.writeheader()
        wr.writerows({**r, **prov} for r in rows)
    print(f"\n{prov['device']}, {args.model}, batch 1 prefill (CUDA graph) vs kvq-sim {args.gpu}")
    print(f"{'tokens':>7} {'measured us':>12} {'predicted us':>13} {'error %':>8}   linear layers: TFLOP/s, GB/s")
    for r in rows:
        if r["kind"] == "prefill":
            lin = [q for q in rows if q["kind"] == "linear" and q["tokens"] == r["tokens"]]
            err = 100 * (r["predicted_us"] / r["time_us"] - 1)
            cells = " ".join(f"{q['name']} {q['tflops']:.0f}/{q['weight_gb_s']:.0f}" for q in lin)
            print(f"{r['tokens']:>7} {r['time_us']:>12.1f} {r['predicted_us']:>13.1f} {err:>+8.1f}   {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
