"""KVQCache's fused-kernel path (kvq_kernels.hf_attention) on a tiny random Llama (GQA 4/2, head_dim 16):
the same logits as kvq-core's torch path over the same format, no re-quantization of stored history,
the format's bytes, and clear errors. Runs under TRITON_INTERPRET=1 (CI) or on a GPU."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvq_core.formats import kivi_format  # noqa: E402
from kvq_core.hf_cache import KVQCache  # noqa: E402
from kvq_kernels import hf_attention  # noqa: E402
from kvq_kernels.hf_attention import kivi_params  # noqa: E402

# group 16 / residual 32: a 40-token prompt flushes one key block, 30 decode steps flush another and
# grow the store past its first capacity (2 * 32 tokens)
FMT = kivi_format(2, group_size=16, residual_tokens=32)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def _run(model, cache, ids, steps, prompt=40):
    out = []
    with torch.no_grad():
        out.append(model(ids[:, :prompt], past_key_values=cache, use_cache=True).logits[:, -1])
        for t in range(prompt, prompt + steps):
            out.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


def test_kernel_path_matches_torch_path(tiny):
    ids = torch.randint(0, 97, (2, 70), device=tiny.device)
    # a 56-token prompt and 14 decode steps: the decode crosses the 64-token allocation and a key group's flush
    ref = _run(tiny, KVQCache(fmt=FMT, model=tiny, kernels=False), ids, 14, prompt=56)
    cache = KVQCache(fmt=FMT, model=tiny, kernels=True)
    assert cache.kernels and tiny.config._attn_implementation == "kvq"
    got = _run(tiny, cache, ids, 14, prompt=56)
    assert not hf_attention._PENDING  # every marked decode step went through the fused kernel
    # same codes and scales (the append kernel quantizes as kvq_core.quant, fp64 qparams); the paths
    # differ only in the fp16 storage of the residual ring and the kernel's fp32 accumulation order
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    layer = cache.layers[0]
    assert layer.store.tokens == 70 and layer.get_seq_length() == 70
    assert layer.store.cache.capacity >= 70  # grew past the first 64-token allocation
    # the format's bytes for 70 tokens, 2 sequences, 2 KV heads, head_dim 16 (not the preallocation)
    assert layer.nbytes == 2 * FMT.bytes(70, 2, 16) < layer.store.allocated_bytes


def test_stored_history_is_never_requantized(tiny):
    ids = torch.randint(0, 97, (1, 60), device=tiny.device)
    cache = KVQCache(fmt=FMT, model=tiny, kernels=True)
    _run(tiny, cache, ids, 1)  # 41 tokens: 32 keys and 9 values quantized
    c = cache.layers[1].store.cache
    before = (c.k_codes[:, :, :32].clone(), c.k_scale[:, :, :2].clone(), c.v_codes[:, :, :9].clone())
    with torch.no_grad():
        for t in range(41, 60):
            tiny(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    c = cache.layers[1].store.cache
    assert torch.equal(c.k_codes[:, :, :32], before[0]) and torch.equal(c.k_scale[:, :, :2], before[1])
    assert torch.equal(c.v_codes[:, :, :9], before[2])
    assert int(c.lens[0]) == 60


def test_model_switched_to_kvq_still_runs_other_caches(tiny):
    KVQCache(fmt=FMT, model=tiny, kernels=True)  # switches the attention implementation
    ids = torch.randint(0, 97, (1, 12), device=tiny.device)
    with torch.no_grad():
        a = tiny(ids, past_key_values=transformers.DynamicCache(), use_cache=True).logits
        tiny.set_attn_implementation("sdpa")
        b = tiny(ids, past_key_values=transformers.DynamicCache(), use_cache=True).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kernel_path_errors(tiny):
    assert kivi_params(FMT) == (2, 16, 32)
    assert kivi_params(kivi_format(1.5)) is None
    with pytest.raises(ValueError, match="has no fused kernel"):
        KVQCache("int", 4, model=tiny, kernels=True)
    with pytest.raises(ValueError, match="pass model"):
        KVQCache(fmt=FMT, kernels=True)
    with pytest.raises(ValueError, match="kernels must be"):
        KVQCache(fmt=FMT, model=tiny, kernels="yes")
    assert KVQCache("int", 4, model=tiny).kernels is False  # "auto" falls back to the torch path
    cache = KVQCache(fmt=FMT, model=tiny, kernels=True)
    ids = torch.randint(0, 97, (1, 20), device=tiny.device)
    with torch.no_grad():
        tiny(ids[:, :16], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="one token per step"):
            tiny(ids[:, 16:18], past_key_values=cache, use_cache=True)


def test_padded_mask_refused_even_after_an_unpadded_one():
    """The mask check runs once per mask tensor (one device read a step, not one a layer); a later mask that
    hides a token is still refused, whatever mask was accepted before it."""
    q = torch.randn(2, 4, 1, 16)
    full = torch.zeros(2, 1, 1, 8)  # additive mask: 0 keeps a token
    padded = full.clone()
    padded[1, ..., 0] = float("-inf")

    class Store:
        def attend(self, query, scale):
            return torch.zeros(query.shape)

    for mask in (full, full):  # the second call reuses the accepted mask without reading it
        key = torch.randn(2, 2, 8, 16)
        hf_attention._PENDING[id(key)] = (key, Store())
        out, _ = hf_attention.kvq_attention(None, q, key, key, mask)
        assert out.shape == (2, 1, 4, 16)
    key = torch.randn(2, 2, 8, 16)
    hf_attention._PENDING[id(key)] = (key, Store())
    with pytest.raises(ValueError, match="needs unpadded inputs"):
        hf_attention.kvq_attention(None, q, key, key, padded)
