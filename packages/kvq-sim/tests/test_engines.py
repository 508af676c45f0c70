"""Engine presets and the quantized weight-GEMV lookup: loader errors, a preset's overheads worked by hand, the
measured ratios as the fit file holds them, and `plan` without --engine unchanged by the presets."""

import dataclasses
import math

import pytest
import yaml
from click.testing import CliRunner

from kvq_sim import api, engines, fitpresets, weightgemv
from kvq_sim.cli import main
from kvq_sim.deployment import deployment
from kvq_sim.errors import SimInputError
from kvq_sim.latency import decode_step, prefill_seconds, weight_efficiency
from kvq_sim.memory import memory

# ---------------------------------------------------------------- engine presets


def test_unknown_engine_is_one_line_listing_the_valid_ones():
    with pytest.raises(SimInputError, match=r"^unknown engine 'vlm'; valid: fused, hf-eager, nemo, trtllm, vllm$"):
        engines.get_engine("vlm")
    r = CliRunner().invoke(main, ["plan", "--model", "llama-7b", "--gpu", "h100-80g", "--bits", "4", "--engine", "vlm"])
    assert r.exit_code == 2
    assert r.output == "error: unknown engine 'vlm'; valid: fused, hf-eager, nemo, trtllm, vllm\n"


def _engines_file(tmp_path, entry: dict, fit: dict | None = None):
    path = tmp_path / "engines.yaml"
    path.write_text(yaml.safe_dump({"engines": {"fused": {"description": "d", "source": "s"}, "x": entry}}))
    return engines.read_engines(path, fit=fit or {})


BASE = {"description": "d", "source": "s"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({**BASE, "layer_launch_us": -1}, "engines.x: layer_launch_us must be a number in 0..1e+06, got -1"),
        ({**BASE, "step_overhead_us": "5 us"}, "step_overhead_us must be a number in 0..1e+07, got '5 us'"),
        ({**BASE, "memory_reserve_fraction": 0.95}, "memory_reserve_fraction must be a number in 0..0.9"),
        ({**BASE, "kv_block_tokens": 0}, "kv_block_tokens must be an integer in 1..4096, got 0"),
        ({**BASE, "separate_dequant": "yes"}, "separate_dequant must be true or false"),
        ({**BASE, "layer_launch": 3}, "engines.x: unknown field 'layer_launch'; did you mean 'layer_launch_us'?"),
        ({"source": "s"}, "engines.x: description is missing"),
        ({**BASE, "fitted": {"layer_launch_us": ["src"]}}, "layer_launch_us is fitted but the fit file has no value"),
        ({**BASE, "fitted": {"kv_block_tokens": ["src"]}}, "fitted must map numeric fields"),
    ],
)
def test_bad_engine_values_are_one_line_errors(tmp_path, entry, message):
    with pytest.raises(SimInputError) as e:
        _engines_file(tmp_path, entry)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fitted_value_comes_from_the_fit_file(tmp_path):
    e = _engines_file(tmp_path, {**BASE, "fitted": {"layer_launch_us": ["src"]}}, {"x": {"layer_launch_us": 12.5}})
    assert e["x"].layer_launch_us == 12.5 and e["x"].fit_sources == ("src",)
    with pytest.raises(SimInputError, match="layer_launch_us must be a number"):
        _engines_file(tmp_path, {**BASE, "fitted": {"layer_launch_us": ["src"]}}, {"x": {"layer_launch_us": -3}})


def test_engines_file_needs_the_default_engine(tmp_path):
    path = tmp_path / "engines.yaml"
    path.write_text(yaml.safe_dump({"engines": {"x": BASE}}))
    with pytest.raises(SimInputError, match="the default engine 'fused' is missing"):
        engines.read_engines(path, fit={})


