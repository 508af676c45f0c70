"""The bytes a format predicts equal the bytes its quantizer stores, for every method and odd shapes."""

import math

import pytest
import torch

from kvq_core.cache import StreamingLayer
from kvq_core.formats import METHODS, get_format, kivi_format, method_for_bits, packed_row_bytes, parse_bits
from kvq_core.formats.accounting import stream_bytes

# XQuant (stores the layer input X) and MiniCache (stores layer pairs) are not per-layer K/V streams;
# their held-bytes equalities are in test_xquant.py and test_minicache.py.
NOT_KV_STREAMS = {"xquant", "xquant-cl", "minicache"}
ALL = [(m, b) for m, spec in METHODS.items() for b in spec.bits if m not in NOT_KV_STREAMS]
SHAPES = {"smollm2": (3, 64), "llama": (2, 128), "odd": (1, 40)}  # (kv_heads, head_dim)


def format_bytes(layer, fmt, tokens: int, h: int, d: int, batch: int) -> int:
    """The bytes the format says `batch` sequences of `tokens` tokens hold in `layer`; for key outliers beyond
    per-channel thresholds, as many as the layer holds (their count follows the data)."""
    bd = fmt.breakdown(tokens, h, d)
    expect = batch * bd.per_sequence + bd.shared
    if "sparse_values" in getattr(layer.k, "body", {}):
        held = layer.k.body["sparse_values"].numel()  # over the batch
        nominal, actual = (stream_bytes(fmt.key, tokens, h, d, fmt.sink_tokens, n) for n in (None, held))
        expect += actual.outlier_values + actual.outlier_indices
        expect -= batch * (nominal.outlier_values + nominal.outlier_indices)
    return expect


@pytest.mark.parametrize("method,bits", ALL, ids=[f"{m}-{b[0]}-{b[1]}" for m, b in ALL])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_held_bytes_equal_format_bytes(method, bits, shape):
    h, d = SHAPES[shape]
    fmt = get_format(method, bits)
    layer = StreamingLayer(fmt, d)
    g = torch.Generator().manual_seed(1)
    total, batch = 0, 2
    for t in [1, 96, 1, 1, 33, 130, 1]:  # prefill of 1, then odd blocks crossing every window
        layer.append(torch.randn(batch, h, t, d, generator=g), torch.randn(batch, h, t, d, generator=g))
        total += t
        assert layer.nbytes == format_bytes(layer, fmt, total, h, d, batch), (total, layer.tensors().keys())
    assert layer.keys().shape == (batch, h, total, d)
    assert layer.values().shape == (batch, h, total, d)


