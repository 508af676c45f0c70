"""The method registry: each `Method` entry's format names a codec and a cache layer that exist, its
declared calibration is the state its layers fit, and its declared kernel is the one that runs it."""

import pytest
import torch

from kvq_core.cache import STREAMS, StreamingLayer
from kvq_core.codecs import CODECS, make_codec
from kvq_core.formats import (
    METHODS,
    AgeSteps,
    KVFormat,
    LowRank,
    Method,
    ProductQuant,
    Rotation,
    StreamFormat,
    TokenTiers,
    get_format,
)

ALL = [(m, b) for m, spec in METHODS.items() for b in spec.bits]
#: layers held per model, not per layer (hf_cache.MODEL_LAYERS)
MODEL_WIDE = ("xquant", "minicache")


@pytest.mark.parametrize("method,bits", ALL)
def test_every_format_names_a_codec_and_a_layer_that_exist(method, bits):
    fmt = get_format(method, bits)
    assert fmt.layer in (*STREAMS, "tiered", *MODEL_WIDE)
    for s in (fmt.key, fmt.value):
        if s.quantized:
            assert type(make_codec(s, 64)) is CODECS[s.codec]


def test_codec_and_layout_follow_from_the_option_groups():
    assert StreamFormat(bits=2).codec == "affine"
    assert StreamFormat(bits=3, levels="nonuniform").codec == "nuq"
    assert StreamFormat(bits=2, levels="product", pq=ProductQuant(4)).codec == "pq"
    assert StreamFormat(bits=2, reorder_channels=True, rotation=Rotation()).codec == "rotate"
    with pytest.raises(ValueError, match="needs reorder_channels"):
        StreamFormat(bits=2, rotation=Rotation())
    assert StreamFormat(bits=2, residual_tokens=64, flush="block", lowrank=LowRank(2)).codec == "gear"
    assert StreamFormat(bits=2, steps=AgeSteps(((8, 4),))).layout == "staircase"
    with pytest.raises(ValueError, match="need different codecs"):
        StreamFormat(
            bits=2, reorder_channels=True, rotation=Rotation(), residual_tokens=64, flush="block", lowrank=LowRank(2)
        )
    with pytest.raises(ValueError, match="need different codecs"):
        StreamFormat(bits=3, levels="nonuniform", reorder_channels=True, rotation=Rotation())
    plain, tiered = StreamFormat(bits=2), StreamFormat(bits=2, tiers=TokenTiers("accumulated", fraction=0.5))
    with pytest.raises(ValueError, match="same tokens"):
        KVFormat("mixed", tiered, plain)


def test_a_new_entry_needs_no_other_change():
    """An entry built from existing option groups is stored, counted and listed without touching anything else."""
    m = Method(
        "kivi-rotated",
        "example",
        "KIVI values with rotated per-token keys",
        ((2, 2),),
        (2, 2),
        lambda k, v: KVFormat(
            "kivi-rotated",
            StreamFormat(bits=k, reorder_channels=True, rotation=Rotation()),
            StreamFormat(bits=v, group_size=32),
        ),
    )
    fmt = m.format()
    assert m.codecs == ("rotate", "affine") and m.layer == "streaming"
    layer = StreamingLayer(fmt, 16)
    x = torch.randn(2, 4, 37, 16, generator=torch.Generator().manual_seed(0))
    layer.append(x, x)
    assert layer.nbytes == 2 * fmt.breakdown(37, 4, 16).per_sequence + fmt.breakdown(37, 4, 16).shared
    with pytest.raises(ValueError, match="no 3-bit variant; valid bits: 2"):
        m.format(3)


def _fitted_streams(layer: StreamingLayer) -> set[str]:
    """Which streams hold per-layer state fitted by `calibrate` (a channel order, codebook, basis, normaliser)."""
    if layer.tiers is not None:
        return {n for n, s in (("keys", layer.tiers.k), ("values", layer.tiers.v)) if s.norm is not None}
    return {n for n, s in (("keys", layer.k), ("values", layer.v)) if s.codec is not None and s.codec.shared()}


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].layer not in MODEL_WIDE])
def test_declared_calibration_is_what_the_layer_fits(method):
    spec = METHODS[method]
    layer = StreamingLayer(spec.format(), 64)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 64, 64, generator=g), torch.randn(1, 2, 64, 64, generator=g)
    layer.calibrate(k, v)
    want = {"none": set(), "keys": {"keys"}, "values": {"values"}, "both": {"keys", "values"}}[spec.calibration.streams]
    assert _fitted_streams(layer) == want
    assert bool(spec.calibration.data) == (spec.calibration.streams != "none")


@pytest.mark.parametrize("method,bits", ALL)
def test_declared_kernel_is_the_one_that_runs_the_format(method, bits):
    hf_attention = pytest.importorskip("kvq_kernels.hf_attention")
    runs = hf_attention.kivi_params(get_format(method, bits)) is not None
    assert runs == (METHODS[method].kernel == "kivi")
