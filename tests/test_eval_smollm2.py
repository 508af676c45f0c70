"""Perplexity protocols on the real SmolLM2 model: a full-precision cache reproduces the cache-free forward."""

import pytest

torch = pytest.importorskip("torch")

from kvq_core.eval import decode_perplexity, forward_perplexity, teacher_forced_perplexity, tokenize  # noqa: E402
from kvq_core.hf_peers import peer_cache_factory  # noqa: E402
from kvq_core.models import pydoc_text  # noqa: E402


@pytest.fixture(scope="module")
def eval_ids(smollm2):
    _, tok = smollm2
    return tokenize(tok, pydoc_text("evaluation"))[:256]


@pytest.mark.model
def test_teacher_forced_full_cache_equals_forward(smollm2, eval_ids):
    model, _ = smollm2
    full = peer_cache_factory("full", model.config)
    ref = forward_perplexity(model, eval_ids, window=96, windows=1)
    got = teacher_forced_perplexity(model, eval_ids, full, window=96, windows=1, progress=False)
    assert got.tokens == ref.tokens == 95
    # fp32 model: token-by-token vs one forward differ only in summation order (measured ~1e-6 relative)
    assert got.nll == pytest.approx(ref.nll, rel=1e-5)


@pytest.mark.model
def test_decode_full_cache_equals_one_forward(smollm2, eval_ids):
    model, _ = smollm2
    got = decode_perplexity(
        model, eval_ids, peer_cache_factory("full", model.config), prefill=96, scored=32, progress=False
    )
    x = eval_ids[:128]
    with torch.no_grad():
        logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)  # [128, V]
    nll = -logp[95:127].gather(-1, x[96:128, None]).sum().item()  # predictions of tokens 96..127
    assert got.tokens == 32
    assert got.nll_sum == pytest.approx(nll, rel=1e-5)


@pytest.mark.model
@pytest.mark.slow
def test_hf_quantized_caches_order_on_reference_decode_protocol(smollm2):
    """docs/references.md §7's decode protocol: full <= quanto 4-bit < quanto 2-bit (11.744, 11.797, 59.65)."""
    pytest.importorskip("optimum.quanto")
    model, tok = smollm2
    ids = tokenize(tok, pydoc_text("evaluation"))
    ppl = {
        name: decode_perplexity(
            model, ids, peer_cache_factory(name, model.config), prefill=384, scored=128, start=512, progress=False
        ).ppl
        for name in ("full", "quanto-4", "quanto-2")
    }
    assert ppl["full"] == pytest.approx(11.744, abs=0.01)
    assert ppl["full"] <= ppl["quanto-4"] < ppl["quanto-2"]
    assert ppl["quanto-4"] < 1.01 * ppl["full"]