def test_preset_overheads_added_to_a_step_by_hand():
    """llama-7b (32 layers) on h100-80g, batch 4 at 1,000 tokens: 400 us per layer per forward pass and 50 us per
    step add 32 * 400 + 50 = 12,850 us to every decode step; a prefill gains 2 ms + 32 * 400 us = 14.8 ms; a
    request of batch 4 gains 30 ms once, before its first token."""
    e = engines.Engine("t", "d", "s", request_overhead_ms=30, prefill_overhead_ms=2, step_overhead_us=50,
                       layer_launch_us=400)  # fmt: skip
    bare = deployment("llama-7b", "h100-80g", "4")
    with_e = dataclasses.replace(bare, engine=e)
    assert decode_step(with_e, 4, 1000).step_s - decode_step(bare, 4, 1000).step_s == pytest.approx(12.85e-3, rel=1e-12)
    assert decode_step(with_e, 4, 1000).launch_s - decode_step(bare, 4, 1000).launch_s == pytest.approx(12.85e-3)
    assert prefill_seconds(with_e, 128) - prefill_seconds(bare, 128) == pytest.approx(14.8e-3, rel=1e-12)
    g0, g1 = api.generation_time(bare, 4, 128, 10), api.generation_time(with_e, 4, 128, 10)
    assert g1.prefill_s - g0.prefill_s == pytest.approx(4 * 14.8e-3 + 30e-3, rel=1e-12)
    assert g1.decode_s - g0.decode_s == pytest.approx(10 * 12.85e-3, rel=1e-12)


def test_vllm_holds_memory_back_and_allocates_whole_blocks():
    """gpu_memory_utilization 0.9: usable 85,017,493,504 B x 0.9; 1,000 tokens take 63 blocks of 16 = 1,008."""
    bare = deployment("llama-7b", "h100-80g", "16")
    vllm = deployment("llama-7b", "h100-80g", "16", engine="vllm")
    assert memory(vllm, 1, 1000).usable_bytes == int(85017493504 * 0.9)
    assert memory(vllm, 1, 1000).kv_bytes == memory(bare, 1, 1008).kv_bytes


def test_fused_preset_changes_no_number_and_plan_default_has_no_engine():
    kw = dict(bits="4", context=8192, batch=4)
    plain, fused = api.plan("llama-7b", "h100-80g", **kw), api.plan("llama-7b", "h100-80g", engine="fused", **kw)
    assert plain.decode == fused.decode and plain.memory == fused.memory
    assert "engine" not in plain.term_sources["launch"] and not any("engine" in a for a in plain.assumptions)
    assert "; engine fused: no overhead beyond the roofline (kvq-sim's latency model" in fused.term_sources["launch"]
    listing = CliRunner().invoke(main, ["list", "engines"])
    assert listing.exit_code == 0 and listing.output.splitlines()[0].startswith("fused     one fused engine")
    assert "trtllm: no overhead beyond the roofline (calibration part (trtllm-h200-blog)" in listing.output


def test_committed_presets_say_where_they_come_from():
    e = {n: engines.get_engine(n) for n in engines.engine_names()}
    assert e["fused"].is_fused and e["trtllm"].is_fused
    assert e["nemo"].fitted == ("request_overhead_ms",) and e["nemo"].fit_sources == ("nemo-llama2-inference",)
    assert e["hf-eager"].fit_sources == ("hf-quant-bench", "litgpt-resource-tables") and e["hf-eager"].separate_dequant
    assert e["vllm"].memory_reserve_fraction == 0.10 and e["vllm"].kv_block_tokens == 16 and not e["vllm"].fitted


