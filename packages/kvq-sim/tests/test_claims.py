"""The seed papers' capacity claims (docs/references.md §4), reproduced with their assumptions stated."""

import pytest

from kvq_sim.api import deployment
from kvq_sim.memory import memory
from kvq_sim.planner import max_context

MILLION = 1_000_000


def test_kvquant_64gb_of_kv_for_1m_tokens_at_2_bits():
    """KVQuant appendix: ~64 GB of KV for LLaMA-7B at 1M tokens, 2-bit. Holds (7.6% above 64e9 B, 64.1 GiB)
    for the dense nuq2 format (codes + per-token value scales + shared codebooks); with the 1% outliers
    counted (nuq2-1%, 2.33 bits) the same context needs 80.1e9 B, so the 64 GB figure omits outliers."""
    dep = deployment("llama-7b", "a100-80g", 2, "kvquant-dense", 4)
    assert memory(dep, 1, 1 << 20).kv_bytes == pytest.approx(64e9, rel=0.10)


def test_kvquant_1m_context_on_one_a100_80gb():
    """KVQuant: LLaMA-7B, 1M tokens, one A100-80GB, 2-bit KV. Assumes 4-bit weights (group 128): with them
    nuq2-1% fits 1.04M tokens. With fp16 weights it fits 0.92M (within 10%), nuq2 without outliers 1.07M."""
    assert max_context(deployment("llama-7b", "a100-80g", 2, "kvquant", 4)) >= MILLION
    assert max_context(deployment("llama-7b", "a100-80g", 2, "kvquant", 16)) == pytest.approx(MILLION, rel=0.10)
    assert max_context(deployment("llama-7b", "a100-80g", 2, "kvquant-dense", 16)) >= MILLION


def test_kvquant_10m_context_on_8_gpus():
    """KVQuant: 10M tokens on an 8-GPU system. Assumes context parallelism over 8x A100-80GB (weights
    replicated), 4-bit weights and 2-bit KV without the 1% outliers (nuq2): 9.7M, within 10%. With outliers
    counted (nuq2-1%) our formats give 8.4M, 16% short: the claim does not hold for nuq2-1%."""
    dense = deployment("llama-7b", "8x-a100-80g", 2, "kvquant-dense", 4, 8, "cp")
    assert max_context(dense) == pytest.approx(10 * MILLION, rel=0.10)
    sparse = deployment("llama-7b", "8x-a100-80g", 2, "kvquant", 4, 8, "cp")
    assert max_context(sparse) < 0.9 * 10 * MILLION


def test_skvq_1m_context_on_80gb():
    """SKVQ: 1M context for a 7B model on an 80 GB GPU at K2 V1.5 (group 128, fp8 scale/zero, 128-token fp16
    window, 5 sinks). Holds with fp16 weights for LLaMA-7B on the A100-80GB and the H100: 1.11M tokens."""
    for gpu in ("a100-80g", "h100-80g"):
        assert max_context(deployment("llama-7b", gpu, "k2v1.5", "skvq", 16)) >= MILLION
