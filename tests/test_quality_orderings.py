"""The papers' orderings, measured as attention-output error on real SmolLM2 activations.

Sample: tests/data/smollm2_kv_sample.safetensors (384 tokens of calibration text, layers 0/10/20/29,
pre- and post-RoPE keys, values, queries; scripts/capture_smollm2_kv.py). Every query attends
causally over the layer's reconstructed cache; the error is ||out - ref|| / ||ref|| against fp64
attention over the unquantized fp16 K/V, averaged over the four layers. Everything is deterministic
(codecs calibrate on the sample itself), so the margins below are exact for this sample:
measured 0.256 vs 0.629, 0.252 vs 0.293, 0.227 vs 0.252, 0.390 vs 0.494, 0.146 vs 0.177.
Formats keep the first token in fp16 (KVQuant's attention sink) on both sides of each comparison:
without it, the sink token's extreme keys dominate every comparison (measured while building this).
"""

import pytest

torch = pytest.importorskip("torch")

from kvq_core.attention import apply_rope, attention_reference  # noqa: E402
from kvq_core.cache import StreamingLayer  # noqa: E402
from kvq_core.formats import METHODS, KVFormat, get_format, kvquant_format  # noqa: E402
from kvq_core.formats import StreamFormat as S  # noqa: E402

FP = S()


def attention_error(kv_sample, fmt: KVFormat) -> float:
    t, prov = kv_sample
    errs = []
    for i in prov["layers"]:
        q = apply_rope(t[f"L{i}.q_pre"], cos=t["cos"], sin=t["sin"]).float()[None]  # q: [1, 9, T, 64]
        k_post, k_pre = t[f"L{i}.k_post"].float()[None], t[f"L{i}.k_pre"].float()[None]  # [1, 3, T, 64]
        v = t[f"L{i}.v"].float()[None]
        layer = StreamingLayer(fmt, 64)
        layer.append(k_pre if fmt.pre_rope_keys else k_post, v)
        k_hat = layer.keys()
        if fmt.pre_rope_keys:  # RoPE after dequantization
            k_hat = apply_rope(k_hat[0], cos=t["cos"], sin=t["sin"]).float()[None]
        ref = attention_reference(q, k_post, v)
        out = attention_reference(q, k_hat, layer.values())
        errs.append(float((out - ref).norm() / ref.norm()))
    return sum(errs) / len(errs)


def test_per_channel_keys_beat_per_token_keys_at_2_bits(kv_sample):
    per_channel = KVFormat("c", S(bits=2, axis="channel", group_size=32), FP, sink_tokens=1)
    per_token = KVFormat("t", S(bits=2, axis="token", group_size=32), FP, sink_tokens=1)
    assert attention_error(kv_sample, per_channel) < attention_error(kv_sample, per_token)


def test_non_uniform_beats_uniform_at_3_bits(kv_sample):
    uniform = KVFormat(
        "u",
        S(bits=3, axis="channel", group_size=None),
        S(bits=3, axis="token", groups_span_heads=True),
        sink_tokens=1,
        pre_rope_keys=True,
    )  # the same layout as kvquant-nuq3, with a uniform grid
    assert attention_error(kv_sample, kvquant_format(3, 0.0, 1)) < attention_error(kv_sample, uniform)


@pytest.mark.parametrize("bits", [2, 3])
def test_one_percent_outliers_reduce_error(kv_sample, bits):
    assert attention_error(kv_sample, kvquant_format(bits, 0.01, 1)) < attention_error(
        kv_sample, kvquant_format(bits, 0.0, 1)
    )


def test_pre_rope_keys_beat_post_rope_keys_at_equal_bits(kv_sample):
    post = KVFormat("k3", S(bits=3, axis="channel", group_size=None), FP, sink_tokens=1)  # keys only
    pre = post.with_(pre_rope_keys=True)
    assert pre.bytes(384, 3, 64) == post.bytes(384, 3, 64)
    assert attention_error(kv_sample, pre) < attention_error(kv_sample, post)


