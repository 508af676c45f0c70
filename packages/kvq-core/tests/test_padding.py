"""KVQCache with left-padded batches on a tiny random Llama (GQA 4/2 heads): a sequence's logits and stored
state do not depend on what it is batched with, for every method; bad masks are refused."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvq_core.cache import StreamingLayer  # noqa: E402
from kvq_core.calibration import calibrate, record_kv  # noqa: E402
from kvq_core.formats import METHODS, get_format, h2o_format, minicache_format  # noqa: E402
from kvq_core.hf_cache import KVQCache, left_padding  # noqa: E402

# Lengths past the 128-token fp16 windows, so padding would land in quantized groups, scales and
# codebooks: the short row (170) is padded by 30 to the long row's 200; then 3 decode steps.
LONG, SHORT, STEPS = 200, 170, 3
PAD = LONG - SHORT

# Every method at its default width, plus two formats that act within 203 tokens of a 2-layer model
# (the defaults do not: h2o's budget is 2048 tokens, minicache merges no pair of 2 layers).
CASES = [pytest.param(get_format(name, spec.default_bits), id=name) for name, spec in METHODS.items()] + [
    pytest.param(h2o_format(16, 8), id="h2o-evicting"),
    pytest.param(minicache_format(pairs=((0, 1),)), id="minicache-pair"),
]

# Each row's layers see exactly the tokens they would see alone, so the stored state is computed
# from the same K/V up to the model's own fp32 rounding in a batch of another shape (DynamicCache:
# 6e-8 on these logits of magnitude ~0.46; every method here: at most 1.2e-7). 1e-5 leaves 80x margin
# and is 50x below the smallest padding leak the same comparison measured when the cache ignored
# the mask (kivi-2: 5.4e-4; kvquant-3: 3.7e-3; h2o-evicting: 0.58).
ATOL = 1e-5


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(1, 97, (2, LONG + STEPS))


def _alone(model, seq, cache):
    """Last-position logits [1 + STEPS, vocab] of a prefill of seq[:, :-STEPS] and STEPS one-token steps."""
    n = seq.shape[1] - STEPS
    with torch.no_grad():
        out = [model(seq[:, :n], past_key_values=cache, use_cache=True).logits[0, -1]]
        for t in range(n, n + STEPS):
            out.append(model(seq[:, t : t + 1], past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(out)


def _batched(model, ids, cache):
    """The same for both rows of `ids` with row 1 left-padded by PAD: logits [2, 1 + STEPS, vocab]."""
    batch = ids.clone()
    batch[1, :PAD] = 0
    mask = torch.ones_like(batch)
    mask[1, :PAD] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # each row's own positions, as generate() makes them
    with torch.no_grad():
        kw = dict(attention_mask=mask[:, :LONG], position_ids=pos[:, :LONG], past_key_values=cache, use_cache=True)
        out = [model(batch[:, :LONG], **kw).logits[:, -1]]
        for t in range(LONG, LONG + STEPS):
            kw = dict(attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1], past_key_values=cache)
            out.append(model(batch[:, t : t + 1], use_cache=True, **kw).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("fmt", CASES)
def test_padded_row_matches_alone(tiny, ids, fmt):
    cache = KVQCache(fmt=fmt, model=tiny, kernels=False)
    got = _batched(tiny, ids, cache)
    assert cache.rows is not None and len(cache.rows) == 2
    short = KVQCache(fmt=fmt, model=tiny, kernels=False)
    torch.testing.assert_close(got[1], _alone(tiny, ids[1:, PAD:], short), atol=ATOL, rtol=0)
    long = KVQCache(fmt=fmt, model=tiny, kernels=False)
    torch.testing.assert_close(got[0], _alone(tiny, ids[:1], long), atol=ATOL, rtol=0)
    assert cache.get_seq_length() == LONG + STEPS  # positions, padding included, as the model counts them
    assert cache.nbytes == short.nbytes + long.nbytes  # each row holds its own tokens
    # (MiniCache's count depends on the tokens each row retains, KVQuant's on the key outliers each row holds)
    if not fmt.merge_depth_fraction and not getattr(fmt.key.outliers, "thresholds", "") == "channel":
        # 2 layers, 2 KV heads x 16, hidden 64 for XQuant
        assert cache.nbytes == 2 * (fmt.bytes(LONG + STEPS, 2, 16, 64) + fmt.bytes(SHORT + STEPS, 2, 16, 64))
    for c in (cache, short, long):
        c.remove_hooks()


def test_the_comparison_sees_padding(tiny, ids):
    # A cache that is not told the mask puts row 1's padding into its KIVI groups and window: the
    # comparison above must see that (it measures 5.4e-4, 54x ATOL).
    cache = KVQCache("kivi", 2, model=tiny, kernels=False)
    cache.set_attention_mask = lambda mask: None
    got = _batched(tiny, ids, cache)
    alone = _alone(tiny, ids[1:, PAD:], KVQCache("kivi", 2, model=tiny, kernels=False))
    assert (got[1] - alone).abs().max() > 10 * ATOL


def test_generate_left_padded_batch(tiny, ids):
    prompts = ids[:, :LONG].clone()
    prompts[1, :PAD] = 0
    mask = torch.ones_like(prompts)
    mask[1, :PAD] = 0
    cache = KVQCache("kvquant", 3, model=tiny)
    out = tiny.generate(prompts, attention_mask=mask, past_key_values=cache, max_new_tokens=8, do_sample=False)
    for row, prompt in ((0, ids[:1, :LONG]), (1, ids[1:, PAD:LONG])):
        alone = tiny.generate(
            prompt, past_key_values=KVQCache("kvquant", 3, model=tiny), max_new_tokens=8, do_sample=False
        )
        assert torch.equal(out[row, LONG:], alone[0, prompt.shape[1] :])
    assert [layer.get_seq_length() for layer in cache.rows[1]] == [SHORT + 7] * 2  # its own tokens only


def test_unpadded_mask_keeps_batched_layers(tiny, ids):
    a = KVQCache("kivi", 2, model=tiny)
    b = KVQCache("kivi", 2, model=tiny)
    seq = ids[:, :140]
    with torch.no_grad():
        tiny(seq, past_key_values=a, use_cache=True)
        ref = tiny(ids[:, 140:141], past_key_values=a, use_cache=True).logits
        tiny(seq, attention_mask=torch.ones_like(seq), past_key_values=b, use_cache=True)
        got = tiny(ids[:, 140:141], attention_mask=torch.ones_like(ids[:, :141]), past_key_values=b, use_cache=True)
    assert b.rows is None and torch.equal(got.logits, ref)


def test_padded_slots_are_zero(tiny, ids):
    cache = KVQCache("kivi", 2, model=tiny)
    seen = []
    update = cache.update

    def spy(k, v, layer_idx, *args, **kwargs):
        out = update(k, v, layer_idx, *args, **kwargs)
        seen.append(out)
        return out

    cache.update = spy
    _batched(tiny, ids, cache)
    for k, v in seen:  # row 1's first PAD slots are padding at every step (nothing is evicted)
        assert k.shape[2] in (LONG, LONG + 1, LONG + 2, LONG + 3)
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
        assert not k[1, :, :PAD].any() and not v[1, :, :PAD].any()
        assert k[1, :, PAD:].abs().sum(-1).gt(0).all()  # every token slot holds a key


def test_chunked_prefill_row_starting_late(tiny, ids):
    # the padded row's first token arrives in the second chunk: its layers start there (KVQuant
    # quantizes every token past its sink, with a codebook fitted on the row's first block)
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :45] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = KVQCache("kvquant", 3, model=tiny)
    with torch.no_grad():
        for lo, hi in ((0, 40), (40, 52), (52, 60)):
            kw = dict(attention_mask=mask[:, :hi], position_ids=pos[:, lo:hi], past_key_values=cache, use_cache=True)
            last = tiny(ids[:, lo:hi], **kw).logits[1, -1]
    alone = KVQCache("kvquant", 3, model=tiny)
    with torch.no_grad():
        tiny(ids[1:, 45:52], past_key_values=alone, use_cache=True)
        ref = tiny(ids[1:, 52:60], past_key_values=alone, use_cache=True).logits[0, -1]
    torch.testing.assert_close(last, ref, atol=ATOL, rtol=0)


def _forward(model, ids, mask, cache):
    with torch.no_grad():
        return model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)


def test_masks_refused(tiny, ids):
    seq = ids[:, :20]
    right = torch.ones_like(seq)
    right[1, -3:] = 0
    hole = torch.ones_like(seq)
    hole[0, 5] = 0
    for mask, match in (
        (right, "row 1 has padding after a token"),
        (hole, "row 0 has padding after a token"),
        (2 * torch.ones_like(seq), "must hold 0 .padding. and 1"),
        (torch.ones(2, 1, 20, 20), "2-D attention_mask"),
    ):
        with pytest.raises(ValueError, match=match):
            _forward(tiny, seq, mask, KVQCache("kivi", 2, model=tiny))
    left = torch.ones_like(seq)
    left[1, :4] = 0
    cache = KVQCache("kivi", 2, model=tiny)
    _forward(tiny, seq, left, cache)
    with pytest.raises(ValueError, match="pass its attention_mask to every forward"):
        _forward(tiny, ids[:, 20:21], None, cache)
    moved = torch.ones(2, 21, dtype=torch.long)
    moved[1, :6] = 0
    with pytest.raises(ValueError, match="row 1 changes which cached positions are padding"):
        _forward(tiny, ids[:, 20:21], moved, cache)
    with pytest.raises(ValueError, match="covers 20 positions; the cache already holds 20"):
        _forward(tiny, ids[:, 20:21], left, cache)
    unpadded = KVQCache("kivi", 2, model=tiny)
    _forward(tiny, seq, torch.ones_like(seq), unpadded)
    late = torch.ones(2, 21, dtype=torch.long)
    late[0, :2] = 0
    with pytest.raises(ValueError, match="give a batch's padding from its first forward"):
        _forward(tiny, ids[:, 20:21], late, unpadded)


def test_cache_without_model_takes_the_mask_by_hand(tiny, ids):
    fmt = get_format("kivi", 2)
    cache = KVQCache(fmt=fmt)  # no hook: the caller hands it each forward's mask
    batch = ids.clone()
    mask = torch.ones_like(batch)
    mask[1, :PAD] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        cache.set_attention_mask(mask[:, :LONG])
        tiny(batch[:, :LONG], attention_mask=mask[:, :LONG], position_ids=pos[:, :LONG], past_key_values=cache)
        cache.set_attention_mask(mask[:, : LONG + 1])
        kw = dict(attention_mask=mask[:, : LONG + 1], position_ids=pos[:, LONG : LONG + 1], past_key_values=cache)
        got = tiny(batch[:, LONG : LONG + 1], **kw).logits[1, -1]
        with pytest.raises(ValueError, match="give each forward's mask"):
            tiny(batch[:, LONG + 1 : LONG + 2], past_key_values=cache)
    alone = _alone(tiny, ids[1:, PAD : LONG + STEPS], KVQCache(fmt=fmt))[1]
    torch.testing.assert_close(got, alone, atol=ATOL, rtol=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernel path on CPU needs TRITON_INTERPRET=1")
def test_kernel_path_refuses_padding(tiny, ids):
    pytest.importorskip("kvq_kernels")
    seq = ids[:, :20]
    left = torch.ones_like(seq)
    left[1, :4] = 0
    cache = KVQCache("kivi", 2, model=tiny, kernels=True)
    try:
        with pytest.raises(ValueError, match="kernels=True: the kvq kernel path takes unpadded batches only"):
            _forward(tiny, seq, left, cache)
    finally:
        tiny.set_attn_implementation("sdpa")  # the kernel path switched the shared model's attention


def test_left_padding():
    assert left_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])) == [2, 0, 4]
    assert left_padding(torch.tensor([[False, True]])) == [1]


def test_calibration_sees_only_real_tokens(tiny, ids):
    a, b = ids[:1, PAD:LONG], ids[1:, :LONG]  # 170 and 200 tokens
    batch = torch.cat([torch.cat([torch.zeros(1, PAD, dtype=a.dtype), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :PAD] = 0
    rec = record_kv(tiny, batch, fisher=True, attention_mask=mask)
    ra, rb = record_kv(tiny, a, fisher=True), record_kv(tiny, b, fisher=True)
    n_a, n_b = a.shape[1] - 1, b.shape[1] - 1  # predicted tokens: the batch loss is their joint mean
    for layer, alone_a, alone_b in zip(rec, ra, rb):
        kg, vg = layer[2:]
        assert not kg[0, :, :PAD].any() and not vg[0, :, :PAD].any()  # padding gets no gradient
        for j in (0, 1):  # K, V: each row's alone, up to fp32 rounding
            torch.testing.assert_close(layer[j][:1, :, PAD:], alone_a[j], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer[j][1:], alone_b[j], atol=1e-5, rtol=1e-5)
        # dLoss/dK, dLoss/dV: each row's alone, scaled by its share of the predicted tokens; fp32 rounding
        # of a backward pass through another batch shape, relative to the largest gradient (counting the
        # first token's prediction from a padded position in the loss would give 3e-3)
        for j in (2, 3):
            for got, alone, n in ((layer[j][:1, :, PAD:], alone_a[j], n_a), (layer[j][1:], alone_b[j], n_b)):
                want = alone * n / (n_a + n_b)
                torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
    # KVQuant (pre-RoPE keys): codebooks and static key ranges are fitted on both rows' own tokens past their
    # first (the attention sink), each un-rotated at its own positions 0, 1, ...; equal within two fp16 steps (2**-10 relative), where
    # padding in the fit moves the codebook by ~3e-2
    state = calibrate(tiny, batch, "kvquant", 2, fisher=False, attention_mask=mask)
    rope = KVQCache("kvquant", 2, model=tiny).layers[0].rope
    for i in (0, 1):
        layer = StreamingLayer(get_format("kvquant", 2), 16)
        ka, kb = (rope.unapply(r[i][0], 0) for r in (ra, rb))
        k_fit = torch.cat([ka[:, :, 1:], kb[:, :, 1:]], 2).float()
        layer.calibrate(k_fit, torch.cat([ra[i][1][:, :, 1:], rb[i][1][:, :, 1:]], 2).float())
        for stream, name in ((layer.k, "k"), (layer.v, "v")):
            want = stream.codec.state_dict()
            assert sorted(state[i][name]) == sorted(want)
            for key, x in want.items():
                torch.testing.assert_close(state[i][name][key], x, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="row 0 has padding after a token"):
        calibrate(tiny, batch, "kvquant", 2, fisher=False, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="must have input_ids' shape"):
        record_kv(tiny, batch, attention_mask=mask[:, 1:])
