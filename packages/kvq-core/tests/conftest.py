"""Shared fixtures of kvq-core's tests."""

import pytest


def _tiny_llama(layers: int = 2, max_positions: int = 512):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _prefill_then_steps(model, ids, cache, prefill: int):
    """Logits of a `prefill`-token forward through `cache`, then of one-token steps over the rest of `ids`."""
    import torch

    with torch.no_grad():
        out = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


@pytest.fixture(scope="session")
def make_tiny_llama():
    """make_tiny_llama(layers=2, max_positions=512): a tiny random Llama (GQA: 4 query / 2 KV heads,
    head_dim 16), seeded with 0, in eval mode."""
    return _tiny_llama


@pytest.fixture(scope="session")
def prefill_then_steps():
    """prefill_then_steps(model, ids, cache, prefill): logits of the prefill and of each decode step."""
    return _prefill_then_steps


@pytest.fixture(scope="module")
def tiny():
    """The default tiny random Llama (2 layers)."""
    return _tiny_llama()
