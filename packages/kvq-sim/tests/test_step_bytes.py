"""The simulator's decode step reads exactly the KV bytes kvq-core holds, so its predicted time follows the
stored bits: the deterministic counterpart of the wall-clock live check (test_live_check.py)."""

import dataclasses

import pytest

from kvq_sim import api
from kvq_sim.latency import decode_step, decode_terms
from kvq_sim.models import ModelShape

torch = pytest.importorskip("torch")
from kvq_core.cache import StreamingLayer  # noqa: E402
from kvq_core.formats import METHODS, bits_label  # noqa: E402

# One KV stream per layer; XQuant stores X, MiniCache merges layer pairs and H2O evicts by attention score
# (their held bytes are checked in kvq-core's own tests), so they are not single streams to count here.
NOT_KV_STREAMS = {"xquant", "xquant-cl", "minicache", "h2o"}
# KVQuant keeps every key element beyond its channel's calibrated thresholds: the held count follows the data and
# the format counts the expected 1% (kvq-core's test_kvquant_published.py holds the bytes at the held count).
DATA_COUNTED = {"kvquant", "kvquant-w128", "kvquant-w96"}
CASES = [(m, b) for m, spec in METHODS.items() for b in spec.bits if m not in NOT_KV_STREAMS | DATA_COUNTED]
KV_HEADS, HEAD_DIM, BATCH = 2, 64, 3
TOKENS = (1, 127, 1000)  # one token; inside the first window; past it with a partial block


def _one_layer_model() -> ModelShape:
    return ModelShape(
        name="one-layer",
        source="test",
        num_hidden_layers=1,
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate_size=512,
        vocab_size=1000,
    )


def _held_bytes(method: str, bits, tokens: int) -> int:
    layer = StreamingLayer.for_method(method, bits, head_dim=HEAD_DIM)
    g = torch.Generator().manual_seed(tokens)
    k = torch.randn(BATCH, KV_HEADS, tokens, HEAD_DIM, generator=g)
    v = torch.randn(BATCH, KV_HEADS, tokens, HEAD_DIM, generator=g)
    layer.append(k, v)
    return layer.nbytes


@pytest.mark.filterwarnings("ignore:.*appended without queries")
@pytest.mark.parametrize("method,bits", CASES, ids=[f"{m}-{b[0]}-{b[1]}" for m, b in CASES])
@pytest.mark.parametrize("tokens", TOKENS)
def test_step_reads_the_bytes_kvq_core_holds(method, bits, tokens):
    dep = api.deployment(_one_layer_model(), "h100-80g", bits=bits_label(bits), method=method, gpus=1)
    assert decode_terms(dep, BATCH, tokens).kv_bytes == _held_bytes(method, bits, tokens)


def test_uncalibrated_kv_time_is_bytes_over_bandwidth():
    """Without a fitted kernel family the KV term is bytes / (bandwidth x efficiency): int-4 and int-8 share
    the quantized-attention efficiency, so their times stand in the ratio of their held bytes."""
    times = {}
    for bits in ("8", "4"):
        dep = api.deployment(_one_layer_model(), "h100-80g", bits=bits, method="int", gpus=1)
        cal = dataclasses.replace(dep.hardware.calibration, attention_kernels=())
        dep = dataclasses.replace(dep, hardware=dataclasses.replace(dep.hardware, calibration=cal))
        t = decode_terms(dep, BATCH, 4096)
        step = decode_step(dep, BATCH, 4096)
        assert step.kv_s == pytest.approx(t.kv_bytes / t.kv_bw, rel=1e-12)
        assert t.kv_bytes == _held_bytes("int", (float(bits), float(bits)), 4096)
        times[bits] = (step.kv_s, t.kv_bytes)
    assert times["8"][0] / times["4"][0] == pytest.approx(times["8"][1] / times["4"][1], rel=1e-12)
    assert times["8"][1] / times["4"][1] > 1.5  # 8-bit codes take twice the bytes of 4-bit codes, plus scales