def test_fit_files_are_what_the_fitter_writes():
    """The committed fit files equal a fresh fit: from the calibration part of points.csv (held-out points are
    never read: the fitter's points all lie in calibration sources) and from weight_gemv_h100.csv."""
    from kvq_sim.configs import read_yaml
    from kvq_sim.hardware import TRANSFER_RULES_FILE
    from kvq_sim.published import load

    fit_engines, rules = fitpresets.fit_published()
    assert read_yaml(engines.ENGINE_FIT_FILE) == fit_engines
    assert read_yaml(TRANSFER_RULES_FILE) == rules
    assert read_yaml(weightgemv.FIT_FILE) == fitpresets.fit_weight_gemv()
    split = {p.point_id: p.split for p in load()}
    used = [i for e in fit_engines["engines"].values() for i in (e.get("fit") or e["rejected"]["fit"])["points"]]
    used += [i for kind in rules.values() for r in kind.values() for i in r["fit"]["points"]]
    assert used and {split[i] for i in used} == {"calibration"}


# ---------------------------------------------------------------- quantized weight GEMV


def test_measured_ratios_and_their_lookup():
    int4 = weightgemv.load_fit().kernel("int4")
    assert int4.tokens == (1, 8, 64) and int4.ratio == (0.6733, 0.307, 0.0484) and int4.dequant == "fused"
    assert weightgemv.ratio("int4", 1) == 0.6733 and weightgemv.ratio("int4", 64) == 0.0484
    assert weightgemv.ratio("int4", 3) == pytest.approx(0.6733 + (0.307 - 0.6733) * math.log2(3) / 3, rel=1e-12)
    assert weightgemv.ratio("int4", 256) == 0.0484  # beyond the measured counts: the nearest one
    assert weightgemv.load_fit().kernel("int8").dequant == "separate"
    with pytest.raises(SimInputError, match="no measured weight GEMV kernel 'int3'; measured: int8, int4"):
        weightgemv.ratio("int3", 1)


def test_int4_weights_stream_at_the_measured_ratio():
    """llama-7b int4 on h100-80g: the fp16 weight-GEMV efficiency of the H100 fit x 0.6733 at batch 1, x 0.307 at
    batch 8 (the measured tinygemm/fp16 ratios); int8 under a fused engine keeps the fp16 efficiency."""
    fp16 = weight_efficiency(deployment("llama-7b", "h100-80g", "4"), 1)
    assert 0.5 < fp16 < 1  # a fitted fraction of the datasheet bandwidth
    dep = deployment("llama-7b", "h100-80g", "4", weight_bits=4)
    assert weight_efficiency(dep, 1) == pytest.approx(fp16 * 0.6733, rel=1e-12)
    assert weight_efficiency(dep, 8) == pytest.approx(fp16 * 0.307, rel=1e-12)
    fused8 = deployment("llama-7b", "h100-80g", "4", weight_bits=8)
    eager8 = deployment("llama-7b", "h100-80g", "4", weight_bits=8, engine="hf-eager")
    assert weight_efficiency(fused8, 1) == fp16  # the measured int8 path is a separate pass
    assert weight_efficiency(eager8, 1) == pytest.approx(fp16 * weightgemv.ratio("int8", 1), rel=1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kernels": {"int3": {"dequant": "fused", "ratio_to_fp16": {1: 0.5}}}}, "kernels.int3: unknown kernel"),
        ({"kernels": {"int4": {"dequant": "fused", "ratio_to_fp16": {1: 2.5}}}}, "ratio 2.5 is above 2"),
        ({"kernels": {"int4": {"dequant": "fused", "ratio_to_fp16": {0: 0.5}}}}, "token count must be a positive"),
        ({"kernels": {"int4": {"dequant": "fused", "ratio_to_fp16": {1: 0}}}}, "ratio_to_fp16.1 must be a number > 0"),
        ({"kernels": {"int4": {"dequant": "inline", "ratio_to_fp16": {1: 0.5}}}}, "dequant must be one of fused"),
        ({"kernels": {"int4": {"dequant": "fused"}}}, "needs ratio_to_fp16"),
    ],
)
def test_bad_weight_gemv_fit_is_one_line_error(change, message):
    good = {"measured_on": "h100-80g", "torch_device_name": "H", "source": "s"}
    with pytest.raises(SimInputError) as e:
        weightgemv.parse_fit({**good, **change}, "f.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)
