"""MiniCache: SLERP merge, pair bytes, byte equality in generate() at the actual retention, exact with f = 1,
RoPE equivariance of the merge, explicit pairs and their calibration."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvq_core.cache_minicache import slerp_merge  # noqa: E402
from kvq_core.formats import get_format, minicache_format  # noqa: E402
from kvq_core.hf_cache import KVQCache  # noqa: E402


@pytest.fixture(scope="module")
def tiny4(make_tiny_llama):
    """A tiny random Llama with 4 layers (GQA 4/2 heads, head_dim 16): minicache-0.5 merges pair (2, 3)."""
    return make_tiny_llama(layers=4)


def test_slerp_merge_properties():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    e, mag, dist = slerp_merge(a, b, 0.6)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3, 5))
    torch.testing.assert_close(mag, torch.stack([a.norm(dim=-1), b.norm(dim=-1)]))
    assert ((dist >= 0) & (dist <= 1)).all()
    e0, _, _ = slerp_merge(a, b, 0.0)  # t = 0: the lower layer's direction
    torch.testing.assert_close(e0, a / a.norm(dim=-1, keepdim=True))
    # parallel vectors of different lengths: distance 0 and magnitude * direction restores both exactly
    e2, mag2, d2 = slerp_merge(a, 3 * a, 0.6)
    torch.testing.assert_close(mag2[1, ..., None] * e2, 3 * a)
    assert d2.abs().max() < 1e-3
    # orthogonal unit vectors at t = 0.5: the direction bisects them
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp_merge(x, y, 0.5)[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_pair_bytes_worked_example():
    # one pair, 100 tokens, 2 heads x 16, 10 retained K tokens, 0 V tokens:
    # per stream direction 2*100*16*2 = 6400, magnitudes 2*2*100*2 = 800; retained K 2*2*10*16*2 + 10*4 = 1320
    f = get_format("minicache", 16)
    b = f.pair_breakdown(100, 2, 16, 10, 0)
    assert (b.codes, b.scales, b.retained, b.total) == (12800, 1600, 1320, 15720)
    assert f.bytes(100, 2, 16) == f.pair_breakdown(100, 2, 16, 10, 10).total // 2  # ceil(0.1 * 100) = 10
    assert f.merge_pairs(4) == ((2, 3),) and f.merge_pairs(5) == ((3, 4),) and f.merge_pairs(30)[-1] == (27, 28)
    fp16 = get_format("fp16").bytes(100, 2, 16)
    assert f.model_bytes(100, 2, 16, 4) == 2 * fp16 + f.pair_breakdown(100, 2, 16, 10, 10).total
    assert f.model_bytes(100, 2, 16, 4, retained={(2, 3): (10, 0)}) == 2 * fp16 + 15720
    with pytest.raises(ValueError, match="retained tokens"):
        f.pair_breakdown(10, 2, 16, 11, 0)


@pytest.mark.parametrize("retain", [0.0, 0.1, 0.5])
def test_generate_and_bytes_at_actual_retention(tiny4, retain):
    fmt = minicache_format(0.5, retain)
    ids = torch.randint(0, 97, (2, 41))
    cache = KVQCache(fmt=fmt, model=tiny4)
    out = tiny4.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=6, do_sample=False
    )
    total = out.shape[1] - 1
    assert cache.get_seq_length() == total
    nk, nv = cache.retained[(2, 3)]
    assert nk >= math.ceil(retain * 41) and nv >= math.ceil(retain * 41)  # the prefill's share, plus decode
    assert cache.nbytes == 2 * fmt.model_bytes(total, 2, 16, 4, retained=cache.retained)  # batch 2
    if retain == 0.0:
        assert cache.nbytes == 2 * fmt.model_bytes(total, 2, 16, 4)


def test_retain_everything_matches_dynamic_cache(tiny4, prefill_then_steps):
    # f = 1: every token of the pair is kept in fp16, so merging changes nothing but fp16 rounding
    ids = torch.randint(0, 97, (2, 30))
    ref = prefill_then_steps(tiny4, ids, transformers.DynamicCache(), 22)
    cache = KVQCache(fmt=minicache_format(0.5, 1.0), model=tiny4)
    torch.testing.assert_close(prefill_then_steps(tiny4, ids, cache, 22), ref, atol=2e-3, rtol=2e-3)
    assert cache.retained == {(2, 3): (30, 30)}


def test_merged_layers_restore_magnitudes(tiny4):
    # with no retention, restored vectors keep each layer's per-token norms (only directions are shared)
    ids = torch.randint(0, 97, (1, 25))
    dyn, cache = transformers.DynamicCache(), KVQCache(fmt=minicache_format(0.5, 0.0), model=tiny4)
    with torch.no_grad():
        tiny4(ids, past_key_values=dyn, use_cache=True)
        tiny4(ids, past_key_values=cache, use_cache=True)
    pair = cache.layers[2].pair
    for side, layer in ((0, 2), (1, 3)):
        got = pair.k.restore(side)
        torch.testing.assert_close(got.norm(dim=-1), dyn.layers[layer].keys.norm(dim=-1), atol=1e-2, rtol=1e-3)
    assert cache.layers[3].nbytes == 0 and cache.layers[2].nbytes == pair.nbytes


def test_needs_the_model():
    with pytest.raises(ValueError, match="needs the model"):
        KVQCache("minicache", 16)


def test_merge_commutes_with_rope(tiny4):
    # the same RoPE rotation on both layers' keys: same magnitudes and distances, direction rotated,
    # so merging post-RoPE keys (as the cache does) equals merging pre-RoPE keys and rotating
    from kvq_core.hf_layer import _find_rotary, _Rope

    rope = _Rope(_find_rotary(tiny4))
    torch.manual_seed(1)
    a, b = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    e, mag, dist = slerp_merge(a, b, 0.6)
    er, magr, distr = slerp_merge(rope.apply(a, 5), rope.apply(b, 5), 0.6)
    torch.testing.assert_close(er, rope.apply(e, 5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(magr, mag, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(distr, dist, atol=1e-5, rtol=1e-5)


def test_explicit_pairs_bytes_names_and_validation(tiny4, prefill_then_steps):
    fmt = minicache_format(0.5, 0.1, pairs=((1, 2),))
    assert fmt.name == "minicache-L1" and fmt.merge_pairs(4) == ((1, 2),)
    ids = torch.randint(0, 97, (2, 33))
    cache = KVQCache(fmt=fmt, model=tiny4)
    out = tiny4.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=5, do_sample=False
    )
    assert set(cache.retained) == {(1, 2)}
    assert cache.nbytes == 2 * fmt.model_bytes(out.shape[1] - 1, 2, 16, 4, retained=cache.retained)
    # no pair: an fp16 cache in every respect (bytes and logits)
    none = minicache_format(0.5, 0.1, pairs=())
    assert none.name == "minicache-Lnone" and none.merge_pairs(4) == ()
    assert none.model_bytes(33, 2, 16, 4) == 4 * get_format("fp16").bytes(33, 2, 16)
    c0, c1 = KVQCache(fmt=none, model=tiny4), KVQCache("fp16", model=tiny4)
    torch.testing.assert_close(prefill_then_steps(tiny4, ids, c0, 20), prefill_then_steps(tiny4, ids, c1, 20))
    assert c0.nbytes == 2 * none.model_bytes(33, 2, 16, 4) == c1.nbytes
    for bad in (((1, 3),), ((1, 2), (2, 3)), ((3, 4),)):
        with pytest.raises(ValueError, match="disjoint adjacent"):
            minicache_format(pairs=bad).merge_pairs(4)


def test_calibrate_pairs_respects_the_tolerance(tiny4):
    from kvq_core.calibration import calibrate_pairs

    ids = torch.randint(0, 97, (1, 48))
    region = minicache_format(1.0, 0.1)  # candidates (0, 1), (1, 2), (2, 3)
    loose = calibrate_pairs(tiny4, ids, region, tolerance=math.inf, prefill=24, chunk=8)
    info = loose.extra["calibration"]
    assert set(info["pair_nll_increase"]) == {(0, 1), (1, 2), (2, 3)}
    chosen = loose.merge_pairs(4)
    assert chosen and all(set(c) & {i for p in chosen for i in p} for c in info["pair_nll_increase"])  # maximal
    assert loose.name == "minicache-L" + "+".join(str(a) for a, _ in chosen)
    tight = calibrate_pairs(tiny4, ids, region, tolerance=0.0, prefill=24, chunk=8)
    assert tight.extra["calibration"]["nll_increase"] <= 0.0
    assert all(info["pair_nll_increase"][p] <= 0.0 for p in tight.merge_pairs(4))
    # only the format's region is a candidate: the deeper half of 4 layers is (2, 3)
    deep = calibrate_pairs(tiny4, ids, minicache_format(0.5, 0.1), tolerance=math.inf, prefill=24, chunk=8)
    assert deep.merge_pairs(4) == ((2, 3),)
    with pytest.raises(ValueError, match="prefill"):
        calibrate_pairs(tiny4, ids, region, prefill=47)


def test_kvq_eval_calibrates_minicache_pairs(tiny4):
    from kvq_core.cli_eval import CacheMaker, parse_cache

    maker = CacheMaker(parse_cache("minicache"), tiny4, torch.randint(0, 97, (1, 40)), None)
    assert maker.spec.label.startswith("kvq:minicache-L") and "pairs" in maker.spec.fmt.extra
    assert "calibration text" in maker.calibration
    cache = maker()
    assert cache.fmt is maker.spec.fmt
