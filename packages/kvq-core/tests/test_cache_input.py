"""Bad input to the streaming cache: one clear ValueError, nothing silently wrong."""

import pytest
import torch

from kvq_core.cache import StreamingLayer
from kvq_core.formats import StreamFormat, get_format


@pytest.fixture
def layer():
    return StreamingLayer(get_format("kivi", 2), 64)


def test_nan_and_inf_rejected(layer):
    k = torch.randn(1, 2, 4, 64)
    k[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.append(k, torch.randn(1, 2, 4, 64))
    v = torch.randn(1, 2, 4, 64)
    v[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.append(torch.randn(1, 2, 4, 64), v)


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


def test_zero_range_blocks_reconstruct_exactly():
    for method, bits in [("kivi", 2), ("int", 4), ("skvq", "k2v1.5")]:
        layer = StreamingLayer(get_format(method, bits), 64)
        k = torch.full((1, 2, 300, 64), 0.25)
        layer.append(k, k.clone())
        assert torch.equal(layer.keys(), k) and torch.equal(layer.values(), k), method


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
    with pytest.raises(ValueError, match="outlier_fraction"):
        StreamFormat(bits=2, outlier_fraction=0.7)


@pytest.mark.parametrize("method,bits", [("xquant", 4), ("xquant-cl", 4), ("minicache", 16)])
def test_streaming_layer_refuses_formats_it_cannot_hold(method, bits):
    from kvq_core.cache import StreamingLayer
    from kvq_core.formats import get_format

    with pytest.raises(ValueError, match="use KVQCache"):
        StreamingLayer(get_format(method, bits), 64)
