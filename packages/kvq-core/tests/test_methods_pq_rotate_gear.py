"""MILLION (product quantization), RotateKV (reorder + Hadamard), GEAR (low-rank + sparse), CSKV (channel shrinking)."""

import pytest
import torch

from kvq_core.cache import StreamingLayer
from kvq_core.codecs_lowrank import power_iteration_lowrank
from kvq_core.codecs_pq import pq_scores
from kvq_core.codecs_rotate import fwht, rotation_block
from kvq_core.formats import StreamFormat, get_format
from kvq_core.packing import unpack


def _kv(h=4, t=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, h, t, d, generator=g)
    x[..., 3] *= 8  # a fixed outlier channel, as real keys have (docs/references.md §7)
    return x


def _rel_err(layer, x):
    return float((layer.keys() - x).pow(2).mean() / x.pow(2).mean())


def test_million_accounting_by_hand():
    # D=128, M=64 subspaces of 2 channels, 8-bit codes: 64 bytes per head-token = 4 bits/element;
    # fp16 codebook [64, 256, 2] per stream per layer; the 128-token window is empty at 32K (block flush).
    fmt, t, h, d = get_format("million", 4), 32768, 32, 128
    bd = fmt.breakdown(t, h, d)
    assert bd.codes == 2 * t * h * 64 and bd.residual == 0
    assert bd.shared == 2 * 64 * 256 * 2 * 2
    assert get_format("million", 2).breakdown(t, h, d).codes == 2 * t * h * 32  # M = 32


def test_million_lut_scores_equal_decoded_dot_products():
    layer = StreamingLayer(get_format("million", 4), 64)
    x = _kv(h=2, t=300)
    layer.append(x, x)
    c = layer.k.codec
    codes = unpack(layer.k.body["codes"], 8, 32)  # [B, H, Tq, M]
    q = torch.randn(1, 2, 3, 64)
    expect = q @ layer.k._deq.transpose(-1, -2)
    torch.testing.assert_close(pq_scores(q, codes, c._codebook), expect, atol=1e-4, rtol=1e-4)


def test_million_more_subspace_bits_less_error():
    x = _kv(h=2, t=256)
    errs = {}
    for b in (2, 4):
        layer = StreamingLayer(get_format("million", b), 64)
        layer.append(x, x)
        errs[b] = _rel_err(layer, x)
    assert errs[4] < errs[2] < 0.2


def test_million_rejects_bad_shapes():
    with pytest.raises(ValueError, match="product quantization needs"):
        StreamFormat(bits=4, levels="product")
    with pytest.raises(ValueError, match="not a multiple of pq subspace_dims"):
        get_format("million", 2).key.pq_subspaces(30)


def test_fwht_is_orthonormal_and_self_inverse():
    x = torch.randn(5, 192, dtype=torch.float64)
    n = rotation_block(192)
    assert n == 64
    y = fwht(x, n)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(fwht(y, n), x)
    h = fwht(torch.eye(4, dtype=torch.float64), 4) * 2  # Sylvester H_4
    assert torch.equal(h, torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1.0]]))


def test_rotatekv_beats_plain_per_token_on_outlier_channels():
    x = _kv()
    rot = StreamingLayer(get_format("rotatekv", 2), 64)
    plain = StreamingLayer(get_format("int", 2), 64)
    rot.append(x, x)
    plain.append(x, x)
    assert _rel_err(rot, x) < 0.5 * _rel_err(plain, x)  # measured: 0.16 vs 0.58
    perm = rot.k.codec._perm
    assert perm.dtype == torch.int16 and sorted(perm.tolist()) == list(range(4 * 64))


def test_rotatekv_round_robin_spreads_outliers_over_blocks():
    x = _kv(h=3)  # 3 x 64 = 192 channels -> blocks of 64: the 3 outlier channels go to 3 different blocks
    layer = StreamingLayer(get_format("rotatekv", 2), 64)
    layer.k.codec.calibrate(x)
    pos = torch.argsort(layer.k.codec._perm.long())  # new position of each original channel
    outlier_blocks = {int(pos[h * 64 + 3]) // 64 for h in range(3)}
    assert outlier_blocks == {0, 1, 2}


def test_power_iteration_recovers_low_rank():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(2, 64, 3, generator=g, dtype=torch.float64) @ torch.randn(
        2, 3, 32, generator=g, dtype=torch.float64
    )
    a, b = power_iteration_lowrank(e, 3, iters=5)
    torch.testing.assert_close(a @ b.transpose(-1, -2), e)


def test_gear_lowrank_and_outliers_reduce_error():
    x = _kv()
    errs = {}
    gear = get_format("gear", 2)
    quant_only = StreamFormat(bits=2, axis="channel", group_size=64, residual_tokens=64, flush="block")
    for name, fmt in {"quantized part only": gear.with_(key=quant_only), "gear": gear}.items():
        layer = StreamingLayer(fmt, 64)
        layer.append(x, x)
        errs[name] = _rel_err(layer, x)
    assert errs["gear"] < 0.7 * errs["quantized part only"]
    layer = StreamingLayer(get_format("gear", 2), 64)
    layer.append(x[:, :, :100], x[:, :, :100])
    assert layer.k.quantized_tokens == 64 and layer.k.body["lowrank_b"].shape == (1, 4, 1, 64 * 2)


def test_cskv_recovers_low_rank_kv_and_counts_latents():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g)  # K = X W_k: H*D = 4 x 64 = 256 channels of rank 32
    x = (torch.randn(1, 300, 32, generator=g) @ w).reshape(1, 300, 4, 64).permute(0, 2, 1, 3)
    fmt = get_format("cskv", 4)  # r = 256 / 4 = 64 >= 32: exact up to fp16
    layer = StreamingLayer(fmt, 64)
    layer.append(x, x)
    assert layer.k.body["latent"].shape == (1, 1, 300 - 128, 64)
    assert _rel_err(layer, x) < 1e-5
    bd = fmt.breakdown(32768, 32, 128)
    assert bd.codes == 2 * (32768 - 128) * 1024 * 2 and bd.shared == 2 * 4096 * 1024 * 2
