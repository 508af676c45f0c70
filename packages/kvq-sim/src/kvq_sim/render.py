"""Text, JSON and CSV renderings of a PlanResult."""

from __future__ import annotations

import csv
import io
import json

from .api import PlanResult
from .hardware import GIB


def _n(v: int | None, unbounded: str = "unbounded") -> str:
    return unbounded if v is None else f"{v:,}"


def _gib(b: int) -> str:
    return f"{b / GIB:9.2f} GiB"


def table(r: PlanResult) -> str:
    """The human-readable plan: answer, memory breakdown at the answer, comparisons, decode speed."""
    m = r.memory
    par = f", {r.gpus} GPUs {r.parallel}" if r.gpus > 1 else ""
    lines = [
        f"kvq-sim plan: {r.model} on {r.gpu}{par}, KV {r.method} {r.bits}-bit ({r.kv_format}), "
        f"{r.weight_bits}-bit weights" + (f", recipe {r.recipe} (A{r.activation_bits})" if r.recipe else ""),
        "",
    ]
    if r.unbounded:
        answer = f"any context ({r.cache_cap} caps the cache at {r.context:,} tokens)"
    elif "fit?" in r.question:
        answer = "yes" if r.fits else "no"
    elif "batch at" in r.question:
        answer = f"{r.batch:,} sequences"
    else:
        answer = f"{r.context:,} tokens"
    lines += [f"{r.question}  ->  {answer}", ""]
    lines.append(f"memory per GPU at batch {max(r.batch, 1):,} x {r.context:,} tokens:")
    rows = [
        ("weights", m.weights_bytes),
        ("KV codes", m.kv_codes_bytes),
        ("KV scales + zeros", m.kv_scales_zeros_bytes),
        ("KV outliers (values, indices, pointers)", m.kv_outliers_bytes),
        ("KV fp16 residual window + sinks", m.kv_full_precision_bytes),
        ("KV per-layer shared (codebooks, reorder)", m.kv_shared_bytes),
        *([("KV tiers (low-rank, salient tokens, scores)", m.kv_tiers_bytes)] if m.kv_tiers_bytes else []),
        *(
            [(f"KV shared prefix ({r.shared_prefix_tokens:,} tokens, once)", m.kv_shared_prefix_bytes)]
            if r.shared_prefix_tokens
            else []
        ),
        ("activations (peak)", m.activation_bytes),
        ("allocator rounding", m.allocator_rounding_bytes),
        ("CUDA context + workspace reserve", m.reserve_bytes),
    ]
    lines += [f"  {name:<42}{_gib(b)}" for name, b in rows]
    lines.append(f"  {'total':<42}{_gib(m.total_bytes)}   of {m.usable_bytes / GIB:.2f} GiB usable")
    lines.append(f"  KV average: {r.kv_avg_bits:.3f} bits/element (all metadata included)")
    if r.weight_bits != 16:
        lines.append(f"  weights average: {r.weight_avg_bits:.3f} bits/weight in linear layers (metadata included)")
    if r.kv_remat_flops_per_token_layer:
        lines.append(
            f"  KV extra compute: {r.kv_remat_flops_per_token_layer / 1e6:,.1f} MFLOP per cached token per layer "
            "per decode step (rematerialization)"
        )
    lines.append("")
    gain = r.context_gain_over_fp16
    lines.append(
        f"max context at batch 1: {_n(r.max_context_batch1)} tokens (fp16 KV: {_n(r.fp16_max_context_batch1)}"
        + (f", {gain:.2f}x)" if gain else ")")
    )
    lines.append("max batch:  context     this KV     fp16 KV    gain")
    for row in r.batch_rows:
        g = f"{row.max_batch / row.fp16_max_batch:.2f}x" if row.max_batch and row.fp16_max_batch else "-"
        lines.append(
            f"          {row.context:>9,} {_n(row.max_batch, '>cap'):>11} {_n(row.fp16_max_batch, '>cap'):>11} {g:>7}"
        )
    lines.append("")
    if r.decode is None:
        lines.append("decode: does not fit, no latency")
    else:
        d = r.decode
        lines.append(
            f"decode step at batch {d.batch:,}: {d.step_s * 1e3:.3f} ms, {d.tokens_per_s:,.1f} tokens/s, "
            f"bound: {d.bound}"
        )
        lines.append(
            f"  weights {d.weights_s * 1e3:.3f} ms, KV read {d.kv_s * 1e3:.3f} ms, compute {d.compute_s * 1e3:.3f} ms, "
            f"interconnect {d.interconnect_s * 1e3:.3f} ms, launch {d.launch_s * 1e3:.3f} ms"
        )
        names = {"weights": "weights", "kv_read": "KV read", "compute": "compute", "interconnect": "interconnect",
                 "launch": "launch"}  # fmt: skip
        lines += [f"    {names[k]}: {v}" for k, v in r.term_sources.items()]
    if r.prefill_s is not None:
        lines.append(f"prefill of the prompt: {r.prefill_s:.3f} s")
    if r.generation is not None:
        g = r.generation
        how = "exact sum" if g.exact_sum else "trapezoid sum"
        lines.append(
            f"generation of {g.gen_tokens:,} tokens after a {g.prompt_tokens:,}-token prompt, batch {g.batch:,} in lockstep:"
        )
        lines.append(
            f"  time per request: {g.request_s:,.2f} s = prefill {g.prefill_s:,.2f} s (all {g.batch:,} prompts) "
            f"+ decode {g.decode_s:,.2f} s ({how} of steps {g.first_step_s * 1e3:.3f} -> {g.last_step_s * 1e3:.3f} ms)"
        )
        lines.append(
            f"  throughput: {g.tokens_per_s:,.1f} generated tokens/s ({g.decode_tokens_per_s:,.1f} during decode)"
        )
    lines.append("")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in r.assumptions]
    return "\n".join(lines)


def as_json(r: PlanResult) -> str:
    return json.dumps(r.to_dict(), indent=2)


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (list, tuple)):
            if v and isinstance(v[0], dict):
                for row in v:
                    out.update(_flat(row, f"{key}.{row.get('context', '')}."))
            else:
                out[key] = " | ".join(map(str, v))
        else:
            out[key] = v
    return out


def as_csv(r: PlanResult) -> str:
    """One header row and one value row, nested fields flattened with dots."""
    flat = _flat(r.to_dict())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(flat), lineterminator="\n")
    w.writeheader()
    w.writerow(flat)
    return buf.getvalue()
