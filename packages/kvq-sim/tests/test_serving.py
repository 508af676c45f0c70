"""Serving-side costs: weight precision and recipes (QServe, AccLLM), SCBench shared prefixes, long
generation timing, every listed KV method through `plan`, and formats that declare extra compute."""

from dataclasses import replace

import pytest
from click.testing import CliRunner

import kvq_sim.api as api
from kvq_core.formats import METHODS, bits_label, get_format, stream_bytes
from kvq_sim.api import deployment, generation_time, plan
from kvq_sim.cli import main
from kvq_sim.latency import decode_step, decode_terms
from kvq_sim.memory import memory
from kvq_sim.planner import max_batch, max_context
from kvq_sim.recipes import QSERVE_W4_G128, RECIPES, TRAINING_NOTE

L7, H7, D = 32, 32, 128  # llama-7b: layers, KV heads, head_dim
# llama-7b per layer: q, k, v, o [4096, 4096]; gate, up [11008, 4096]; down [4096, 11008]
LINEAR_7B = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
GROUPS_7B = 32 * (4 * 4096 * 32 + 2 * 11008 * 32 + 4096 * 86)  # 128-input groups
ROWS_7B = 32 * (4 * 4096 + 2 * 11008 + 4096)  # output rows
FP16_7B = 2 * (32 * 2 * 4096 + 2 * 32000 * 4096 + 4096)  # norms, embeddings, LM head, final norm


def run(*args):
    return CliRunner().invoke(main, list(args))