def test_kivi_accounting_by_hand():
    # KIVI-2, G=32, R=128, at 32K tokens, 32 heads x 128: codes 2 bits; key scale+zero fp16 per 32 tokens
    # per channel (1 bit/elem); value scale+zero per 32 channels per token (1 bit/elem); fp16 value
    # window of 128 tokens; the key residual is 32768 mod 128 = 0 tokens.
    fmt, t, h, d = kivi_format(2), 32768, 32, 128
    tq_v = t - 128
    expect = (h * t * d * 2 // 8) + (t // 32) * d * h * 4  # keys: codes + scale/zero
    expect += (h * tq_v * d * 2 // 8) + tq_v * h * (d // 32) * 4 + 128 * h * d * 2  # values
    assert fmt.bytes(t, h, d) == expect
    assert fmt.avg_bits(t, h, d) == pytest.approx(3.03, abs=0.01)  # docs/references.md §2: ~3.05 (KVQuant's count)


def test_kvquant_outlier_accounting_matches_paper():
    # KVQuant Appendix M: 1% outliers cost ~0.32 bits/element; nuq3-1% averages 3.32-3.35 bits.
    fmt = get_format("kvquant", 3)
    bits = fmt.avg_bits(4096, 32, 128)
    assert 3.32 <= bits <= 3.35
    dense = get_format("kvquant-dense", 3).avg_bits(4096, 32, 128)
    assert bits - dense == pytest.approx(0.32, abs=0.02)


def test_kivi_residual_semantics():
    fmt = kivi_format(2, group_size=32, residual_tokens=128)
    for t in [0, 1, 127, 128, 129, 300]:
        assert fmt.key.residual_count(t) == t % 128
        assert fmt.value.residual_count(t) == min(t, 128)


def test_appends_do_not_requantize_history():
    layer = StreamingLayer(get_format("kivi", 2), 64)
    g = torch.Generator().manual_seed(0)
    layer.append(torch.randn(1, 2, 256, 64, generator=g), torch.randn(1, 2, 256, 64, generator=g))
    k_body = {n: t.clone() for n, t in layer.k.body.items()}
    v_body = {n: t.clone() for n, t in layer.v.body.items()}
    for _ in range(200):
        layer.append(torch.randn(1, 2, 1, 64, generator=g) * 50, torch.randn(1, 2, 1, 64, generator=g) * 50)
    for n, t in k_body.items():  # the first 256 quantized tokens keep their exact bits
        assert torch.equal(layer.k.body[n][:, :, : t.shape[2]], t)
    for n, t in v_body.items():
        assert torch.equal(layer.v.body[n][:, :, : t.shape[2]], t)


def test_reference_packing_matches_format():
    for b in [1, 1.5, 2, 3, 4, 8]:
        for n in [1, 7, 64, 97, 128]:
            if b == 1.5:
                expect = math.ceil(n / 5)
            elif b == 3:  # a 2-bit plane and a 1-bit plane, each padded to whole bytes
                expect = math.ceil(n / 4) + math.ceil(n / 8)
            else:
                expect = math.ceil(n * b / 8)
            assert packed_row_bytes(b, n) == expect


def test_method_lookup_errors():
    with pytest.raises(ValueError, match="unknown method 'kiwi'; valid: fp16, int"):
        get_format("kiwi", 2)
    with pytest.raises(ValueError, match="no 5-bit variant; valid bits: 2, 3, 4, 8"):
        get_format("kivi", 5)
    with pytest.raises(ValueError, match="cannot read bits"):
        parse_bits("two")
    assert method_for_bits("2") == "kivi" and method_for_bits(16) == "fp16"
    assert method_for_bits("k2v1.5") == "skvq"
    with pytest.raises(ValueError, match="no method stores 7-bit KV"):
        method_for_bits(7)


@pytest.mark.parametrize("method,bits", [("kivi", 2), ("kvquant", 3), ("skvq", "k2v1.5"), ("fp8-e4m3", 8)])
def test_incremental_reconstruction_equals_decoding_the_whole_body(method, bits):
    layer = StreamingLayer(get_format(method, bits), 64)
    g = torch.Generator().manual_seed(3)
    for t in [50, 1, 200, 1, 1, 90]:
        layer.append(torch.randn(1, 3, t, 64, generator=g), torch.randn(1, 3, t, 64, generator=g))
    for stream in (layer.k, layer.v):
        whole = stream.codec.decode(stream.body, stream.quantized_tokens)
        assert torch.equal(stream._deq, whole)


@pytest.mark.parametrize("method,bits", ALL, ids=[f"{m}-{b[0]}-{b[1]}" for m, b in ALL])
def test_held_bytes_equal_format_bytes_after_calibration(method, bits):
    # calibration adds per-layer state (codebooks, channel orders, bases, normalisers): the format counts it
    h, d = SHAPES["smollm2"]
    fmt = get_format(method, bits)
    layer = StreamingLayer(fmt, d)
    g = torch.Generator().manual_seed(2)
    layer.calibrate(torch.randn(1, h, 64, d, generator=g), torch.randn(1, h, 64, d, generator=g))
    total = 0
    for t in [160, 1, 31]:
        q = torch.randn(1, h, t, d, generator=g)
        layer.append(torch.randn(1, h, t, d, generator=g), torch.randn(1, h, t, d, generator=g), q)
        total += t
        assert layer.nbytes == format_bytes(layer, fmt, total, h, d, 1), (total, sorted(layer.tensors()))
