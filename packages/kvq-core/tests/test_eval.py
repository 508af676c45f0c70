"""Perplexity protocols (kvq_core.eval) on a tiny random Llama: a full-precision cache equals one forward pass."""

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvq_core.eval import decode_perplexity, forward_perplexity, teacher_forced_perplexity  # noqa: E402
from kvq_core.hf_peers import PEER_CACHES, peer_cache_factory  # noqa: E402


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1))


# (prefix, chunk): token by token; a longer prefill; chunks that do not divide the window (last one partial)
@pytest.mark.parametrize("prefix,chunk", [(1, 1), (17, 1), (1, 13)])
def test_teacher_forced_full_cache_equals_forward(tiny, ids, prefix, chunk):
    ref = forward_perplexity(tiny, ids, window=41, windows=2, start=5)
    got = teacher_forced_perplexity(
        tiny, ids, transformers.DynamicCache, window=41, windows=2, start=5, prefix=prefix, chunk=chunk, progress=False
    )
    assert got.tokens == ref.tokens == 2 * 40
    assert got.nll == pytest.approx(ref.nll, rel=1e-6)


def test_decode_full_cache_equals_forward_on_the_scored_tokens(tiny, ids):
    got = decode_perplexity(tiny, ids, transformers.DynamicCache, prefill=40, scored=23, windows=2, progress=False)
    x = ids[: 2 * 63].view(2, 63)
    with torch.no_grad():
        logp = torch.log_softmax(tiny(x).logits.double(), -1)  # [2, 63, V]
    # scored: predictions at positions 39..61 of each window, i.e. tokens 40..62
    nll = -logp[:, 39:62].gather(-1, x[:, 40:63, None]).sum().item()
    assert got.tokens == 2 * 23
    assert got.nll_sum == pytest.approx(nll, rel=1e-6)
    assert got.ppl == pytest.approx(math.exp(nll / 46), rel=1e-6)


def test_fp8_cache_changes_the_decode_result_a_little(tiny, ids):
    full = decode_perplexity(tiny, ids, peer_cache_factory("full", tiny.config), prefill=40, scored=20, progress=False)
    fp8 = decode_perplexity(tiny, ids, peer_cache_factory("fp8", tiny.config), prefill=40, scored=20, progress=False)
    assert fp8.nll != full.nll  # the decode steps really read the quantized history
    assert fp8.nll == pytest.approx(full.nll, rel=0.05)


def test_bad_input(tiny, ids):
    with pytest.raises(ValueError, match="text too short: 300 tokens, the protocol needs 512"):
        decode_perplexity(tiny, ids, transformers.DynamicCache, progress=False)
    with pytest.raises(ValueError, match="causal LM"):
        forward_perplexity(object(), ids)
    with pytest.raises(ValueError, match="language-model head"):
        forward_perplexity(tiny.model, ids, window=10, windows=1)
    with pytest.raises(ValueError, match="prefix"):
        teacher_forced_perplexity(tiny, ids, transformers.DynamicCache, window=10, prefix=10, progress=False)
    with pytest.raises(ValueError, match="start must be >= 0, got -5"):
        forward_perplexity(tiny, ids, window=10, windows=1, start=-5)
    with pytest.raises(ValueError, match="windows must be an integer, got 1.5"):
        forward_perplexity(tiny, ids, window=10, windows=1.5)
    with pytest.raises(ValueError, match="valid: " + ", ".join(PEER_CACHES)):
        peer_cache_factory("quanto-3", tiny.config)


def test_held_bits_per_element(tiny, ids):
    from kvq_core.hf_peers import held_bits_per_element

    measure = lambda cache: held_bits_per_element(cache, tiny.config)
    full = decode_perplexity(
        tiny, ids, peer_cache_factory("full", tiny.config), prefill=40, scored=20, progress=False, measure_cache=measure
    )
    assert full.cache_measure == 32.0  # float32 K/V
    fp8 = decode_perplexity(
        tiny, ids, peer_cache_factory("fp8", tiny.config), prefill=40, scored=20, progress=False, measure_cache=measure
    )
    # 8-bit codes plus one fp32 scale per K and V tensor: (layers 2 x K/V 2 x 32 bits) over
    # (layers 2 x K/V 2 x kv heads 2 x head_dim 16 x tokens t) elements, averaged over the 20 scored steps,
    # which hold t = 40 (the prefill) to 59 (40 prefilled + 19 decoded) tokens
    want = sum(8 + (2 * 2 * 32) / (2 * 2 * 2 * 16 * t) for t in range(40, 60)) / 20
    assert fp8.cache_measure == pytest.approx(want)