def held_format_bytes(layer, fmt: KVFormat, tokens: int, h: int, d: int) -> int:
    """The format's bytes for one sequence, with key outliers beyond per-channel thresholds counted as held (their
    number follows the data; the format's own count is the expected 1%)."""
    from kvq_core.formats.accounting import stream_bytes

    expect = fmt.bytes(tokens, h, d)
    if "sparse_values" in getattr(layer.k, "body", {}):
        held = layer.k.body["sparse_values"].numel()
        nominal, actual = (stream_bytes(fmt.key, tokens, h, d, fmt.sink_tokens, n) for n in (None, held))
        expect += actual.outlier_values + actual.outlier_indices - nominal.outlier_values - nominal.outlier_indices
    return expect


def k_post_of(t, i, fmt, k):
    """Keys as attention sees them: RoPE applied after dequantization for pre-RoPE formats."""
    return apply_rope(k[0], cos=t["cos"], sin=t["sin"]).float()[None] if fmt.pre_rope_keys else k


# XQuant rebuilds K/V from the layer input and MiniCache merges layer pairs: neither reconstructs one
# layer's K/V sample alone (packages/kvq-core/tests/test_xquant.py, test_minicache.py test them).
NOT_KV_STREAMS = {"xquant", "xquant-cl", "minicache"}
ALL = [(m, b) for m, spec in METHODS.items() for b in spec.bits if m not in NOT_KV_STREAMS]
FOUNDATION = {"fp16", "int", "fp8-e4m3", "fp8-e5m2", "kivi", "kvquant", "kvquant-dense", "skvq"}  # issue 2


@pytest.mark.parametrize("method,bits", ALL, ids=[f"{m}-{b[0]}-{b[1]}" for m, b in ALL])
def test_every_method_on_real_activations(kv_sample, method, bits):
    """Quantize and reconstruct real K/V; bytes held equal the format's; the error shrinks with bits."""
    t, prov = kv_sample
    fmt = get_format(method, bits)
    i = prov["layers"][1]
    k = t[f"L{i}.k_pre" if fmt.pre_rope_keys else f"L{i}.k_post"].float()[None]
    v = t[f"L{i}.v"].float()[None]
    q = apply_rope(t[f"L{i}.q_pre"], cos=t["cos"], sin=t["sin"]).float()[None]  # attention-scored methods
    layer = StreamingLayer(fmt, 64)
    layer.append(k[:, :, :364], v[:, :, :364], queries=q[:, :, :364])  # prefill, then decode steps
    for s in range(364, 384):
        layer.append(k[:, :, s : s + 1], v[:, :, s : s + 1], queries=q[:, :, s : s + 1])
    assert layer.nbytes == held_format_bytes(layer, fmt, 384, 3, 64)
    rel = max(float((layer.keys() - k).norm() / k.norm()), float((layer.values() - v).norm() / v.norm()))
    if method not in FOUNDATION:
        # Issue-8 methods: their error is not set by a bit width (low rank, eviction, token tiers,
        # shared exponents), and tiered/evicting caches hold tokens grouped by tier, not in time order,
        # so compare what they guarantee: a decode query's attention output (order-invariant).
        # Measured on this query: 0.0018 (mikv-4) to 0.75 (vidkv-k1.25v1.58); 2-bit product codes
        # (million-2, no fp16 sink) 0.68. The bound only rejects outputs no better than attending
        # to nothing (error 1.0); which method is better is the quality table's job.
        ref = attention_reference(q[:, :, -1:], k_post_of(t, i, fmt, k), v)
        out = attention_reference(q[:, :, -1:], k_post_of(t, i, fmt, layer.keys()), layer.values())
        err = float((out - ref).norm() / ref.norm())
        assert err < 1.0, (fmt.name, err)
        return
    # Bounds by the narrower stream's width. Measured worst on this layer (K or V relative error):
    # 8 bits 0.056 (fp8-e5m2, 2 mantissa bits), 4 bits 0.147 (int4), 3 bits 0.315 (int3),
    # 2 bits 0.735 (int2), 1.5 bits 0.62 (skvq-k2v1.5); the bounds leave ~25% room.
    bound = {16: 1e-3, 8: 0.08, 4: 0.2, 3: 0.4}.get(min(bits), 0.9)
    assert rel < bound, (fmt.name, rel)
