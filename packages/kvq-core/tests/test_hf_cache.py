"""kvq's transformers Cache on a tiny random Llama (GQA 4/2 heads): generate, bytes, RoPE, errors."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvq_core.formats import get_format  # noqa: E402
from kvq_core.hf_cache import KVQCache, load_calibration, save_calibration  # noqa: E402
from kvq_core.hf_layer import _find_rotary, _Rope  # noqa: E402


def _logits(model, ids, cache):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits


def test_fp16_cache_matches_dynamic_cache(tiny):
    ids = torch.randint(0, 97, (2, 40))
    ref, dyn = [], transformers.DynamicCache()
    ours = KVQCache("fp16", model=tiny)
    ref.append(_logits(tiny, ids[:, :30], dyn))
    got = [_logits(tiny, ids[:, :30], ours)]
    for t in range(30, 40):  # decode steps attend to the stored (fp16) history
        ref.append(_logits(tiny, ids[:, t : t + 1], dyn))
        got.append(_logits(tiny, ids[:, t : t + 1], ours))
    # fp16 storage of fp32 activations: relative rounding 2**-11 of the K/V, far below logit scale
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(ref, 1), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("method,bits", [("kivi", 2), ("kvquant", 3), ("skvq", "k2v1.5"), ("int", 4), ("fp8-e4m3", 8)])
def test_generate_and_bytes(tiny, method, bits):
    ids = torch.randint(0, 97, (1, 150))
    cache = KVQCache(method, bits, model=tiny)
    out = tiny.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False)
    total = out.shape[1] - 1  # the last generated token is never fed back
    assert cache.get_seq_length() == total
    fmt = get_format(method, bits)
    expect = 2 * fmt.bytes(total, 2, 16)  # 2 layers, batch 1, 2 kv heads x 16
    if fmt.key.outliers is not None and fmt.key.outliers.thresholds == "channel":  # as many as the keys hold
        held = sum(layer.layer.k.body["sparse_values"].numel() for layer in cache.layers)
        pair = fmt.key.outliers.value_bits + fmt.key.outliers.index_bits_for(2 * 16)
        nominal = 2 * (total - fmt.sink_tokens) * fmt.key.outliers_per_token(2, 16)
        expect += (held - nominal) * pair // 8
    assert cache.nbytes == expect


def test_quantization_changes_decode_but_not_prefill(tiny):
    ids = torch.randint(0, 97, (1, 64))
    ref = _logits(tiny, ids, transformers.DynamicCache())
    cache = KVQCache("int", 2, model=tiny)
    torch.testing.assert_close(_logits(tiny, ids, cache), ref)  # the prefill attends in full precision
    nxt = torch.randint(0, 97, (1, 1))
    dyn = transformers.DynamicCache()
    _logits(tiny, ids, dyn)
    assert not torch.allclose(_logits(tiny, nxt, cache), _logits(tiny, nxt, dyn), atol=1e-4)


def test_rope_unapply_inverts_apply(tiny):
    rope = _Rope(_find_rotary(tiny))
    x = torch.randn(1, 2, 37, 16, dtype=torch.float64).float()
    y = rope.unapply(rope.apply(x, 5), 5)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="pre-RoPE keys: pass model"):
        KVQCache("kvquant", 3)
    with pytest.raises(ValueError, match="unknown method"):
        KVQCache("kiwi", 2, model=tiny)
    with pytest.raises(ValueError, match="give a method name"):
        KVQCache()
    path = tmp_path / "calib.pt"
    save_calibration({}, path, model=tiny)
    assert load_calibration(path, tiny) == {}
    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="was made for model"):
        KVQCache("kivi", 2, model=other, calibration=path)
    with pytest.raises(ValueError, match="does not exist"):
        KVQCache("kivi", 2, model=tiny, calibration=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="calibration= needs model="):
        KVQCache("kivi", 2, calibration={0: {}})  # without the model the state would be dropped silently


def test_calibration_round_trip_and_fisher(tiny, tmp_path):
    from kvq_core.calibration import calibrate, record_kv

    ids = torch.randint(0, 97, (1, 64))
    rec = record_kv(tiny, ids, fisher=True)
    assert len(rec) == 2 and rec[0][0].shape == (1, 2, 64, 16)
    assert rec[0][2] is not None and float(rec[0][2].abs().sum()) > 0  # real gradients reached K
    state = calibrate(tiny, ids, "kvquant", 2)
    cb = state[0]["k"]["codebook"]
    assert cb.dtype == torch.float16 and cb.shape == (4,) and torch.all(cb[1:] > cb[:-1])
    plain = calibrate(tiny, ids, "kvquant", 2, fisher=False)
    assert not torch.equal(plain[0]["k"]["codebook"], cb)  # the Fisher weights change the codebook
    path = tmp_path / "kvquant2.pt"
    save_calibration(state, path, model=tiny)
    cache = KVQCache("kvquant", 2, model=tiny, calibration=path)
    seq = torch.randint(0, 97, (1, 20))
    _logits(tiny, seq, cache)
    _logits(tiny, seq[:, :1], cache)
    assert torch.equal(cache.layers[0].layer.k.codec._codebook, cb)  # loaded, not re-fitted
    skvq = calibrate(tiny, ids, "skvq", "k2v1.5", fisher=False)
    perm = skvq[1]["v"]["reorder"]
    assert perm.dtype == torch.int16 and sorted(perm.tolist()) == list(range(32))
