"""Block floating point with channel rearrangement, and staircase (age-based) precision."""

import pytest
import torch

from kvq_core.cache import StreamingLayer
from kvq_core.formats import get_format, staircase_format
from kvq_core.quant import round_to_dtype


def _x(outliers=(3, 20, 40, 60), t=256, seed=0):
    x = torch.randn(1, 4, t, 64, generator=torch.Generator().manual_seed(seed))
    x[..., list(outliers)] *= 8  # several fixed outlier channels per head, as real keys have
    return x


def test_bfp_scales_are_shared_powers_of_two():
    layer = StreamingLayer(get_format("bfp", 4), 64)
    x = _x()
    layer.append(x, x)
    scale = layer.k.body["scale"]
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (1, 4, 256, 2)  # one exponent per 32 channels
    s = scale.float()
    assert torch.equal(s, 2.0 ** torch.log2(s).round())
    assert "zero" not in layer.k.body  # sign-magnitude codes: no zero point
    v = torch.tensor([0.3, 1.0, 5.0], dtype=torch.float64)
    assert round_to_dtype(v, "e8m0", "up").float().tolist() == [0.5, 1.0, 8.0]


def test_bfp_rearrangement_gathers_outlier_channels():
    x = _x()
    fmt = get_format("bfp", 4)
    layer = StreamingLayer(fmt, 64)
    layer.append(x, x)
    pos = torch.argsort(layer.k.codec._perm.long(), dim=-1)  # new position of each channel, per head
    blocks = {int(pos[0, c]) // 32 for c in (3, 20, 40, 60)}
    assert len(blocks) == 1  # all four outliers share one block, the other block keeps a fine exponent
    plain = StreamingLayer(fmt.with_(key=fmt.value), 64)
    plain.append(x, x)
    normal = [c for c in range(64) if c not in (3, 20, 40, 60)]

    def err(lay):
        return float((lay.keys() - x)[..., normal].pow(2).mean())

    assert err(layer) < 0.8 * err(plain)  # measured 0.22 vs 0.31: the 28 channels sharing the outliers' block still pay


def test_staircase_older_tokens_have_fewer_bits():
    fmt = staircase_format(2, window=8, steps=((16, 8), (32, 4)))
    layer = StreamingLayer(fmt, 64)
    x = _x(outliers=(), t=120)
    start = 0
    for t in (60, 1, 1, 58):  # a prefill, two decode steps, then a block
        blk = x[:, :, start : start + t]
        layer.append(blk, blk)
        start += t
    assert [len(s) for s in layer.k.steps] == [16, 32, 120 - 8 - 48]
    err = (layer.keys() - x).pow(2).mean(dim=(0, 1, 3))  # per position, chronological
    assert err[-8:].max() < 1e-5  # fp16 window
    assert err[-24:-8].mean() < err[-56:-24].mean() < err[:-56].mean()  # 8 bits < 4 bits < 2 bits
    bd = fmt.breakdown(120, 4, 64)
    assert layer.nbytes == bd.per_sequence + bd.shared


@pytest.mark.parametrize("bits,expect", [(2, 2.52), (4, 4.36)])
def test_staircase_avg_bits_at_32k(bits, expect):
    assert get_format("staircase", bits).avg_bits(32768, 32, 128) == pytest.approx(expect, abs=0.01)
