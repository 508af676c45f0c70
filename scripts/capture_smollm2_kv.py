"""Capture real SmolLM2-135M K/V/Q activations on pydoc calibration text into a small test sample.

    python scripts/capture_smollm2_kv.py [--out tests/data/smollm2_kv_sample.safetensors]

For each captured layer the sample holds (fp16, batch dim dropped):
    L{i}.q_pre   [H_q=9,  T, D=64]  queries before RoPE (q_proj hook)
    L{i}.k_pre   [H_kv=3, T, D]     keys before RoPE (k_proj hook)
    L{i}.k_post  [H_kv, T, D]       keys after RoPE, as the cache receives them (DynamicCache)
    L{i}.v       [H_kv, T, D]       values (DynamicCache; values have no RoPE)
    L{i}.attn_out [H_q, T_out, D]   the model's attention output (o_proj input) for the last T_out queries
and once: `cos`, `sin` [T, D] fp32 from the model's rotary embedding, `input_ids` [T] int64.
Post-RoPE queries are `apply_rope(q_pre, cos=cos, sin=sin)`; they are not stored (saves 1/3 of the file).
The safetensors metadata key "provenance" is a JSON header: model file, text split and token slice,
layers, token count, rope theta, and kvq_core.provenance's torch, transformers, python, commit and date.

Before saving, the script checks on the fp32 activations that RoPE re-applied to the pre-RoPE keys
reproduces the cache's post-RoPE keys, and that `kvq_core.attention.attention_reference` reproduces the
model's attention output; it exits non-zero if either does not hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DynamicCache

from kvq_core.attention import apply_rope, attention_reference, rope_cos_sin
from kvq_core.models import find_smollm2_gguf, load_smollm2, pydoc_text
from kvq_core.provenance import provenance

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_kv_sample.safetensors"
DEFAULT_LAYERS = (0, 10, 20, 29)  # first, two middle, last of 30


def capture(model, input_ids: torch.Tensor, layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """fp32 activations of one forward over `input_ids` [1, T]: per-layer q_pre, k_pre, k_post, v, attn_out."""
    cfg = model.config
    h_q, h_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    acts: dict[str, torch.Tensor] = {}
    hooks = []

    def save_output(name, heads):
        def hook(module, args, output):
            acts[name] = output.detach().view(1, -1, heads, d).transpose(1, 2)[0].clone()  # [H, T, D]

        return hook

    def save_input(name):
        def hook(module, args):
            acts[name] = args[0].detach().view(1, -1, h_q, d).transpose(1, 2)[0].clone()  # [H_q, T, D]

        return hook

    def save_rope(module, args, output):
        acts["cos"], acts["sin"] = (t.detach()[0].float().clone() for t in output)  # [T, D]

    for i in layers:
        attn = model.model.layers[i].self_attn
        hooks.append(attn.q_proj.register_forward_hook(save_output(f"L{i}.q_pre", h_q)))
        hooks.append(attn.k_proj.register_forward_hook(save_output(f"L{i}.k_pre", h_kv)))
        hooks.append(attn.o_proj.register_forward_pre_hook(save_input(f"L{i}.attn_out")))
    hooks.append(model.model.rotary_emb.register_forward_hook(save_rope))
    cache = DynamicCache(config=cfg)
    try:
        with torch.no_grad():
            model(input_ids, past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    for i in layers:
        acts[f"L{i}.k_post"] = cache.layers[i].keys[0].detach().clone()  # [H_kv, T, D]
        acts[f"L{i}.v"] = cache.layers[i].values[0].detach().clone()
    return acts


def check(acts: dict[str, torch.Tensor], layers, theta: float) -> dict[str, float]:
    """Max errors of RoPE re-application and of reference attention against the model (fp32 activations)."""
    cos, sin = acts["cos"], acts["sin"]
    t = cos.shape[0]
    cos_ours, sin_ours = rope_cos_sin(torch.arange(t), cos.shape[-1], theta, torch.float32)
    errs = {"rope_table": max((cos - cos_ours).abs().max().item(), (sin - sin_ours).abs().max().item())}
    for i in layers:
        k_post = acts[f"L{i}.k_post"]
        k_rope = apply_rope(acts[f"L{i}.k_pre"], cos=cos, sin=sin)
        errs[f"L{i}.rope_rel"] = ((k_rope - k_post).abs().max() / k_post.abs().max()).item()
        q_post = apply_rope(acts[f"L{i}.q_pre"], cos=cos, sin=sin)
        out = attention_reference(q_post[None], k_post[None], acts[f"L{i}.v"][None])[0]  # [H_q, T, D]
        ref = acts[f"L{i}.attn_out"].double()
        errs[f"L{i}.attn_rel"] = ((out - ref).abs().max() / ref.abs().max()).item()
    return errs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--split", default="calibration", help="pydoc text split (kvq_core.models.TEXT_SPLITS)")
    parser.add_argument("--start", type=int, default=0, help="first token of the slice")
    parser.add_argument("--tokens", type=int, default=384)
    parser.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument(
        "--attn-out-tokens", type=int, default=64, help="keep the attention output of the last N queries"
    )
    args = parser.parse_args(argv)

    model, tok = load_smollm2()
    ids = tok(pydoc_text(args.split), return_tensors="pt").input_ids[:, args.start : args.start + args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"text split {args.split!r} has fewer than {args.start + args.tokens} tokens")
    layers = tuple(args.layers)
    theta = float(model.config.rope_parameters["rope_theta"])
    acts = capture(model, ids, layers)

    errs = check(acts, layers, theta)
    print(json.dumps(errs, indent=1))
    # fp32 rounding: RoPE re-application with the model's cos/sin is exact (0.0 measured); attention differs
    # by ~6e-7 relative (fp32 model vs fp64 reference). The model builds its angles in fp32, so its table
    # differs from our fp64 one by ~T * 2**-24 (3e-5 measured at T = 512).
    limits = {"rope_table": 1e-4}
    bad = {k: v for k, v in errs.items() if v > limits.get(k, 1e-5)}
    if bad:
        print(f"capture check failed: {bad}", file=sys.stderr)
        return 1

    tensors = {"input_ids": ids[0].contiguous(), "cos": acts["cos"].contiguous(), "sin": acts["sin"].contiguous()}
    for i in layers:
        for name in ("q_pre", "k_pre", "k_post", "v"):
            tensors[f"L{i}.{name}"] = acts[f"L{i}.{name}"].half().contiguous()
        tensors[f"L{i}.attn_out"] = acts[f"L{i}.attn_out"][:, -args.attn_out_tokens :].half().contiguous()
    cfg = model.config
    header = {
        "model_file": find_smollm2_gguf().name,
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32 by transformers)",
        "text": f"kvq_core.models.pydoc_text({args.split!r})",
        "token_slice": [args.start, args.start + args.tokens],
        "tokens": args.tokens,
        "layers": list(layers),
        "num_hidden_layers": cfg.num_hidden_layers,
        "q_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "rope_theta": theta,
        "attn_out_last_tokens": args.attn_out_tokens,
        "dtype": "float16 activations; cos/sin float32",
        "check_max_errors_fp32": errs,
        **provenance(fields=("torch", "transformers", "python", "commit", "date")),
        "command": "python scripts/capture_smollm2_kv.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata={"provenance": json.dumps(header)})
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
