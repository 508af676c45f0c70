"""XQuant / XQuant-CL: format bytes and FLOPs, byte equality in generate(), rematerialized K/V vs the true K/V."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvq_core.formats import KVFormat, StreamFormat, get_format, packed_row_bytes  # noqa: E402
from kvq_core.hf_cache import KVQCache  # noqa: E402

# tiny fixture (conftest): 2 layers, hidden 64, 2 KV heads x 16 -> X and K+V both 64 channels per token


def test_format_bytes_worked_example():
    # 4-bit X of 576 channels (SmolLM2), 100 tokens: codes 100 * 288 B, 5 groups of 128 (last partial),
    # fp16 scale + zero per group; K/V are 2 x 3 x 64 = 384 channels, so 6.417 bits per K/V element.
    f = get_format("xquant", 4)
    assert f.breakdown(100, 3, 64, hidden_size=576).codes == 100 * packed_row_bytes(4, 576) == 28800
    assert f.bytes(100, 3, 64, hidden_size=576) == 28800 + 2 * 100 * 5 * 2
    assert f.avg_bits(100, 3, 64, hidden_size=576) == pytest.approx(8 * 30800 / (100 * 384))
    # without hidden_size an X format assumes MHA (hidden = kv_heads * head_dim): half the K/V bytes + meta
    assert f.avg_bits(4096, 32, 128) == pytest.approx((4 + 2 * 16 / 128) / 2)
    assert get_format("xquant-cl", 4).bytes(100, 3, 64, 576) == f.bytes(100, 3, 64, 576)  # same per layer


def test_remat_flops_field():
    assert get_format("xquant", 4).remat_flops_per_token(32, 128) == 2 * 4096 * (4096 + 4096)  # llama-7b
    assert get_format("xquant-cl", 2).remat_flops_per_token(3, 64, hidden_size=576) == 2 * 576 * 384
    for method, bits in [("kivi", 2), ("fp16", 16), ("minicache", 16)]:
        assert get_format(method, bits).remat_flops_per_token(32, 128) == 0


def test_bad_cache_input_rejected():
    s = StreamFormat(bits=4)
    with pytest.raises(ValueError, match="cache_input must be"):
        KVFormat("bad", s, s, cache_input="y")


@pytest.mark.parametrize("method,bits", [("xquant", 2), ("xquant", 8), ("xquant-cl", 3), ("xquant-cl", 8)])
def test_generate_and_bytes(tiny, method, bits):
    ids = torch.randint(0, 97, (2, 37))  # batch 2, an odd prompt length
    cache = KVQCache(method, bits, model=tiny)
    out = tiny.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=5, do_sample=False
    )
    total = out.shape[1] - 1
    assert cache.get_seq_length() == total
    fmt = get_format(method, bits)
    assert cache.nbytes == 2 * 2 * fmt.bytes(total, 2, 16, hidden_size=64)  # 2 layers x batch 2
    assert cache.nbytes == 2 * fmt.model_bytes(total, 2, 16, num_layers=2, hidden_size=64)
    cache.remove_hooks()
    with pytest.raises(ValueError, match="hook saw none"):
        tiny(out[:, -1:], past_key_values=cache, use_cache=True)


def _true_and_remat(model, ids, method, bits):
    """(true K/V per layer from a DynamicCache, K/V rematerialized from the XQuant cache), after one prefill."""
    dyn, cache = transformers.DynamicCache(), KVQCache(method, bits, model=model)
    with torch.no_grad():
        model(ids, past_key_values=dyn, use_cache=True)
        model(ids, past_key_values=cache, use_cache=True)
        r_hat, remat = 0, []
        for layer in cache.layers:
            x_hat = layer.layer.dequantized()[:, 0]  # [B, T, hidden]
            if method == "xquant-cl":  # rebuild the accumulator independently: R_hat_l = sum of deltas <= l
                r_hat = r_hat + x_hat
                x_hat = layer.norm(r_hat).float()
            remat.append(layer.rematerialize(x_hat))
    cache.remove_hooks()
    return [(lay.keys, lay.values) for lay in dyn.layers], remat


@pytest.mark.parametrize("method", ["xquant", "xquant-cl"])
def test_rematerialized_kv_close_at_8_bits(tiny, method):
    ids = torch.randint(0, 97, (2, 113))
    true, remat8 = _true_and_remat(tiny, ids, method, 8)
    _, remat4 = _true_and_remat(tiny, ids, method, 4)
    for (k, v), (k8, v8), (k4, v4) in zip(true, remat8, remat4):
        for ref, got8, got4 in ((k, k8, k4), (v, v8, v4)):
            err8 = ((got8 - ref).norm() / ref.norm()).item()
            err4 = ((got4 - ref).norm() / ref.norm()).item()
            # 8-bit X: error ~ range / 255 / sqrt(12) per element, ~0.2-0.4% of the K/V norm on this model
            assert err8 < 1e-2, (method, err8)
            assert err8 < err4 / 8, (method, err8, err4)  # 4 more bits: ~16x less error, allow 8x


def test_prefill_attends_full_precision(tiny):
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        ref = tiny(ids, past_key_values=transformers.DynamicCache(), use_cache=True).logits
        cache = KVQCache("xquant", 2, model=tiny)
        got = tiny(ids, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got, ref)
    cache.remove_hooks()


def test_needs_the_model():
    with pytest.raises(ValueError, match="needs the model"):
        KVQCache("xquant", 4)


def test_gqa_x_is_larger_than_kv_for_smollm2_shape():
    # SmolLM2-135M: hidden 576, 3 KV heads x 64: X (576) is 1.5x the K+V channels (384), so XQuant at
    # b bits costs 1.5 b (+ metadata: 5 groups x 32 bits per token) per K/V element; for MHA llama-7b, half.
    f = get_format("xquant", 4)
    assert f.avg_bits(4096, 3, 64, hidden_size=576) == pytest.approx((576 * 4 + 5 * 32) / 384)
    assert math.isclose(f.avg_bits(4096, 32, 128, hidden_size=4096), 0.5 * (4 + 0.25))
