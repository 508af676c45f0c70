"""XQuant, XQuant-CL and MiniCache on SmolLM2-135M: generate() works, bytes match, greedy tokens agree.

Agreement is teacher-forced (each step is fed the full-precision cache's greedy token, so one early
flip does not derail the rest), over 12 generated tokens of a chat prompt. Measured (2026-11-23,
CPU, 24 tokens): xquant-8 and xquant-cl-8 1.00; xquant-4 0.83, xquant-cl-4 0.92 (int-4 K/V: 0.88);
minicache merging layers 15-28 with 10% retention 0.21, merging only 24-29 0.75, retaining every token 1.00.
SmolLM2's adjacent layers' K/V directions are nearly orthogonal (mean per-head cosine between
-0.15 and 0.22 for every pair), unlike the 7B+ models MiniCache reports, so merging costs quality here;
`calibrate_pairs` (what kvq-eval runs) merges only the pairs calibration text says cost <= 5% perplexity.
"""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvq_core.calibration import calibrate_pairs  # noqa: E402
from kvq_core.eval import tokenize  # noqa: E402
from kvq_core.formats import get_format, minicache_format  # noqa: E402
from kvq_core.hf_cache import KVQCache  # noqa: E402
from kvq_core.models import pydoc_text  # noqa: E402

pytestmark = pytest.mark.model
N_NEW = 12


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=transformers.DynamicCache(),
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            do_sample=False,
        )
    return model, tok, ids.shape[1], ref


def _teacher_forced_agreement(model, ref, prompt, cache) -> float:
    with torch.no_grad():
        pred = [model(ref[:, :prompt], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)]
        for t in range(prompt, ref.shape[1] - 1):
            pred.append(model(ref[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1))
    return (torch.stack(pred, 1) == ref[:, prompt:]).float().mean().item()


@pytest.mark.parametrize(
    "fmt,min_agree",
    [
        pytest.param(get_format("xquant", 8), 0.9, id="xquant-8"),
        pytest.param(get_format("xquant-cl", 8), 0.9, id="xquant-cl-8"),
        # merging off for layers 0-23: pairs (24, 25), (26, 27), (28, 29), 10% retained
        pytest.param(minicache_format(0.2, 0.1), 0.5, id="minicache-deepest-fifth"),
        pytest.param(minicache_format(0.5, 1.0), 0.9, id="minicache-retain-all"),  # the merge path, lossless
    ],
)
def test_generate_agrees_with_full_precision(smol, fmt, min_agree):
    model, tok, prompt, ref = smol
    cache = KVQCache(fmt=fmt, model=model)
    agree = _teacher_forced_agreement(model, ref, prompt, cache)
    assert agree >= min_agree, (fmt.name, agree)
    total = ref.shape[1] - 1
    assert cache.nbytes == fmt.model_bytes(total, 3, 64, 30, hidden_size=576, retained=cache.retained)
    cache.remove_hooks()


def test_generate_text(smol):
    model, tok, prompt, ref = smol
    cache = KVQCache("xquant-cl", 8, model=model)
    with torch.no_grad():
        out = model.generate(
            ref[:, :prompt], attention_mask=torch.ones_like(ref[:, :prompt]), past_key_values=cache,
            max_new_tokens=N_NEW, do_sample=False,
        )  # fmt: skip
    text = tok.decode(out[0, prompt:])
    assert "sky" in text.lower() or "blue" in text.lower() or "scatter" in text.lower(), text
    cache.remove_hooks()


def test_calibrated_minicache_merges_only_affordable_pairs(smol):
    # 256 calibration tokens (kvq-eval uses 512): every chosen pair lies in the deeper half, all of them
    # together cost <= 5% calibration perplexity, and the whole deeper half is not affordable here
    model, tok, prompt, ref = smol
    ids = tokenize(tok, pydoc_text("calibration"))[:256][None]
    fmt = calibrate_pairs(model, ids)
    pairs, info = fmt.merge_pairs(30), fmt.extra["calibration"]
    assert all(lo >= 15 and hi == lo + 1 for lo, hi in pairs) and len(pairs) < 7
    assert info["nll_increase"] <= math.log1p(0.05)
    cache = KVQCache(fmt=fmt, model=model)
    assert _teacher_forced_agreement(model, ref, prompt, cache) >= 0.75
    assert cache.nbytes == fmt.model_bytes(ref.shape[1] - 1, 3, 64, 30, retained=cache.retained)
