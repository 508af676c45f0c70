"""Token tiers by attention score (ZipCache, MiKV, heavy-hitter eviction): bytes, selection policy, HF cache."""

import math

import pytest
import torch

from kvq_core.cache import StreamingLayer
from kvq_core.cache_tiers import TieredLayer
from kvq_core.formats import KVFormat, StreamFormat, TokenTiers, get_format, h2o_format, mikv_format, zipcache_format

TIERED = {
    "h2o-16+8": h2o_format(16, 8, sink_tokens=2),
    "mikv-2": mikv_format(2, window=8),
    "zipcache-4/2": zipcache_format(window=8),
    "mikv-3-no-window": mikv_format(3, window=0),
}


@pytest.mark.parametrize("name", list(TIERED))
def test_held_bytes_equal_format_bytes_with_queries(name):
    fmt, h, d, batch = TIERED[name], 2, 16, 2
    layer = StreamingLayer(fmt, d)
    g = torch.Generator().manual_seed(0)
    total = 0
    for t in [1, 37, 1, 1, 20, 1, 50, 1]:
        k, v = torch.randn(batch, h, t, d, generator=g), torch.randn(batch, h, t, d, generator=g)
        layer.append(k, v, queries=torch.randn(batch, 2 * h, t, d, generator=g))  # GQA: 2 query heads per KV head
        total += t
        bd = fmt.breakdown(total, h, d)
        assert layer.nbytes == batch * bd.per_sequence + bd.shared, (total, sorted(layer.tensors()))
        assert layer.keys().shape == layer.values().shape == (batch, h, fmt.stored_tokens(total), d)


def test_salient_count_is_an_exact_ceiling():
    s = StreamFormat(bits=2, residual_tokens=8, tiers=TokenTiers("normalized", fraction=0.2, bits=4))
    assert [s.salient_count(t) for t in (0, 1, 5, 6, 10, 11)] == [0, 1, 1, 2, 2, 3]  # 0.2 * 5 is 1, not 2
    assert h2o_format(16, 8).key.salient_count(100) == 16


def test_heavy_hitters_are_the_attended_tokens():
    # Each query attends (probability ~1) to the latest chosen token it can see: every chosen token
    # collects >= 6 in accumulated attention, any other < 2. A budget of 4 (+ window 2) keeps exactly them.
    d, t = 16, 40
    keys = torch.randn(1, 1, t, d, generator=torch.Generator().manual_seed(0)) * 0.1
    chosen = [3, 11, 17, 29]
    for i in chosen:
        keys[0, 0, i] = 0
        keys[0, 0, i, i % d] = 10.0
    q = torch.zeros(1, 1, t, d)  # queries 0-2 see no chosen token: uniform attention
    for j in range(3, t):
        c = max(i for i in chosen if i <= j)
        q[0, 0, j, c % d] = 10.0
    layer = StreamingLayer(h2o_format(4, 2), d)
    layer.append(keys, keys, queries=q)
    held = layer.keys()[0, 0]
    assert held.shape[0] == 6
    kept = {int(torch.cdist(held[i : i + 1], keys[0, 0]).argmin()) for i in range(4)}
    assert kept == set(chosen)
    torch.testing.assert_close(held[4:], keys[0, 0, -2:].half().float())  # the window: the 2 newest, in order


def test_zipcache_normalizes_by_the_number_of_queries():
    # Window of 4, R = 1: tokens 0..2 leave, seen by 4, 3, 2 queries. Accumulated scores 2.0, 0.9, 1.5 are
    # means 0.5, 0.3, 0.75: accumulated attention would pick token 0, normalized attention picks token 2.
    fmt = StreamFormat(bits=2, axis="token", residual_tokens=1, tiers=TokenTiers("normalized", fraction=1 / 3, bits=4))
    layer = TieredLayer(KVFormat("t", fmt, fmt), 4)
    k = torch.arange(1.0, 5.0)[None, None, :, None].expand(1, 1, 4, 4)  # token j is the constant row j + 1
    # the state after 4 appended tokens and their queries' scores, before the window flushes
    layer.k.window, layer.v.window, layer.tokens = k.half(), k.half(), 4
    layer.win_scores = torch.tensor([[[2.0, 0.9, 1.5, 1.0]]])
    layer._flush()
    assert len(layer.k.hi) == 1 and len(layer.k.lo) == 2
    assert torch.equal(layer.k.hi.deq, torch.full((1, 1, 1, 4), 3.0))  # constant rows quantize exactly
    assert torch.equal(layer.k.lo.deq[0, 0, :, 0], torch.tensor([1.0, 2.0]))


def test_mikv_keeps_every_token_and_beats_eviction():
    g = torch.Generator().manual_seed(1)
    d, t = 32, 200
    k, v = torch.randn(1, 2, t, d, generator=g), torch.randn(1, 2, t, d, generator=g)
    q = torch.randn(1, 4, t, d, generator=g)
    probe = torch.randn(1, 2, 1, d, generator=g)

    def out(kk, vv):
        return torch.softmax(probe @ kk.transpose(-1, -2) / math.sqrt(d), -1) @ vv

    ref = out(k, v)
    errs = {}
    for name, fmt in {"mikv-2": mikv_format(2, window=16), "evict": h2o_format(math.ceil(0.2 * (t - 16)), 16)}.items():
        layer = StreamingLayer(fmt, d)
        layer.append(k, v, queries=q)
        errs[name] = float((out(layer.keys(), layer.values()) - ref).norm() / ref.norm())
    assert StreamingLayer(mikv_format(2, window=16), d).fmt.stored_tokens(t) == t
    assert errs["mikv-2"] < 0.5 * errs["evict"]


def test_tier_format_errors():
    with pytest.raises(ValueError, match="must be fp16"):
        TokenTiers("accumulated", fraction=0.2, bits=4)
    with pytest.raises(ValueError, match="salient fraction in"):
        TokenTiers("accumulated")
    with pytest.raises(ValueError, match="unsupported"):
        StreamFormat(bits=0)
    with pytest.raises(ValueError, match="same tokens"):
        mikv_format(2).with_(
            value=StreamFormat(bits=2, residual_tokens=128, tiers=TokenTiers("accumulated", fraction=0.5))
        )


def test_avg_bits_at_32k():
    # h2o: 2048 heavy hitters + 128 recent tokens per head kept fp16 (K and V), plus one fp32 score each
    kept, h, d = 2048 + 128, 32, 128
    expect = 8 * (2 * kept * h * d * 2 + kept * h * 4) / (2 * 32768 * h * d)
    assert get_format("h2o", 0).avg_bits(32768, h, d) == pytest.approx(expect, rel=1e-12)
    assert 2.9 < get_format("zipcache", 2).avg_bits(32768, 32, 128) < 3.3  # 0.4 * 4.25 + 0.6 * 2.25 + window


def test_chunked_scoring_equals_one_shot():
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(1, 2, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    q = torch.randn(1, 4, 300, 16, generator=g)
    layers = []
    for chunk in (7, 1000):
        layer = StreamingLayer(mikv_format(2, window=300), 16)  # nothing leaves the window: scores stay visible
        layer.tiers.SCORE_CHUNK = chunk
        layer.append(k, v, queries=q)
        layers.append(layer.tiers.win_scores)
    torch.testing.assert_close(layers[0], layers[1])
    assert float(layers[0].sum()) == pytest.approx(4 * 300, rel=1e-5)  # each query's probabilities sum to 1
