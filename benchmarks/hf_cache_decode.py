"""Decode through transformers with kvq's cache on the GPU: the fused-kernel path against the torch path,
transformers' own DynamicCache (fp16, SDPA) and its quantized caches (QuantizedCache with the HQQ and quanto
backends, what a transformers user would pick instead), on a randomly initialised Llama of a given shape.

    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src:packages/kvq-sim/src KVQ_COMMIT=<sha> \\
        python benchmarks/hf_cache_decode.py --out reports/measurements/hf_cache_decode_h100.csv

First a correctness check: kvq's KIVI cache with kernels=True against kernels=False (the same format
through kvq-core's torch reference, which dequantizes the whole history every step) on one prompt and
40 decode steps: the largest logit difference between the two must be at most a quarter of the largest
difference quantization itself makes (torch path against transformers' fp16 DynamicCache). Then per
prompt length the median time of one decode step (model forward of one token, CUDA events over 20 steps
after 3 warm-up steps), the peak memory and the bytes the cache holds, per cache. The transformers peers
(`kvq_core.hf_peers`: HQQ and quanto at 4 and 2 bits, groups of 64, a 128-token full-precision residual) run
when their packages are installed and are skipped with a line otherwise. Random weights: the shapes (configs/models/, read
through kvq_sim) set the cost; text quality is measured on CPU with the real weights (kvq-eval).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
import transformers

from kvq_core.hf_cache import KVQCache
from kvq_core.hf_peers import held_bits_per_element, peer_cache_factory
from kvq_core.provenance import provenance
from kvq_sim.models import load_model

#: the shapes --shape offers (configs/models/ names)
SHAPES = ("smollm2-135m", "llama-7b")
#: RoPE base per shape (configs/models/ hold none): SmolLM2-135M's config.json; LLaMA's 10000 otherwise
ROPE_THETA = {"smollm2-135m": 100000.0}
#: RoPE table length: above the longest prompt (32K; the models were trained to 8K and 2K: random weights)
MAX_POSITIONS = 65536
PROVENANCE_FIELDS = ("device", "driver", "torch", "triton", "transformers", "commit", "date")
COLUMNS = (*PROVENANCE_FIELDS, "shape", "cache", "bits", "batch", "prompt", "step_ms", "max_allocated_bytes",
           "cache_bytes")  # fmt: skip


def llama_config(name: str) -> dict:
    """transformers.LlamaConfig arguments of a configs/models/ model (kvq_sim's loader, as kvq-sim plans it)."""
    m = load_model(name)
    return dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim, tie_word_embeddings=m.tie_word_embeddings,
        rope_theta=ROPE_THETA.get(name, 10000.0), max_position_embeddings=MAX_POSITIONS,
    )  # fmt: skip


#: transformers' QuantizedCache backends timed beside kvq (cache column "hf-<backend>")
HF_PEERS = ("hqq", "quanto")


def make_cache(kind: str, bits: int, model):
    if kind == "dynamic":
        return transformers.DynamicCache()
    if kind.startswith("hf-"):
        return peer_cache_factory(f"{kind[3:]}-{bits}", model.config)()
    return KVQCache("kivi", bits, model=model, kernels=(kind == "kvq-kernel"))


