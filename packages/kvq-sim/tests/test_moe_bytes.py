"""MoE decode reads the attention weights, the embeddings and only the experts a batch routes to, in every layer:
checked against hand counts for Mixtral-8x7B and Mixtral-8x22B."""

import pytest

from kvq_sim import api
from kvq_sim.latency import decode_terms
from kvq_sim.models import parse_model

# Mixtral-8x22B (mistralai/Mixtral-8x22B-v0.1 config.json): 56 layers, hidden 6144, 48/8 heads, 8 experts of
# intermediate 16384, top-2, vocabulary 32768.
MIXTRAL_8X22B = {
    "num_hidden_layers": 56,
    "hidden_size": 6144,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "intermediate_size": 16384,
    "vocab_size": 32768,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}


def _hand_count(layers, hidden, heads, kv_heads, head_dim, ffn, vocab, experts, active_experts) -> int:
    """fp16 bytes read by one decode step: every layer's attention projections, norms and router, the routed
    experts' three matrices, and both embedding tables plus the final norm (as kvq-sim counts them)."""
    attn = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim
    small = 2 * hidden + hidden * experts
    expert = 3 * hidden * ffn
    per_layer = attn + small + active_experts * expert
    return 2 * (layers * per_layer + 2 * vocab * hidden + hidden)


@pytest.mark.parametrize(
    "model,shape",
    [
        ("mixtral-8x7b", (32, 4096, 32, 8, 128, 14336, 32000, 8)),
        (parse_model(MIXTRAL_8X22B, "test", "mixtral-8x22b"), (56, 6144, 48, 8, 128, 16384, 32768, 8)),
    ],
    ids=["mixtral-8x7b", "mixtral-8x22b"],
)
def test_batch_1_reads_two_experts_per_layer(model, shape):
    dep = api.deployment(model, "h100-80g", bits="16", gpus=1)
    assert decode_terms(dep, 1, 4096).weight_bytes == pytest.approx(_hand_count(*shape, active_experts=2), rel=1e-12)


def test_mixtral_8x7b_batch_1_is_the_active_parameters():
    """12.9 B active parameters (arXiv:2401.04088) at 2 bytes: about 25.8 GB, not the 93 GB of all experts."""
    dep = api.deployment("mixtral-8x7b", "h100-80g", bits="16", gpus=1)
    gb = decode_terms(dep, 1, 4096).weight_bytes / 1e9
    assert 25.5 < gb < 26.5


def test_large_batches_touch_every_expert():
    dep = api.deployment("mixtral-8x7b", "h100-80g", bits="16", gpus=1)
    every = decode_terms(dep, 4096, 4096).weight_bytes
    assert every == pytest.approx(_hand_count(32, 4096, 32, 8, 128, 14336, 32000, 8, active_experts=8), rel=1e-9)
