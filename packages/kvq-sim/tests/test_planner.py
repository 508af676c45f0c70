"""Planner exactness (answer fits, answer + 1 does not), latency sanity, and the numpy sweep equal to the scalar model."""

from dataclasses import replace

import numpy as np
import pytest

from kvq_sim.api import deployment, sweep
from kvq_sim.hardware import load_hardware
from kvq_sim.latency import decode_step
from kvq_sim.memory import memory
from kvq_sim.planner import fits, max_batch, max_context

CASES = [
    ("llama-7b", "a100-80g", 2, "kivi", 1, "tp"),
    ("llama-3-8b", "l40s", "k2v1.5", "skvq", 1, "tp"),
    ("llama-2-70b", "8x-h100", 4, "int", 8, "tp"),
    ("llama-7b", "8x-a100-80g", 2, "kvquant", 8, "cp"),
    ("smollm2-135m", "a100-40g", 3, "kvquant-dense", 1, "tp"),
]


@pytest.mark.parametrize("model,gpu,bits,method,gpus,par", CASES)
def test_max_context_is_exact(model, gpu, bits, method, gpus, par):
    dep = deployment(model, gpu, bits, method, 16, gpus, par)
    for batch in (1, 3):
        t = max_context(dep, batch)
        assert fits(dep, batch, t) and not fits(dep, batch, t + 1)


@pytest.mark.parametrize("model,gpu,bits,method,gpus,par", CASES)
def test_max_batch_is_exact(model, gpu, bits, method, gpus, par):
    dep = deployment(model, gpu, bits, method, 16, gpus, par)
    for context in (1000, 32768):
        b = max_batch(dep, context)
        assert fits(dep, b, context) and not fits(dep, b + 1, context)


def test_sliding_window_context_is_unbounded():
    assert max_context(deployment("mistral-7b", "a100-80g", 2)) is None


def test_quantized_kv_reads_fewer_bytes_and_is_faster_when_kv_bound():
    # The roofline prior (no fitted kernel families): a fused kernel that streams codes as fast as fp16.
    # Measured kernel families replace this in calibrated files (test_validate.py checks those).
    hw = load_hardware("h100-80g")
    prior = replace(hw, calibration=replace(hw.calibration, attention_kernels=()))
    fp16 = deployment("llama-7b", prior, None, "fp16")
    q = deployment("llama-7b", prior, 2, "kivi")
    a, b = decode_step(fp16, 8, 32768), decode_step(q, 8, 32768)
    assert a.bound == "kv" and b.kv_read_bytes == memory(q, 8, 32768).kv_bytes
    ratio = a.kv_read_bytes / b.kv_read_bytes  # 16 / 3.025 average bits at 32K (kvq-core)
    assert ratio == pytest.approx(16 / q.kv_format.avg_bits(32768, 32, 128), rel=1e-9)
    assert b.step_s < a.step_s


def test_tp_adds_all_reduce_time():
    one = decode_step(deployment("llama-2-70b", "8x-h100", None, "fp16", 16, 1), 1, 4096)
    eight = decode_step(deployment("llama-2-70b", "8x-h100", None, "fp16", 16, 8), 1, 4096)
    assert one.interconnect_s == 0 and eight.interconnect_s > 0 and eight.weights_s < one.weights_s / 7


def test_sweep_matches_scalar_model():
    s = sweep(
        ["llama-7b", "mixtral-8x7b"], ["h100-80g", "l40s"], [("kivi", 2), ("fp16", None)], [1000, 4097], [1, 5, 64]
    )
    assert len(s) == 2 * 2 * 2 * 2 * 3
    c = s.columns
    for i in range(0, len(s), 5):
        dep = deployment(
            str(c["model"][i]), str(c["gpu"][i]), None if c["method"][i] == "fp16" else 2, str(c["method"][i])
        )
        b, t = int(c["batch"][i]), int(c["context"][i])
        m = memory(dep, b, t)
        assert c["total_bytes"][i] == m.total_bytes and bool(c["fits"][i]) == m.fits
        assert c["step_s"][i] == pytest.approx(decode_step(dep, b, t).step_s, rel=1e-12)
    assert isinstance(s.columns["fits"], np.ndarray)


# --- inputs that produced nonsense: eviction, bare --bits 0, a batch that fits nowhere, trained context ---


def test_eviction_is_capped_by_its_budget_not_reported_in_billions():
    from kvq_sim.api import plan

    for gpu in ("a100-80g", "8x-h100"):
        r = plan("llama-7b", gpu, method="h2o")
        assert r.unbounded and r.context == 2048 + 128 and r.cache_cap == "h2o eviction"  # budget + recent window
        assert r.memory.activation_bytes < 1 << 30  # split-KV partials over the kept tokens, not 2 billion
    r = plan("mistral-7b", "a100-80g", 2)
    assert r.unbounded and r.context == 4096 and r.cache_cap == "sliding window"


def test_bare_bits_picks_only_fp16_or_kivi():
    from kvq_sim.errors import SimInputError

    with pytest.raises(SimInputError, match=r"--bits 0 stores no KV: it is eviction.*--method h2o"):
        deployment("llama-7b", "a100-80g", "0")
    with pytest.raises(SimInputError, match=r"--bits k2v1.5 is not a width of kivi.*--method \(skvq\)"):
        deployment("llama-7b", "a100-80g", "k2v1.5")
    assert deployment("llama-7b", "a100-80g", "0", "h2o").method == "h2o"
    assert (
        deployment("llama-7b", "a100-80g", 8).method == "kivi"
        and deployment("llama-7b", "a100-80g", 16).method == "fp16"
    )


def test_batch_that_fits_at_no_context_is_an_error_with_the_real_limit():
    from kvq_sim.api import plan
    from kvq_sim.errors import SimInputError

    most = max_batch(deployment("llama-7b", "a100-80g"), 1)
    assert fits(deployment("llama-7b", "a100-80g"), most, 1) and not fits(
        deployment("llama-7b", "a100-80g"), most + 1, 1
    )
    with pytest.raises(
        SimInputError,
        match=f"batch 16,777,216 does not fit a100-80g even at 1 token per sequence: at most {most:,} sequences",
    ):
        plan("llama-7b", "a100-80g", batch=1 << 24)


def test_context_beyond_max_position_embeddings_warns_or_is_refused():
    from kvq_sim.api import plan
    from kvq_sim.errors import SimInputError

    r = plan("llama-3-8b", "h100-80g", 2)  # the max context memory holds: an answer, always with a warning
    assert r.context == 2_752_640 and r.max_position_embeddings == 8192
    assert r.warnings == (
        "the max context 2,752,640 tokens is what memory holds; llama-3-8b was trained for at most 8,192 tokens "
        "(max_position_embeddings)",
    )
    assert plan("llama-3-8b", "h100-80g", 2, context=8192).warnings == ()
    r = plan("llama-3-8b", "h100-80g", 2, context=8193)
    assert r.context == 8193 and len(r.warnings) == 1 and "8,193 tokens per sequence exceed" in r.warnings[0]
    with pytest.raises(
        SimInputError, match=r"8,193 tokens per sequence exceed llama-3-8b's max_position_embeddings \(8,192\)"
    ):
        plan("llama-3-8b", "h100-80g", 2, context=8193, strict_context=True)
    with pytest.raises(SimInputError, match="9,000 tokens per sequence exceed"):
        plan("llama-3-8b", "h100-80g", 2, prompt=8000, gen_tokens=1000, strict_context=True)