def cache_bytes(cache, model) -> int:
    """Bytes the cache holds: kvq's own count, or every tensor of transformers' cache layers (hf_peers)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    c = model.config
    elements = 2 * c.num_key_value_heads * c.head_dim * c.num_hidden_layers * cache.layers[0].get_seq_length()
    return round(held_bits_per_element(cache, c) * elements / 8)


def available_peers() -> list[str]:
    """The HF_PEERS whose packages import here (each missing one is named on stdout)."""
    out = []
    for backend in HF_PEERS:
        try:
            peer_cache_factory(f"{backend}-4", None)
            out.append(backend)
        except ImportError as e:
            print(f"skipped hf-{backend}: {e}")
    return out


def decode_steps(model, cache, ids, steps: int) -> list[float]:
    """Per-step times (ms) of `steps` one-token forwards after the prefill of `ids` (CUDA events; wall
    clock on CPU, for the --smoke run)."""
    times = []
    tok = ids[:, -1:]
    cuda = ids.is_cuda
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for _ in range(steps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t0 = time.perf_counter()
            logits = model(tok, past_key_values=cache, use_cache=True).logits
            if cuda:
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                times.append((time.perf_counter() - t0) * 1e3)
            tok = logits[:, -1:].argmax(-1)
    return times


def _prompt_then_steps(model, cache, ids) -> torch.Tensor:
    """Last-token logits of a 260-token prefill and of 40 one-token steps, fp32 [B, 41, vocab]."""
    with torch.no_grad():
        got = [model(ids[:, :260], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]]
        for t in range(260, 300):
            got.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(got, 1).float()


def check(model, bits: int, device: str) -> tuple[float, float]:
    """(max |kernel - torch path|, max |torch path - fp16 DynamicCache|) over the logits: the kernel path
    must disagree with kvq-core's reference over the same codes far less than quantization moves them."""
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 300), device=device)
    model.set_attn_implementation("sdpa")
    full = _prompt_then_steps(model, transformers.DynamicCache(), ids)
    ref = _prompt_then_steps(model, KVQCache("kivi", bits, model=model, kernels=False), ids)
    got = _prompt_then_steps(model, KVQCache("kivi", bits, model=model, kernels=True), ids)
    return float((got - ref).abs().max()), float((ref - full).abs().max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", default="1024,8192,32768")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    ap.add_argument("--torch-path-max-prompt", type=int, default=8192, help="skip the slow torch path above this")
    ap.add_argument("--smoke", action="store_true", help="2 layers, CPU under TRITON_INTERPRET=1: checks the script")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = llama_config(args.shape)
    if args.smoke:
        cfg.update(num_hidden_layers=2, vocab_size=512)
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.float16)
    torch.set_default_dtype(dtype)  # random init directly in the run dtype, on the device (7B: 13.5 GB)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    torch.set_default_dtype(torch.float32)
    prov = provenance(fields=PROVENANCE_FIELDS)
    print(prov)
    for bits in (4, 2):
        err, quant = check(model, bits, device)
        print(f"correct kivi-{bits}: 40 decode steps, max |logit diff| kernel vs torch path {err:.3e}, "
              f"torch path vs fp16 cache {quant:.3e}")  # fmt: skip
        if not err <= 0.25 * quant:
            print("FAILED: the kernel path disagrees with the torch path", file=sys.stderr)
            return 1
    rows = []
    kinds = [("dynamic", 16), ("kvq-kernel", 4), ("kvq-kernel", 2), ("kvq-torch", 4), ("kvq-torch", 2)]
    kinds += [(f"hf-{backend}", bits) for backend in available_peers() for bits in (4, 2)]
    for prompt in (int(x) for x in args.prompts.split(",")):
        ids = torch.randint(0, cfg["vocab_size"], (1, prompt), device=device)
        for kind, bits in kinds:
            if kind == "kvq-torch" and prompt > args.torch_path_max_prompt:
                continue
            model.set_attn_implementation("sdpa")
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            cache = make_cache(kind, bits, model)
            t0 = time.time()
            steps = args.steps
            times = decode_steps(model, cache, ids, 3 + steps)[3:]
            med = sorted(times)[len(times) // 2]
            nbytes = cache_bytes(cache, model)
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
            rows.append(dict(prov, shape=args.shape, cache=kind, bits=bits, batch=1, prompt=prompt, step_ms=f"{med:.3f}",
                             max_allocated_bytes=peak, cache_bytes=nbytes))  # fmt: skip
            print(f"{args.shape} {kind:11s} {bits:2d}-bit prompt {prompt:6d}: {med:8.3f} ms/step  "
                  f"peak {peak / 2**30:6.2f} GiB  cache {nbytes / 2**20:8.1f} MiB  "
                  f"({time.time() - t0:.0f} s)")  # fmt: skip
            del cache
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
