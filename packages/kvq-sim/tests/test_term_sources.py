"""Every decode-step term says where its efficiency comes from, in the table and in JSON; a method without a
measured kvq kernel says so next to its KV time."""

import json
import subprocess
import sys

import pytest

from kvq_sim import api
from kvq_sim.engines import get_engine
from kvq_sim.hardware import load_hardware


def _sources(**kw):
    return api.plan("llama-7b", kw.pop("gpu", "h100-80g"), context=32768, **kw).term_sources


def test_measured_kernel_and_missing_kernel_are_told_apart():
    kivi = _sources(bits="2")
    assert kivi["kv_read"] == "kernel family kvq_kivi_2b_mha, measured on h100-80g"
    kvquant = _sources(bits="2", method="kvquant")
    assert kvquant["kv_read"].startswith("no kvq kernel for kvquant: roofline at bandwidth efficiency")
    assert "prior, not a measured kernel" in kvquant["kv_read"]


def test_transferred_gpu_and_quantized_weights_are_labelled():
    s = _sources(bits="4", gpu="a100-80g", weight_bits=4)
    assert "transferred from h100-80g (not measured on a100-80g)" in s["kv_read"]
    eff = load_hardware("a100-80g").calibration.weight_bandwidth_efficiency  # the fitted transfer rule's
    assert s["weights"].startswith(
        f"GEMV efficiency {eff:.3f}, transferred (rule: {eff:g} fitted on NeMo's A100 TP1 rows"
    )
    assert "int4 kernel's ratio, transferred (rule: ratio to the fp16 GEMV) from h100-80g" in s["weights"]
    assert s["interconnect"] == "none (1 GPU)"


def test_quantized_weight_terms_say_measured_on_the_h100():
    int4 = _sources(bits="4", weight_bits=4)["weights"]
    assert "int4 kernel's ratio, measured on h100-80g (torch._weight_int4pack_mm (tinygemm)" in int4
    # the measured int8 path dequantizes in a separate pass: a fused engine's int8 GEMV is not that kernel
    int8 = _sources(bits="4", weight_bits=8)["weights"]
    assert "as if fp16 (the measured int8 path dequantizes in a separate pass" in int8
    eager = api.plan("llama-7b", "h100-80g", bits="4", weight_bits=8, context=32768, engine="hf-eager")
    assert "int8 kernel's ratio, measured on h100-80g" in eager.term_sources["weights"]
    layer_us = get_engine("hf-eager").layer_launch_us  # the fitted preset's
    assert f"; engine hf-eager: {layer_us:.1f} us per layer per forward pass (fitted on" in eager.term_sources["launch"]
    # a GPU without a rule or its own measurement keeps the transferred label
    h100 = load_hardware("h100-80g").calibration.weight_bandwidth_efficiency
    assert (
        _sources(bits="4", gpu="l40s")["weights"]
        == f"GEMV efficiency {h100:.3f}, transferred from h100-80g (not measured on l40s)"
    )


@pytest.mark.parametrize("gpus,expect", [(2, "collectives: measured tp2 fit"), (8, "collectives: priors")])
def test_multi_gpu_interconnect_source(gpus, expect):
    s = api.plan("llama-7b", "8x-h100", bits="16", gpus=gpus, context=32768).term_sources
    assert s["interconnect"].startswith(expect)


def test_json_and_table_carry_the_sources():
    cmd = [sys.executable, "-m", "kvq_sim.cli", "plan", "--model", "llama-7b", "--gpu", "h100-80g", "--method", "int",
           "--bits", "2", "--context", "8192"]  # fmt: skip
    out = json.loads(subprocess.run([*cmd, "--format", "json"], capture_output=True, text=True, check=True).stdout)
    assert set(out["term_sources"]) == {"weights", "kv_read", "compute", "interconnect", "launch"}
    assert out["term_sources"]["kv_read"].startswith("no kvq kernel for int")
    table = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "    KV read: no kvq kernel for int" in table


def test_kernel_sweep_alone_leaves_step_terms_as_priors():
    """A GPU calibrated from a kernel sweep without decode steps (kvq-bench's output) has measured attention
    kernels but prior GEMV and launch costs, and says so."""
    import dataclasses

    hw = load_hardware("h100-80g")
    assert hw.calibration.e2e_measured
    swept = dataclasses.replace(hw, calibration=dataclasses.replace(hw.calibration, e2e_measured=False))
    s = api.plan("llama-7b", swept, bits="2", context=32768).term_sources
    assert s["kv_read"] == "kernel family kvq_kivi_2b_mha, measured on h100-80g"
    assert s["weights"].endswith("prior (no decode-step fit on h100-80g)")
    assert s["launch"].endswith("prior (no decode-step fit on h100-80g)")
