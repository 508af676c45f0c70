"""A small real slice of the quality comparison, run by CI: SmolLM2, decode protocol, kvq vs transformers.

The protocol of reports/quality, reduced: 2 windows spread over pydoc_text('evaluation') from token 512, each
prefilled with 256 tokens through the cache, then SCORED tokens scored one decode step at a time; each cache's change
against the full cache pooled over both windows and paired per window (`kvq_core.eval.paired_change`).
Measured here: kvq KIVI-4 +1.3%, kvq KIVI-2 +33.9%, HF quanto-2 +577%. On 64 tokens a 4-bit cache can land on
either side of the full cache, so that ordering is asserted within 3%; the others hold by wide margins.
"""

import pytest

pytestmark = pytest.mark.model
SCORED = 32


@pytest.fixture(scope="module")
def slice_change(smollm2):
    from transformers import DynamicCache

    from kvq_core.eval import decode_windows, paired_change, tokenize, window_starts
    from kvq_core.hf_cache import KVQCache
    from kvq_core.hf_peers import peer_cache_factory
    from kvq_core.models import pydoc_text

    model, tok = smollm2
    ids = tokenize(tok, pydoc_text("evaluation"))
    starts = window_starts(ids.numel(), 256 + SCORED, 2, start=512)
    caches = {
        "full": DynamicCache,
        "kivi-4": lambda: KVQCache("kivi", 4, model=model),
        "kivi-2": lambda: KVQCache("kivi", 2, model=model),
        "quanto-2": peer_cache_factory("quanto-2", model.config),
    }
    nll = {
        name: [r.nll_sum for r in decode_windows(model, ids, make, starts, prefill=256, scored=SCORED, progress=False)]
        for name, make in caches.items()
    }
    return {name: paired_change(x, nll["full"], [SCORED, SCORED]) for name, x in nll.items()}


def test_full_precision_then_4_bit_then_2_bit(slice_change):
    assert slice_change["full"].change == 0
    assert slice_change["kivi-4"].change <= 0.03
    assert slice_change["kivi-4"].change < slice_change["kivi-2"].change


def test_kvq_kivi_2_beats_transformers_quanto_2(slice_change):
    assert slice_change["kivi-2"].change < slice_change["quanto-2"].change
