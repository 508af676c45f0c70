"""VidKV: mixed 2-bit / 1-bit-FFT keys per channel, ternary absmean values; exact accounting."""

import pytest
import torch

from kvq_core.cache import StreamingLayer
from kvq_core.codecs_vidkv import absmean_dequantize, absmean_quantize, irfft_real, rfft_real
from kvq_core.formats import get_format
from kvq_core.packing import unpack


@pytest.mark.parametrize("n", [7, 8, 20, 64])
def test_real_fourier_basis_is_orthonormal(n):
    x = torch.randn(5, n, dtype=torch.float64)
    y = rfft_real(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(irfft_real(y), x)


def test_ternary_absmean_codes():
    x = torch.tensor([3.0, -3.0, 0.5, -0.5, 1.0, 0.0, 2.0, -2.0])[None, None, :, None]  # one group of 8 tokens
    codes, scale = absmean_quantize(x, 1.5, 8)
    assert float(scale) == 1.5  # mean |x|
    assert codes.flatten().tolist() == [2, 0, 1, 1, 2, 1, 2, 0]  # |x| > 0.75 -> +-1, else 0
    assert absmean_dequantize(codes, scale, 1.5, 8).flatten().tolist() == [1.5, -1.5, 0, 0, 1.5, 0, 1.5, -1.5]


def test_anomalous_channels_get_two_bits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 256, 64, generator=g)
    x[..., [5, 9]] *= 10
    layer = StreamingLayer(get_format("vidkv", "k1.5v1.5"), 64)
    layer.append(x, x)
    perm = layer.k.codec._perm
    assert perm.shape == (2, 64) and {5, 9} <= set(perm[0, :32].tolist())  # among the 32 anomalous channels
    err = (layer.keys() - x).pow(2).mean(dim=(0, 2))  # [H, D]
    assert err[:, [5, 9]].mean() / x[..., [5, 9]].pow(2).mean() < 0.2  # 2-bit asymmetric keeps the outliers
    vcodes = unpack(layer.v.body["codes"], 1.5, 64)
    assert set(vcodes.unique().tolist()) <= {0, 1, 2}


def test_vidkv_accounting_by_hand():
    # 32 heads x 128, 32K tokens, G=32, R=128 (block flush: no residual at 32768). Keys: 64 channels at
    # 2 bits + 64 coefficients at 1 bit = 24 bytes per head-token; per 32-token group 128 scales + 64 zeros
    # fp16. Values: ternary, ceil(128 / 5) = 26 bytes per head-token; 128 fp16 scales per group.
    t, h, d = 32768, 32, 128
    bd = get_format("vidkv", "k1.5v1.5").breakdown(t, h, d)
    groups = t // 32
    assert bd.codes == t * h * (24 + 26)
    assert bd.scales == groups * h * d * 2 * 2 and bd.zeros == groups * h * 64 * 2
    assert bd.shared == h * d * 2  # the anomalous-first channel order, int16
