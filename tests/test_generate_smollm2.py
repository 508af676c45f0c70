"""generate() with kvq's cache on SmolLM2 stays coherent, by a criterion that also catches a broken cache.

Same prompt and length as reports/quality/generate.csv (`kvq-eval generate`): tokens 512..895 of
pydoc_text('evaluation'), 64 greedy tokens. Coherence = perplexity of the generated tokens under the
full-precision model (no cache). Measured (2026-11-23, CPU): full cache 1.755, kvq KIVI-2 1.908,
kvq int2 (per-token 2-bit, no residual window) 20.22, whose text reads "which is ( if the name of the is
that". Token agreement with the full cache's continuation is recorded too but not asserted: greedy
paths on this repetitive text fork early even at 8 bits (int8 diverges at token 25).
"""

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]  # three 64-token generations: ~1-2 min on 2 CPU cores


@pytest.fixture(scope="module")
def generations(smollm2):
    from kvq_core.cli_eval import GENERATE_NEW, GENERATE_PROMPT, GENERATE_START, CacheMaker, generate_with, parse_cache
    from kvq_core.eval import tokenize
    from kvq_core.models import pydoc_text

    model, tok = smollm2
    ids = tokenize(tok, pydoc_text("evaluation"))
    prompt = ids[GENERATE_START : GENERATE_START + GENERATE_PROMPT][None]  # [1, 384]
    out, reference = {}, None
    for name in ("full", "kivi:2", "int:2"):  # no calibration needed
        g = generate_with(model, tok, prompt, CacheMaker(parse_cache(name), model, None, None), GENERATE_NEW, reference)
        reference = reference or g.tokens
        out[name] = g
    return out


def test_generate_produces_the_requested_tokens(generations):
    assert all(len(g.tokens) == 64 for g in generations.values())
    assert generations["full"].agree_with_full == 1.0


def test_kivi_2_continuation_is_as_likely_as_full_precision(generations):
    # measured 1.908 vs 1.755 (+9%); a continuation the model itself finds 50% less likely fails
    assert generations["kivi:2"].ppl_under_full < 1.5 * generations["full"].ppl_under_full


def test_criterion_rejects_a_broken_cache(generations):
    # int2 without a window garbles the text: measured 20.2, 10.6x KIVI-2's
    assert generations["int:2"].ppl_under_full > 5 * generations["kivi:2"].ppl_under_full
