"""KVQuant as published (arXiv:2401.18079): per-channel-threshold key outliers, calibration that excludes them and
the attention-sink token, compact outlier metadata counted exactly."""

import pytest
import torch

from kvq_core.cache import StreamingLayer
from kvq_core.codecs_nuq import NuqCodec
from kvq_core.formats import Outliers, get_format, kvquant_format
from kvq_core.formats.accounting import stream_bytes

H, D, N = 3, 64, 1000  # SmolLM2's K/V shape per layer: a token has H * D = 192 channels


def calibrated_key_codec(bits: int = 3) -> NuqCodec:
    """A key codec calibrated on channels that each hold 1000 evenly spread values in [-1, 1]."""
    codec = NuqCodec(kvquant_format(bits).key, D)
    x = torch.linspace(-1, 1, N)[None, None, :, None].expand(1, H, N, D).contiguous()  # [1, H, N, D]
    codec.calibrate(x)
    return codec


def test_key_outliers_are_every_element_beyond_its_channels_thresholds():
    codec = calibrated_key_codec()
    # the 0.5 / 99.5 percentiles of an even spread over [-1, 1] are +-0.99: the range covers them
    assert torch.allclose(codec._zero.float(), torch.zeros(H, D), atol=1e-3)
    x = torch.zeros(1, H, 4, D)  # 4 tokens
    planted = {(0, 0, 1): 5.0, (0, 2, 7): -6.0, (0, 1, 63): 3.5, (2, 1, 0): 2.0}  # (token, head, channel)
    for (t, h, c), value in planted.items():
        x[0, h, t, c] = value
    parts = codec.encode(x)
    assert parts["outlier_counts"].tolist() == [[3, 0, 1, 0]]  # per token, as many as it holds (not k = 2)
    # flat indices h * D + d in token order, 8 bits address 192 channels; fp16 values exactly as planted
    assert parts["sparse_indices"].dtype == torch.uint8 and parts["outlier_counts"].dtype == torch.uint8
    assert parts["sparse_indices"].tolist() == [1, 63 + 64, 7 + 128, 64]
    assert parts["sparse_values"].tolist() == [5.0, 3.5, -6.0, 2.0]
    y = codec.decode(parts, 4)
    for (t, h, c), value in planted.items():
        assert y[0, h, t, c] == value
    assert "outlier_pointers" not in parts


def test_topk_outliers_stay_for_values_and_gear():
    val = kvquant_format(3).value.outliers
    assert val.thresholds == "topk" and val.row_bytes(100, 192) == 0  # k per token: no pointers
    gear = get_format("gear", 2).key.outliers
    assert (gear.index_bits, gear.pointer_bits) == (16, 32)  # GEAR's layout as before


@pytest.mark.parametrize(
    "elements,index_bits,count_bytes",
    [(192, 8, 1), (256, 8, 2), (1024, 16, 2), (4096, 16, 2)],
    ids=["smollm2", "256-channels", "llama-8-heads", "llama-7b"],
)
def test_compact_metadata_widths(elements, index_bits, count_bytes):
    out = Outliers(0.01, index_bits=None, pointer_bits=None, thresholds="channel")
    assert out.index_bits_for(elements) == index_bits
    assert out.row_bytes(10, elements) == 10 * count_bytes


def test_codebook_fit_excludes_the_outliers():
    """Elements beyond the thresholds are not fitted: planting huge outliers in the calibration data leaves the
    codebook of the dense part as it was (the percentiles move by at most the planted share)."""
    codec = calibrated_key_codec()
    x = torch.linspace(-1, 1, N)[None, None, :, None].expand(1, H, N, D).contiguous()
    spiked = x.clone()
    spiked[0, :, ::200, :] *= 1000  # 5 of 1000 tokens per channel (0.5%), beyond any threshold
    other = NuqCodec(kvquant_format(3).key, D)
    other.calibrate(spiked)
    assert torch.allclose(other._codebook.float(), codec._codebook.float(), atol=0.02)
    assert other._codebook.abs().max() <= 1


def test_calibration_excludes_the_first_token_of_each_sequence(tiny, monkeypatch):
    from kvq_core import calibration

    seen = []
    real = StreamingLayer.calibrate

    def record(self, k, v, kw=None, vw=None):
        seen.append(v.clone())
        return real(self, k, v, kw, vw)

    monkeypatch.setattr(calibration.StreamingLayer, "calibrate", record)
    ids = torch.randint(1, 90, (2, 17))
    calibration.calibrate(tiny, ids, "kvquant", 2, fisher=False)
    v0 = calibration.record_kv(tiny, ids, fisher=False)[0][1]  # layer 0 V: [2, H, 17, D]
    assert torch.equal(seen[0], torch.cat([v0[0:1, :, 1:], v0[1:2, :, 1:]], 2))  # rows end to end, sinks out
    with pytest.raises(ValueError, match="skip_first"):
        calibration.calibrate(tiny, ids[:, :1], "kvquant", 2, fisher=False)


@pytest.mark.parametrize("window", [0, 96, 128], ids=["kvquant", "kvquant-w96", "kvquant-w128"])
def test_bytes_the_format_says_are_the_bytes_the_tensors_hold(window):
    fmt = kvquant_format(3, window=window)
    layer = StreamingLayer(fmt, D)
    g = torch.Generator().manual_seed(0)
    layer.calibrate(torch.randn(1, H, 512, D, generator=g), torch.randn(1, H, 512, D, generator=g))
    total = 0
    for t in (300, 1, 1, 77):
        k = torch.randn(1, H, t, D, generator=g) * 1.3  # wider than calibration: more than 1% beyond thresholds
        layer.append(k, torch.randn(1, H, t, D, generator=g))
        total += t
        held = layer.k.body["sparse_values"].numel()
        key = stream_bytes(fmt.key, total, H, D, fmt.sink_tokens, outliers_held=held)
        value = stream_bytes(fmt.value, total, H, D, fmt.sink_tokens)
        assert layer.nbytes == key.total + value.total
        assert held != layer.k.quantized_tokens * fmt.key.outliers_per_token(H, D)  # the count follows the data
    assert layer.v.residual.shape[2] == min(window, total - 1)


@pytest.mark.parametrize("bits,bound", [(2, 2.75), (3, 3.75), (4, 4.75)])
def test_the_96_token_window_keeps_each_width_in_its_class_at_4k_tokens_and_128_does_not_for_all(bits, bound):
    """kvquant-w96's window is the largest multiple of 32 whose fp16 share keeps nuq2/3/4 under the ~2/~3/~4-bit
    class bounds of the 4K-token quality protocol (3968 to 4096 tokens held while scoring), expected 1% outliers."""

    def bits_per_element(window: int, tokens: int) -> float:
        fmt = kvquant_format(bits, window=window)
        k = stream_bytes(fmt.key, tokens, H, D, fmt.sink_tokens)
        v = stream_bytes(fmt.value, tokens, H, D, fmt.sink_tokens)
        return (k.total + v.total) * 8 / (2 * tokens * H * D)

    assert get_format("kvquant-w96", bits) == kvquant_format(bits, window=96)
    assert all(bits_per_element(96, t) < bound - 0.05 for t in (3968, 4096))  # 0.05: the data's outliers above 1%
    w128 = bits_per_element(128, 3968)
    assert (w128 > bound) == (bits != 4), w128