# --- 1. weight precision and recipes ------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,expected",
    [
        (16, 2 * LINEAR_7B),
        (8, LINEAR_7B + 2 * ROWS_7B),  # codes + per-row fp16 scale
        (4, LINEAR_7B // 2 + 2 * 2 * GROUPS_7B),  # codes + fp16 scale and zero per group
        (2, LINEAR_7B // 4 + 2 * 2 * GROUPS_7B),
    ],
)
def test_weight_bytes_by_bits(bits, expected):
    dep = deployment("llama-7b", "a100-80g", 2, "kivi", bits)
    assert memory(dep, 1, 1).weights_bytes == expected + FP16_7B


def test_qserve_progressive_group_bytes():
    # uint4 codes, uint8 scale + uint4 zero per 128-group, fp16 scale per row (QServe sec. 4.1)
    assert QSERVE_W4_G128.linear_tensor_bytes(4096, 11008) == (4096 * 11008 // 2, 4096 * 86, 4096 * 43, 2 * 4096)
    assert QSERVE_W4_G128.avg_bits(4096, 4096) == pytest.approx(4 + 12 / 128 + 16 / 4096)
    r = plan("llama-7b", "a100-80g", recipe="qserve-w4a8kv4", context=4096)
    expected = LINEAR_7B // 2 + GROUPS_7B + GROUPS_7B // 2 + 2 * ROWS_7B + FP16_7B
    assert r.memory.weights_bytes == expected
    assert (r.method, r.bits, r.weight_bits, r.activation_bits) == ("int", "4", 4, 8)


def test_lower_weight_bits_grow_context_and_cut_weight_reads():
    deps = [deployment("llama-2-13b", "l40s", 4, "int", w) for w in (16, 8, 4, 2)]
    contexts = [max_context(d, 1) for d in deps]
    reads = [decode_step(d, 8, 4096).weight_read_bytes for d in deps]
    assert contexts == sorted(contexts) and len(set(contexts)) == 4
    assert reads == sorted(reads, reverse=True)
    assert reads[0] == memory(deps[0], 1, 1).weights_bytes  # an untied dense model reads all weights once


def test_a8_runs_gemms_at_int8_peak():
    w16 = deployment("llama-7b", "a100-80g", 4, "int", 4)
    a8 = replace(w16, activation_bits=8)
    t16, t8 = decode_terms(w16, 4096, 1024), decode_terms(a8, 4096, 1024)
    assert t8.gemm_peak_flops / t16.gemm_peak_flops == pytest.approx(624 / 312)  # A100 dense int8 / fp16
    assert decode_step(a8, 4096, 1024).compute_s < decode_step(w16, 4096, 1024).compute_s


def test_accllm_recipe_two_bit_weights():
    r = plan("llama-7b", "a100-80g", recipe="accllm-w2a8kv4", batch=1)
    q = plan("llama-7b", "a100-80g", recipe="qserve-w4a8kv4", batch=1)
    assert r.weight_bits == 2 and r.memory.weights_bytes < q.memory.weights_bytes
    assert r.max_context_batch1 > q.max_context_batch1


BAD = [
    (["--recipe", "qserve"], "unknown recipe 'qserve'; valid: qserve-w4a8kv4"),
    (["--recipe", "qserve-w4a8kv4", "--method", "kivi"], "drop --method/--bits"),
    (["--recipe", "qserve-w4a8kv4", "--bits", "2"], "drop --method/--bits"),
    (["--recipe", "accllm-w2a8kv4", "--weight-bits", "4"], "has 2-bit weights; drop --weight-bits 4"),
    (["--weight-bits", "3"], "weight bits must be one of 16, 8, 4, 2, got 3"),
    (["--context", "1000", "--shared-prefix-tokens", "2000"], "shared prefix of 2,000 tokens exceeds --context 1,000"),
    (["--shared-prefix-tokens", "-1"], "shared-prefix-tokens must be an integer in 0.."),
    (["--prefix-reads", "shared"], "--prefix-reads needs --shared-prefix-tokens"),
    (["--gen-tokens", "100"], "--gen-tokens needs --prompt"),
    (["--prompt", "10", "--generate", "5", "--gen-tokens", "5"], "either --generate or --gen-tokens"),
    (["--prompt", "10", "--gen-tokens", "0"], "gen-tokens must be an integer in 1.."),
    (["--prompt", "100", "--gen-tokens", "10", "--shared-prefix-tokens", "200"], "exceeds --prompt 100"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_combinations_one_line_exit_2(args, message):
    r = run("plan", "--model", "llama-7b", "--gpu", "a100-80g", *args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_list_recipes_marks_training_methods():
    out = run("list", "recipes").output
    for name, rec in RECIPES.items():
        line = next(x for x in out.splitlines() if x.startswith(name))
        assert (TRAINING_NOTE in line) == rec.needs_training
    assert {n for n, r in RECIPES.items() if r.needs_training} == {"edgeqat-w4a4kv4", "roste-w4a4kv4"}


# --- 2. shared prefix ----------------------------------------------------------------------------


def test_shared_prefix_stored_once():
    t, p, b = 9000, 8000, 5
    dep = deployment("llama-7b", "a100-80g", None, "fp16", shared_prefix_tokens=p)
    per_token = L7 * 2 * H7 * D * 2
    mb = memory(dep, b, t)
    assert mb.kv_bytes == per_token * (b * (t - p) + p)
    assert mb.kv_shared_prefix_bytes == per_token * p
    base = deployment("llama-7b", "a100-80g", None, "fp16")
    assert memory(dep, 1, t).kv_bytes == memory(base, 1, t).kv_bytes  # fp16: no window, no double count
    assert max_batch(dep, t) > 5 * max_batch(base, t)


def test_shared_prefix_reads_flag():
    kw = dict(shared_prefix_tokens=30000)
    per_seq = deployment("llama-3-8b", "a100-80g", 2, "kivi", **kw)
    once = deployment("llama-3-8b", "a100-80g", 2, "kivi", prefix_reads="shared", **kw)
    b, t = 16, 32768
    prefix = memory(per_seq, b, t).kv_shared_prefix_bytes
    assert decode_step(per_seq, b, t).kv_read_bytes - decode_step(once, b, t).kv_read_bytes == (b - 1) * prefix
    # the fitted kvq_kivi_2b_gqa kernel is bound by per-query multiply-adds, which a shared read does
    # not remove: never slower; a bandwidth-bound family (fp16) is faster by the bytes not read
    assert decode_step(once, b, t).kv_s <= decode_step(per_seq, b, t).kv_s
    fp16 = [deployment("llama-3-8b", "a100-80g", 16, None, prefix_reads=r, **kw) for r in ("per-sequence", "shared")]
    assert fp16[0].hardware.calibration.kernel("kvq_fp16").bound == "bandwidth"
    assert decode_step(fp16[1], b, t).kv_s < decode_step(fp16[0], b, t).kv_s


# --- 3. long generation ----------------------------------------------------------------------------


def test_generation_time_sums_decode_steps(monkeypatch):
    dep = deployment("llama-7b", "h100-80g", 2, "kivi")
    g = generation_time(dep, 4, 1000, 300)
    assert g.exact_sum and g.decode_s == pytest.approx(
        sum(decode_step(dep, 4, 1000 + i).step_s for i in (range(1, 301)))
    )
    assert g.tokens_per_s == pytest.approx(4 * 300 / (g.prefill_s + g.decode_s))
    # trapezoid over 65 steps: the step is linear in context between changes of the kernel's split count
    # (kvq_sim.grids), so the sum can move only by the few steps where the grid changes
    monkeypatch.setattr(api, "EXACT_DECODE_STEPS", 64)
    t = generation_time(dep, 4, 1000, 300)
    assert not t.exact_sum and t.decode_s == pytest.approx(g.decode_s, rel=1e-3)


def test_gen_tokens_sizes_for_prompt_plus_generation():
    r = plan("llama-3-8b", "h100-80g", bits=2, prompt=1000, gen_tokens=32000)
    assert r.context == 33000 and r.batch == max_batch(deployment("llama-3-8b", "h100-80g", 2), 33000)
    g = r.generation
    assert g.batch == r.batch and g.last_step_s == pytest.approx(r.decode.step_s) and g.first_step_s < g.last_step_s
    out = run("plan", "--model", "llama-3-8b", "--gpu", "h100-80g", "--bits", "2", "--prompt", "1000",
              "--gen-tokens", "32000").output  # fmt: skip
    assert "time per request:" in out and "generated tokens/s" in out


# --- 4. every listed method through plan -----------------------------------------------------------

ALL = [(name, bits_label(kv)) for name, spec in METHODS.items() for kv in spec.bits]


@pytest.mark.parametrize("method,bits", ALL, ids=[f"{m}-{b}" for m, b in ALL])
def test_plan_every_listed_method(method, bits):
    r = run("plan", "--model", "llama-7b", "--gpu", "a100-80g", "--method", method, "--bits", bits, "--context", "8192")
    assert r.exit_code == 0, r.output
    f, t = get_format(method, bits), 8192
    if getattr(f, "merge_depth_fraction", 0):  # MiniCache: averaged over all layers, merged or not
        avg = 8 * f.model_bytes(t, H7, D, L7) / (2 * t * H7 * D * L7)
    else:  # llama-7b is MHA: an X cache has hidden_size = kv_heads * head_dim channels
        avg = f.avg_bits(t, H7, D)
    assert f"KV average: {avg:.3f} bits/element" in r.output
    remat = getattr(f, "remat_flops_per_token", 0)
    if callable(remat) and remat(H7, D, 4096):
        assert f"KV extra compute: {remat(H7, D, 4096) / 1e6:,.1f} MFLOP" in r.output
    else:
        assert "KV extra compute" not in r.output


def test_kv_bytes_include_every_format_part():
    """GEAR's low-rank factors and MiKV/H2O's salient tier and scores count in memory (kvq-core totals)."""
    for method in ("gear", "mikv", "h2o", "zipcache"):
        dep = deployment("llama-7b", "a100-80g", None, method)
        bd = dep.kv_format.breakdown(5000, H7, D)
        assert memory(dep, 3, 5000).kv_bytes == L7 * (3 * bd.per_sequence + bd.shared), method


def test_x_cache_format_costs_one_stream_and_remat_flops():
    base = get_format("int", 4)
    if not hasattr(base, "cache_input"):
        pytest.skip("kvq-core without X-cache formats")
    x = base.with_(cache_input="x")
    dep = replace(deployment("llama-3-8b", "a100-80g", 4, "int"), method="xquant-test", kv_format=x)
    t, b = 4000, 2
    hidden = 4096
    assert memory(dep, b, t).kv_bytes == 32 * b * stream_bytes(x.key, t, 1, hidden, 0).per_sequence
    remat = x.remat_flops_per_token(8, D, hidden)  # 2 * hidden * 2 * kv_heads * head_dim
    assert remat == 2 * hidden * 2 * 8 * D
    extra = decode_terms(dep, b, t).attn_flops - decode_terms(replace(dep, kv_format=base), b, t).attn_flops
    assert extra == 32 * b * t * remat
    assert plan(dep.model, dep.hardware, 4, "int", context=t).kv_remat_flops_per_token_layer == 0


def test_x_cache_average_bits_use_hidden_size():
    if "xquant" not in METHODS:
        pytest.skip("kvq-core without XQuant")
    r = plan("llama-3-8b", "a100-80g", 4, "xquant", context=4096)  # GQA: 4096 X channels, 2 x 8 x 128 K/V
    x = get_format("xquant", 4)
    assert r.kv_avg_bits == pytest.approx(x.avg_bits(4096, 8, D, 4096)) and r.kv_avg_bits > 8
    assert r.kv_remat_flops_per_token_layer == 2 * 4096 * 2 * 8 * D


def test_minicache_memory_equals_model_bytes():
    if "minicache" not in METHODS:
        pytest.skip("kvq-core without MiniCache")
    dep = deployment("llama-7b", "a100-80g", None, "minicache")
    f, t, b = dep.kv_format, 5000, 3
    assert memory(dep, b, t).kv_bytes == b * f.model_bytes(t, H7, D, L7)
    fp16 = deployment("llama-7b", "a100-80g", None, "fp16")
    assert memory(dep, b, t).kv_bytes < memory(fp16, b, t).kv_bytes
    r = plan("llama-7b", "a100-80g", None, "minicache", context=t)
    assert r.kv_avg_bits == pytest.approx(8 * f.model_bytes(t, H7, D, L7) / (2 * t * H7 * D * L7))
