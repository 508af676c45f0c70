"""Shared fixtures of kvq-core's tests."""

import pytest


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama (GQA: 4 query / 2 KV heads, head_dim 16, 2 layers), seeded, in eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(cfg).eval()
