"""Bad input to the streaming cache: one clear ValueError, nothing silently wrong."""

import pytest
import torch

from kvq_core.cache import QuantizedStream, StreamingLayer
from kvq_core.cache_minicache import MergedPair
from kvq_core.formats import METHODS, Outliers, StreamFormat, get_format


@pytest.fixture
def layer():
    return StreamingLayer(get_format("kivi", 2), 64)


def test_nan_and_inf_rejected(layer):
    k = torch.randn(1, 2, 4, 64)
    k[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="^K contains 1 NaN and 0 Inf values"):
        layer.append(k, torch.randn(1, 2, 4, 64))
    v = torch.randn(1, 2, 4, 64)
    v[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="^V contains 0 NaN and 1 Inf values"):
        layer.append(torch.randn(1, 2, 4, 64), v)
    assert layer.tokens == 0  # a bad V leaves K unappended too


def test_shape_and_dtype_mismatch(layer):
    with pytest.raises(ValueError, match="same shape"):
        layer.append(torch.randn(1, 2, 4, 64), torch.randn(1, 2, 5, 64))
    with pytest.raises(ValueError, match="head_dim mismatch"):
        layer.append(torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32))
    with pytest.raises(ValueError, match=r"\[batch, kv_heads, tokens, head_dim\]"):
        layer.append(torch.randn(2, 4, 64), torch.randn(2, 4, 64))
    with pytest.raises(ValueError, match="floating point"):
        layer.append(torch.ones(1, 2, 4, 64, dtype=torch.int32), torch.ones(1, 2, 4, 64, dtype=torch.int32))
    layer.append(torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64))
    with pytest.raises(ValueError, match="batch/heads mismatch"):
        layer.append(torch.randn(1, 3, 4, 64), torch.randn(1, 3, 4, 64))


# Methods whose stored form is a transform of the input (a rotation, an rFFT, a basis, channel
# normalisers) round a constant in fp32 on the way; every other method stores a zero-range group as its
# zero point (or codebook level, or fp16 row) and gives the constant back exactly.
TRANSFORMED = {"rotatekv", "vidkv", "cskv", "zipcache", "mikv"}
EVERY_METHOD = [(m, b) for m, spec in METHODS.items() for b in spec.bits]


def _round_trip(method: str, bits, x: torch.Tensor) -> torch.Tensor:
    """Keys and values of a cache holding `x` [1, H, T, D] as K and as V, stacked: [2, 1, H, T', D]."""
    fmt = get_format(method, bits)
    if fmt.cache_input != "kv":  # XQuant's X stream: one "head" of H * D channels
        stream = QuantizedStream(fmt.key, x.shape[1] * x.shape[3])
        xs = x.permute(0, 2, 1, 3).reshape(1, 1, x.shape[2], -1)  # [1, 1, T, H*D]
        stream.append(xs)
        out = stream.dequantized().reshape(1, x.shape[2], x.shape[1], x.shape[3]).permute(0, 2, 1, 3)
        return torch.stack([out, out])
    if fmt.merge_depth_fraction:  # MiniCache: a merged pair of two layers holding the same block
        pair = MergedPair(fmt, (0, 1))
        pair.pending = (x, x.clone())
        pair.merge(x.clone(), x.clone())
        return torch.stack([pair.k.restore(0), pair.v.restore(1)])
    layer = StreamingLayer(fmt, x.shape[-1])
    layer.append(x, x.clone(), torch.ones_like(x))
    return torch.stack([layer.keys(), layer.values()])


@pytest.mark.parametrize("method,bits", EVERY_METHOD, ids=[f"{m}-{b[0]}-{b[1]}" for m, b in EVERY_METHOD])
def test_zero_range_blocks_round_trip_in_every_method(method, bits):
    # 200 tokens pass every window (128) into the body; 2 heads x 32 channels fit every group layout
    for value in (0.0, 0.375, -2.5):
        x = torch.full((1, 2, 200, 32), value)
        y = _round_trip(method, bits, x)
        assert torch.isfinite(y).all(), (method, value)
        if value == 0.0 or method not in TRANSFORMED:
            assert torch.equal(y, torch.full_like(y, value)), (method, value, float((y - value).abs().max()))
        else:  # measured worst: rotatekv-2 at -2.5, 0.086 (3.4%)
            assert float((y - value).abs().max()) <= 0.05 * abs(value), (method, value)


@pytest.mark.parametrize("method", ["vidkv", "cskv"])
def test_fp16_limit_reconstructs_finitely(method):
    # +-65504 in every channel: an rFFT coefficient or a latent coordinate sums sqrt(n) of them, beyond
    # fp16; they saturate at 65504 (documented in the codecs) instead of turning into inf / NaN
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(1, 2, 200, 64, generator=g) > 0.5, 1.0, -1.0)
    x = 65504.0 * sign
    y = _round_trip(method, None, x)
    assert torch.isfinite(y).all()
    assert float(y.abs().max()) < 2**20  # bounded: sqrt(64) x 65504 at most, after the inverse transform


def test_partial_per_channel_group_cannot_be_extended():
    from kvq_core.formats import KVFormat

    s = StreamFormat(bits=2, axis="channel", group_size=32)
    layer = StreamingLayer(KVFormat("x", s, s), 16)
    layer.append(torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16))  # a partial group of 8 is fine...
    with pytest.raises(ValueError, match="re-quantize history"):
        layer.append(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16))  # ...extending it is not


def test_invalid_formats():
    with pytest.raises(ValueError, match="unsupported bit width 9"):
        StreamFormat(bits=9)
    with pytest.raises(ValueError, match="multiple of group_size"):
        StreamFormat(bits=2, axis="channel", group_size=32, residual_tokens=100, flush="block")
    with pytest.raises(ValueError, match="scale_dtype"):
        StreamFormat(bits=2, scale_dtype="fp4")
    with pytest.raises(ValueError, match="outlier fraction"):
        StreamFormat(bits=2, outliers=Outliers(0.7))


@pytest.mark.parametrize("method,bits", [("xquant", 4), ("xquant-cl", 4), ("minicache", 16)])
def test_streaming_layer_refuses_formats_it_cannot_hold(method, bits):
    from kvq_core.cache import StreamingLayer
    from kvq_core.formats import get_format

    with pytest.raises(ValueError, match="use KVQCache"):
        StreamingLayer(get_format(method, bits), 64)
