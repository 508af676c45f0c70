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
