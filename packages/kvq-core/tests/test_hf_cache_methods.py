"""MILLION, RotateKV, GEAR, token tiers and the other per-layer methods in kvq's transformers Cache on a tiny random Llama (GQA 4/2 heads): generate, bytes, queries."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvq_core.calibration import calibrate  # noqa: E402
from kvq_core.formats import get_format, h2o_format, mikv_format  # noqa: E402
from kvq_core.hf_cache import KVQCache  # noqa: E402


@pytest.mark.parametrize(
    "method,bits",
    [
        ("million", 4),
        ("rotatekv", 2),
        ("gear", 2),
        ("zipcache", 2),
        ("mikv", 2),
        ("h2o", 0),
        ("staircase", 2),
        ("bfp", 4),
        ("vidkv", "k1.5v1.5"),
        ("cskv", 4),
    ],
)
def test_generate_and_bytes(tiny, method, bits):
    ids = torch.randint(0, 97, (1, 150))
    cache = KVQCache(method, bits, model=tiny)
    out = tiny.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    total = out.shape[1] - 1
    assert cache.get_seq_length() == total
    assert cache.nbytes == 2 * get_format(method, bits).bytes(total, 2, 16)  # 2 layers, batch 1
    cache.remove_hooks()


@pytest.mark.parametrize(
    "fmt", [h2o_format(4096, 4), mikv_format(2, 1.0, window=4)], ids=["h2o-no-evict", "mikv-all-fp16"]
)
def test_all_fp16_tiers_match_dynamic_cache(tiny, fmt, prefill_then_steps):
    # Nothing evicted, every body token in the fp16 high tier (held in tier order, not time order):
    # attention over a set of post-RoPE keys does not depend on their order, so logits equal the fp16 cache's.
    ids = torch.randint(0, 97, (2, 30))
    ref = prefill_then_steps(tiny, ids, transformers.DynamicCache(), 22)
    cache = KVQCache(fmt=fmt, model=tiny)
    torch.testing.assert_close(prefill_then_steps(tiny, ids, cache, 22), ref, atol=2e-3, rtol=2e-3)
    cache.remove_hooks()


def test_eviction_holds_the_budget_and_masks_right(tiny, prefill_then_steps):
    fmt = h2o_format(16, 8)
    ids = torch.randint(0, 97, (2, 60))
    cache = KVQCache(fmt=fmt, model=tiny)
    logits = prefill_then_steps(tiny, ids, cache, 40)
    assert torch.isfinite(logits).all()
    layer = cache.layers[0]
    assert layer.get_seq_length() == 60 and layer.layer.keys().shape == (2, 2, 24, 16)
    assert layer.get_mask_sizes(1) == (24, 37)  # 24 held of 61 seen, 37 evicted before them
    assert cache.nbytes == 2 * (2 * fmt.breakdown(60, 2, 16).per_sequence)
    cache.remove_hooks()
    with pytest.raises(ValueError, match="needs queries"):
        prefill_then_steps(tiny, ids[:, :2], cache, 1)


def test_tiered_formats_need_the_model():
    with pytest.raises(ValueError, match="pass model"):
        KVQCache("mikv", 2)


@pytest.mark.parametrize(
    "method,bits,key", [("million", 2, "codebook"), ("rotatekv", 2, "reorder"), ("cskv", 4, "basis")]
)
def test_calibration_loads_into_the_cache(tiny, method, bits, key, prefill_then_steps):
    ids = torch.randint(0, 97, (1, 64))
    state = calibrate(tiny, ids, method, bits, fisher=False)
    cache = KVQCache(method, bits, model=tiny, calibration=state)
    prefill_then_steps(tiny, torch.randint(0, 97, (1, 140)), cache, 139)
    assert torch.equal(cache.layers[1].layer.k.codec.shared()[key], state[1]["k"][key])  # loaded, not re-fitted
