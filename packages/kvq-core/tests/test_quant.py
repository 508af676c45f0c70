"""Affine / codebook quantization: half-step round trips, exact zero-range groups, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq_core.quant import (
    _groups,
    choose_qparams,
    dequantize,
    nuq_dequantize,
    nuq_qparams,
    nuq_quantize,
    quantize,
    round_to_dtype,
)


def _group_view(t, axis, g):
    return _groups(t, axis, g)[0]


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from([1, 1.5, 2, 3, 4, 8]),
    axis=st.sampled_from(["token", "channel"]),
    group=st.sampled_from([None, 1, 5, 32]),
    tokens=st.integers(1, 40),
    dim=st.integers(1, 40),
    scale_dtype=st.sampled_from(["fp16", "bf16", "fp32", "fp8_e4m3"]),
    mag=st.sampled_from([1e-2, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_half_step(bits, axis, group, tokens, dim, scale_dtype, mag, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, dim, generator=g) * mag
    scale, zero = choose_qparams(x, bits, axis, group, scale_dtype=scale_dtype)
    codes = quantize(x, scale, zero, bits, axis, group)
    y = dequantize(codes, scale, zero, bits, axis, group)
    # Every element within half a step of its own group's stored scale (plus fp32 dequant rounding).
    s = scale.to(torch.float32)
    step = _group_view(x, axis, group)  # shape of the grouped view, to broadcast the scale
    s_b = (s if axis == "token" else s.transpose(-1, -2)).unsqueeze(-1).expand_as(step)
    n = x.shape[-1] if axis == "token" else x.shape[-2]
    s_full = s_b.reshape(*s_b.shape[:-2], -1)[..., :n]
    s_full = s_full if axis == "token" else s_full.transpose(-1, -2)
    err = (x - y).abs()
    tol = s_full / 2 + 1e-6 * x.abs().amax() + 1e-7
    assert (err <= tol).all(), float((err - tol).max())


def test_symmetric_round_trip():
    x = torch.randn(3, 17, 24)
    scale, zero = choose_qparams(x, 4, "token", 8, symmetric=True)
    assert zero is None
    y = dequantize(quantize(x, scale, None, 4, "token", 8), scale, None, 4, "token", 8)
    s = scale.float().repeat_interleave(8, -1)
    assert ((x - y).abs() <= s / 2 + 1e-6).all()


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_zero_range_groups_are_exact(axis):
    x = torch.full((1, 8, 16), 0.3125)
    x[0, :4] = -2.0
    scale, zero = choose_qparams(x, 2, axis, 4)
    y = dequantize(quantize(x, scale, zero, 2, axis, 4), scale, zero, 2, axis, 4)
    assert torch.equal(y, x)


def test_scale_dtype_rounding_is_outward():
    v = torch.tensor([0.1, -0.3, 1e-3, 5.0], dtype=torch.float64)
    for name in ["fp16", "bf16", "fp8_e4m3", "fp32"]:
        assert (round_to_dtype(v, name, "down").double() <= v).all()
        assert (round_to_dtype(v, name, "up").double() >= v).all()
    with pytest.raises(ValueError, match=r"value 10000 is beyond the fp8_e4m3 range \[-448, 448\]"):
        round_to_dtype(torch.tensor([1e4]), "fp8_e4m3", "up")
    with pytest.raises(ValueError, match=r"value -70000 is beyond the fp16 range \[-65504, 65504\]"):
        round_to_dtype(torch.tensor([-7e4]), "fp16", "down")
    # beyond the range on the side the rounding goes away from: the range's end is the correct answer
    assert round_to_dtype(torch.tensor([1e4]), "fp8_e4m3", "down").item() == 448
    assert round_to_dtype(torch.tensor([-7e4]), "fp16", "up").item() == -65504
    assert round_to_dtype(torch.tensor([0.0]), "e8m0", "up").item() == 2.0**-127


def test_nuq_round_trip_hits_levels():
    x = torch.randn(2, 9, 32)
    cb = torch.tensor([-1.0, -0.4, 0.1, 1.0])
    scale, zero = nuq_qparams(x, "token", None)
    codes = nuq_quantize(x, cb, scale, zero, "token", None)
    y = nuq_dequantize(codes, cb, scale, zero, "token", None)
    # Each element maps to its nearest level: error at most half the widest level gap times the scale.
    half_gap = float(cb.diff().max()) / 2  # 0.45
    assert ((x - y).abs() <= half_gap * scale.float() * 1.0001 + 1e-6).all()
    # Group extremes land on the end levels.
    assert (codes.amax(-1) == 3).all() and (codes.amin(-1) == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_rejected(bad):
    x = torch.randn(1, 4, 8)
    x[0, 1, 2] = bad
    with pytest.raises(ValueError, match="NaN|Inf"):
        choose_qparams(x, 2, "token", 4)


def test_bad_axis_and_group():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="axis"):
        choose_qparams(x, 2, "head", 4)
    with pytest.raises(ValueError, match="group_size"):
        choose_qparams(x, 2, "token", 0)
