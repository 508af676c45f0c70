"""Bad inputs to the kvq_core API (quant, formats, StreamingLayer and the other streams, reference
attention): each raises one clear ValueError line naming the problem, and a rejected
append or calibration leaves the cache it was given as it was. In-process, tiny tensors.

The reported examples are named `reported-*`: `choose_qparams(x, -1)` and `bytes(5.5, ...)` were accepted;
a finite 1e5 became inf in the fp16 window with no error (int-4 then called it "Inf"). The reported
cases that must now work are at the end: bfp on an all-zero block, +-65504 in VidKV and CSKV, VidKV's
bytes after calibration (and, for every method, test_cache_input.py and test_formats_bytes.py).
"""

from types import SimpleNamespace

import pytest
import torch

from kvq_core import StreamingLayer, get_format
from kvq_core.attention import apply_rope, attention_reference, kv_head_of, rope_cos_sin
from kvq_core.cache import QuantizedStream
from kvq_core.cache_minicache import MergedPair
from kvq_core.codecs_vidkv import VidkvCodec
from kvq_core.formats import KVFormat, StreamFormat, million_format, packed_row_bytes, parse_bits, vidkv_format
from kvq_core.quant import (
    choose_qparams,
    dequantize,
    nuq_dequantize,
    nuq_quantize,
    quantize,
    round_to_dtype,
    storage_dtype,
)

D = 16  # head_dim of the shared layer


def make_inputs() -> SimpleNamespace:
    """A data block x [1, 2, 8, 16] with its 4-bit grid, and a kivi-2 layer already holding 4 tokens."""
    g = torch.Generator().manual_seed(0)
    x = SimpleNamespace()
    x.x = torch.randn(1, 2, 8, D, generator=g)
    x.scale, x.zero = choose_qparams(x.x, 4, "token", 8)
    x.codes = quantize(x.x, x.scale, x.zero, 4, "token", 8)
    x.k = torch.randn(1, 2, 4, D, generator=g)
    x.layer = StreamingLayer.for_method("kivi", 2, head_dim=D)
    x.layer.append(x.k, x.k.clone())
    return x


def kivi(x):
    return get_format("kivi", 2)


def at(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = value
    return t


def filled(value: float, shape=(1, 2, 4, D)) -> torch.Tensor:
    return torch.full(shape, value)


def append_to(method, bits, k, v=None, **kw):
    layer = StreamingLayer.for_method(method, bits, head_dim=k.shape[-1])
    layer.append(k, k.clone() if v is None else v, **kw)


def signs(value: float, shape=(1, 2, 8, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return value * torch.where(torch.rand(shape, generator=g) > 0.5, 1.0, -1.0)


def merge_pair(k: torch.Tensor):
    pair = MergedPair(get_format("minicache"), (0, 1))
    pair.pending = (k, k.clone())
    pair.merge(k.clone(), k.clone())


def vidkv_value_codec_loads(x):
    codec = VidkvCodec(vidkv_format().value, D)
    codec.load_state_dict({"reorder": torch.arange(D).flip(0)[None].repeat(2, 1).to(torch.int16)})


# (id, call, message regex); every case raises ValueError
CASES = [
    # quant: choose_qparams / quantize / dequantize / nuq / rounding
    ("reported-choose-qparams-bits-minus-1", lambda x: choose_qparams(x.x, -1), r"^unsupported bit width -1; valid: 1, 1\.5, 2"),
    ("choose-qparams-bits-0", lambda x: choose_qparams(x.x, 0), r"unsupported bit width 0;"),
    ("choose-qparams-bits-9", lambda x: choose_qparams(x.x, 9), r"unsupported bit width 9;"),
    ("choose-qparams-bits-2.5", lambda x: choose_qparams(x.x, 2.5), r"unsupported bit width 2\.5;"),
    ("choose-qparams-bits-true", lambda x: choose_qparams(x.x, True), r"unsupported bit width True;"),
    ("choose-qparams-bits-text", lambda x: choose_qparams(x.x, "4"), r"unsupported bit width '4';"),
    ("choose-qparams-group-0", lambda x: choose_qparams(x.x, 4, "token", 0), r"group_size must be an integer >= 1 or None, got 0"),
    ("choose-qparams-group-float", lambda x: choose_qparams(x.x, 4, "token", 4.5), r"group_size must be an integer >= 1 or None, got 4\.5"),
    ("choose-qparams-group-negative", lambda x: choose_qparams(x.x, 4, "channel", -4), r"group_size must be an integer >= 1 or None, got -4"),
    ("choose-qparams-axis", lambda x: choose_qparams(x.x, 4, "row"), r"axis must be 'token' or 'channel', got 'row'"),
    ("choose-qparams-int-tensor", lambda x: choose_qparams(x.codes, 4), r"x must be floating point, got torch\.uint8"),
    ("choose-qparams-1d", lambda x: choose_qparams(x.x.flatten(), 4), r"x must have at least 2 dims \[\.\.\., tokens, channels\], got shape \(256,\)"),
    ("choose-qparams-list", lambda x: choose_qparams([[1.0, 2.0]], 4), r"x must be a torch\.Tensor, got list"),
    ("choose-qparams-nan", lambda x: choose_qparams(at(x.x, float("nan")), 4), r"input contains 1 NaN and 0 Inf values"),
    ("choose-qparams-scale-dtype", lambda x: choose_qparams(x.x, 4, scale_dtype="fp64"), r"unknown scale dtype 'fp64'; valid: fp32, fp16"),
    ("choose-qparams-clip-0", lambda x: choose_qparams(x.x, 4, clip_ratio=0), r"clip_ratio must be in \(0, 1\], got 0"),
    ("choose-qparams-clip-1.5", lambda x: choose_qparams(x.x, 4, clip_ratio=1.5), r"clip_ratio must be in \(0, 1\], got 1\.5"),
    ("choose-qparams-symmetric-text", lambda x: choose_qparams(x.x, 4, symmetric="yes"), r"symmetric must be True or False, got 'yes'"),
    ("choose-qparams-symmetric-1-bit", lambda x: choose_qparams(x.x, 1, symmetric=True), r"symmetric quantization needs at least 3 levels, 1-bit has 2"),
    ("choose-qparams-beyond-fp8-scales", lambda x: choose_qparams(filled(-1000.0), 2, scale_dtype="fp8_e4m3"),
     r"zero point \(group minimum\) -1000 is beyond the fp8_e4m3 range \[-448, 448\]"),  # fmt: skip
    ("quantize-scale-shape", lambda x: quantize(x.x, x.scale.repeat(1, 1, 1, 2), x.zero, 4, "token", 8),
     r"scale has shape \(1, 2, 8, 4\); data \(1, 2, 8, 16\) on the token axis needs \(1, 2, 8, 2\)"),  # fmt: skip
    ("quantize-grid-of-other-axis", lambda x: quantize(x.x, x.scale, x.zero, 4, "channel", 8), r"scale has shape \(1, 2, 8, 2\); .* channel axis needs \(1, 2, 1, 16\)"),
    ("quantize-zero-not-tensor", lambda x: quantize(x.x, x.scale, 0.0, 4, "token", 8), r"zero must be a torch\.Tensor, got float"),
    ("quantize-bits-10", lambda x: quantize(x.x, x.scale, x.zero, 10, "token", 8), r"unsupported bit width 10;"),
    ("quantize-inf", lambda x: quantize(at(x.x, float("inf")), x.scale, x.zero, 4, "token", 8), r"input contains 0 NaN and 1 Inf values"),
    ("dequantize-float-codes", lambda x: dequantize(x.codes.float(), x.scale, x.zero, 4, "token", 8), r"codes must be an integer tensor \(uint8 from quantize\), got torch\.float32"),
    ("dequantize-codes-out-of-range", lambda x: dequantize(x.codes, x.scale, x.zero, 2, "token", 8), r"codes must be in 0\.\.3, got values in 0\.\.15"),
    ("dequantize-group-0", lambda x: dequantize(x.codes, x.scale, x.zero, 4, "token", 0), r"group_size must be an integer >= 1 or None, got 0"),
    ("round-to-dtype-direction", lambda x: round_to_dtype(x.x, "fp16", "nearest"), r"direction must be 'down' or 'up', got 'nearest'"),
    ("round-to-dtype-beyond-fp16", lambda x: round_to_dtype(torch.tensor([7e4]), "fp16", "up"), r"value 70000 is beyond the fp16 range \[-65504, 65504\]"),
    ("round-to-dtype-beyond-fp32", lambda x: round_to_dtype(torch.tensor([1e300], dtype=torch.float64), "fp32", "up"), r"value 1e\+300 is beyond the fp32 range"),
    ("storage-dtype-unknown", lambda x: storage_dtype("int8"), r"unknown scale dtype 'int8'; valid:"),
    ("nuq-quantize-codebook-2d", lambda x: nuq_quantize(x.x, torch.zeros(2, 4), x.scale, x.zero, "token", 8), r"codebook must be a 1-D tensor"),
    ("nuq-dequantize-codes-beyond-codebook", lambda x: nuq_dequantize(x.codes, torch.linspace(-1, 1, 4), x.scale, x.zero, "token", 8),
     r"codes must be in 0\.\.3, got values in 0\.\.15"),  # fmt: skip
    # formats: byte counts and descriptions
    ("reported-bytes-5.5-tokens", lambda x: kivi(x).bytes(5.5, 8, 128), r"^tokens must be an integer >= 0, got 5\.5$"),
    ("bytes-negative-tokens", lambda x: kivi(x).bytes(-1, 8, 128), r"tokens must be an integer >= 0, got -1"),
    ("bytes-zero-kv-heads", lambda x: kivi(x).bytes(128, 0, 128), r"kv_heads must be an integer >= 1, got 0"),
    ("bytes-float-head-dim", lambda x: kivi(x).bytes(128, 8, 64.0), r"head_dim must be an integer >= 1, got 64\.0"),
    ("bytes-bool-tokens", lambda x: kivi(x).bytes(True, 8, 128), r"tokens must be an integer >= 0, got True"),
    ("bytes-text-tokens", lambda x: kivi(x).bytes("128", 8, 128), r"tokens must be an integer >= 0, got '128'"),
    ("breakdown-inf-tokens", lambda x: kivi(x).breakdown(float("inf"), 8, 128), r"tokens must be an integer >= 0, got inf"),
    ("avg-bits-zero-tokens", lambda x: kivi(x).avg_bits(0, 8, 128), r"tokens must be an integer >= 1, got 0"),
    ("xquant-bytes-hidden-0", lambda x: get_format("xquant", 4).bytes(128, 8, 128, hidden_size=0), r"hidden_size must be an integer >= 1, got 0"),
    ("model-bytes-zero-layers", lambda x: kivi(x).model_bytes(128, 8, 128, 0), r"num_layers must be an integer >= 1, got 0"),
    ("minicache-retained-negative", lambda x: get_format("minicache").pair_breakdown(10, 2, 64, -1, 0), r"retained tokens must be in \[0, 10\], got -1"),
    ("remat-flops-float-heads", lambda x: get_format("xquant", 4).remat_flops_per_token(2.5, 64), r"kv_heads must be an integer >= 1, got 2\.5"),
    ("packed-row-bytes-float-n", lambda x: packed_row_bytes(2, 3.5), r"row length must be an integer >= 0, got 3\.5"),
    ("packed-row-bytes-bits-9", lambda x: packed_row_bytes(9, 16), r"unsupported bit width 9; valid:"),
    ("get-format-unknown", lambda x: get_format("kiwi", 2), r"unknown method 'kiwi'; valid: fp16, int, "),
    ("get-format-method-list", lambda x: get_format(["kivi"], 2), r"unknown method \['kivi'\]; valid:"),
    ("get-format-no-variant", lambda x: get_format("kivi", 5), r"method 'kivi' has no 5-bit variant; valid bits: 2, 3, 4, 8"),
    ("get-format-bits-nan", lambda x: get_format("kivi", float("nan")), r"cannot read bits nan: use a number"),
    ("get-format-bits-three-tuple", lambda x: get_format("skvq", (2, 2, 2)), r"cannot read bits \(2, 2, 2\): a tuple must be \(key_bits, value_bits\)"),
    ("get-format-bits-bool", lambda x: get_format("kivi", True), r"cannot read bits True"),
    ("parse-bits-text", lambda x: parse_bits("two"), r"cannot read bits 'two': use a number \(e\.g\. 2\) or 'k<bits>v<bits>'"),
    ("stream-format-group-float", lambda x: StreamFormat(bits=2, group_size=5.5), r"group_size must be an integer >= 1, got 5\.5"),
    ("stream-format-residual-negative", lambda x: StreamFormat(bits=2, residual_tokens=-1), r"residual_tokens must be an integer >= 0, got -1"),
    ("stream-format-bits-text", lambda x: StreamFormat(bits="2"), r"bits must be a finite number, got '2'"),
    ("stream-format-clip-0", lambda x: StreamFormat(bits=2, clip_ratio=0.0), r"clip_ratio must be in \(0, 1\], got 0\.0"),
    ("kv-format-sinks-negative", lambda x: KVFormat("x", StreamFormat(), StreamFormat(), sink_tokens=-1), r"sink_tokens must be an integer >= 0, got -1"),
    ("kv-format-streams-not-formats", lambda x: KVFormat("x", "kivi", "kivi"), r"key and value must be StreamFormat descriptions"),
    ("million-3-bits", lambda x: million_format(3), r"MILLION uses 8-bit codes over 8 / bits channels: bits must divide 8, got 3"),
    ("vidkv-key-bits-2.5", lambda x: vidkv_format(2.5), r"VidKV key bits are 1\.x"),
    # StreamingLayer and the other streams
    ("layer-head-dim-0", lambda x: StreamingLayer.for_method("kivi", 2, head_dim=0), r"head_dim must be an integer >= 1, got 0"),
    ("layer-head-dim-float", lambda x: StreamingLayer.for_method("kivi", 2, head_dim=64.5), r"head_dim must be an integer >= 1, got 64\.5"),
    ("layer-unknown-method", lambda x: StreamingLayer.for_method("kivii", 2), r"unknown method 'kivii'; valid:"),
    ("layer-of-a-name", lambda x: StreamingLayer("kivi", 64), r"fmt must be a KVFormat \(e\.g\. get_format\('kivi', 2\)\), got str"),
    ("layer-of-xquant", lambda x: StreamingLayer.for_method("xquant", 4), r"a StreamingLayer holds one layer's K and V; .* use KVQCache"),
    ("stream-sinks-negative", lambda x: QuantizedStream(StreamFormat(), D, sink_tokens=-1), r"sink_tokens must be an integer >= 0, got -1"),
    ("reported-append-1e5-fp16-window", lambda x: append_to("fp16", None, at(x.k, 1e5)),
     r"^K holds a value of magnitude 100000, beyond 65504, the fp16 range of the cache's full-precision tokens"),  # fmt: skip
    ("reported-append-1e5-int4-not-inf", lambda x: append_to("int", 4, x.k, at(x.k, -1e5)), r"^V holds a value of magnitude 100000, beyond 65504"),
    ("append-1e5-h2o", lambda x: append_to("h2o", None, at(x.k, 1e5)), r"^K holds a value of magnitude 100000, beyond 65504"),
    ("append-1e5-staircase", lambda x: append_to("staircase", 2, at(x.k, 1e5)), r"^K holds a value of magnitude 100000, beyond 65504"),
    ("append-nan-key", lambda x: x.layer.append(at(x.k, float("nan")), x.k), r"^K contains 1 NaN and 0 Inf values"),
    ("append-inf-value", lambda x: x.layer.append(x.k, at(x.k, float("-inf"))), r"^V contains 0 NaN and 1 Inf values"),
    ("append-int-key", lambda x: x.layer.append(x.k.int(), x.k), r"K must be floating point, got torch\.int32"),
    ("append-3d", lambda x: x.layer.append(x.k[0], x.k[0]), r"K must be \[batch, kv_heads, tokens, head_dim\], got shape \(2, 4, 16\)"),
    ("append-head-dim", lambda x: x.layer.append(x.k[..., :8], x.k[..., :8]), r"head_dim mismatch: the layer has 16, K has 8"),
    ("append-kv-shapes-differ", lambda x: x.layer.append(x.k, x.k[:, :, :2]), r"K and V blocks must have the same shape"),
    ("append-heads-change", lambda x: x.layer.append(x.k[:, :1], x.k[:, :1]), r"batch/heads mismatch: cache holds \(1, 2\), block has \(1, 1\)"),
    ("append-list", lambda x: x.layer.append(x.k.tolist(), x.k), r"K must be a torch\.Tensor \[batch, kv_heads, tokens, head_dim\], got list"),
    ("append-queries-tokens", lambda x: x.layer.append(x.k, x.k, x.k[:, :, :2]), r"queries \(1, 2, 2, 16\) must have K's batch and tokens"),
    ("append-queries-gqa", lambda x: append_to("mikv", 2, x.k, queries=torch.randn(1, 3, 4, D)), r"H_q a multiple of 2 KV heads, got \(1, 3, 4, 16\)"),
    ("calibrate-nan", lambda x: x.layer.calibrate(at(x.k, float("nan")), x.k), r"^calibration K contains 1 NaN and 0 Inf values"),
    ("calibrate-head-dim", lambda x: x.layer.calibrate(x.k, x.k[..., :8]), r"head_dim mismatch: the layer has 16, calibration V has 8"),
    ("calibrate-no-tokens", lambda x: x.layer.calibrate(x.k[:, :, :0], x.k), r"calibration K holds no tokens"),
    ("calibrate-weights-shape", lambda x: x.layer.calibrate(x.k, x.k, torch.ones(3, 1)), r"calibration K weights must be a tensor broadcastable to \(1, 2, 4, 16\)"),
    ("keys-int-dtype", lambda x: x.layer.keys(torch.int8), r"dtype must be a floating-point torch\.dtype, got torch\.int8"),
    ("rotatekv-fp16-limit-after-rotation", lambda x: append_to("rotatekv", 2, signs(65504.0)), r"zero point \(group minimum\) -\d+ is beyond the fp16 range \[-65504, 65504\]"),
    ("skvq-beyond-fp8-metadata", lambda x: append_to("skvq", 4, signs(500.0, (1, 2, 200, 64))), r"is beyond the fp8_e4m3 range \[-448, 448\]"),
    ("minicache-norm-beyond-fp16", lambda x: merge_pair(filled(60000.0, (1, 2, 4, 64))), r"MiniCache stores token norms in fp16: .* norm 480000, beyond 65504"),
    # reference attention and RoPE
    ("rope-odd-head-dim", lambda x: rope_cos_sin(torch.arange(4), 5, 1e4), r"RoPE needs an even integer head_dim >= 2, got 5"),
    ("rope-theta-0", lambda x: rope_cos_sin(torch.arange(4), 16, 0), r"RoPE theta must be a finite number > 0, got 0"),
    ("rope-positions-2d", lambda x: apply_rope(x.k, torch.zeros(2, 4), theta=1e4), r"positions must be a 1-D tensor \[T\], got shape \(2, 4\)"),
    ("rope-of-a-list", lambda x: apply_rope([1.0, 2.0], theta=1e4), r"x must be a floating-point tensor \[\.\.\., T, D\], got list"),
    ("kv-head-of-zero-kv-heads", lambda x: kv_head_of(4, 0), r"KV heads must be an integer >= 1, got 0"),
    ("attention-int-keys", lambda x: attention_reference(x.k, x.k.int(), x.k), r"k must be a floating-point tensor \[B, H, T, D\]"),
    ("attention-negative-scale", lambda x: attention_reference(x.k, x.k, x.k, scale=-1.0), r"scale must be a finite number > 0, got -1\.0"),
    ("attention-int-dtype", lambda x: attention_reference(x.k, x.k, x.k, dtype=torch.int64), r"dtype must be a floating-point torch\.dtype"),
    ("vidkv-value-stream-given-a-channel-order", vidkv_value_codec_loads, r"calibration state has a channel order for a VidKV stream that does not reorder"),
]  # fmt: skip


def held(layer: StreamingLayer) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in layer.tensors().items()}


@pytest.mark.parametrize("name,call,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_one_clear_line(name, call, message):
    x = make_inputs()
    before = held(x.layer)
    with pytest.raises(ValueError, match=message) as err:
        call(x)
    assert "\n" not in str(err.value), str(err.value)
    assert x.layer.tokens == 4  # a rejected append or calibration leaves the layer as it was
    after = held(x.layer)
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())


def test_corpus_size():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


def test_valid_baseline_runs():
    """The inputs every case perturbs are valid: the unperturbed calls succeed."""
    x = make_inputs()
    y = dequantize(x.codes, x.scale, x.zero, 4, "token", 8)
    assert float((y - x.x).abs().max()) <= float(x.scale.float().max()) / 2 + 1e-6
    x.layer.append(x.k, x.k.clone())
    x.layer.calibrate(x.k, x.k)
    assert x.layer.tokens == 8 and x.layer.keys(torch.float16).dtype == torch.float16
    assert kivi(x).bytes(5, 8, 128) > 0 and get_format("skvq", (2, 1.5)).name == "skvq-k2v1.5"
    append_to("fp16", None, filled(65504.0))  # the fp16 limit itself is accepted
    append_to("h2o", None, x.k, queries=torch.randn(1, 4, 4, D))


def test_reported_bfp_all_zero_block():
    layer = StreamingLayer.for_method("bfp", 4, head_dim=64)
    zero = torch.zeros(1, 2, 8, 64)
    layer.append(zero, zero.clone())
    assert torch.equal(layer.keys(), zero) and torch.equal(layer.values(), zero)


@pytest.mark.parametrize("method", ["vidkv", "cskv"])
def test_reported_fp16_limit_finite(method):
    # 160 tokens: 32 leave the 128-token window into the body (VidKV's whole group of 32)
    layer = StreamingLayer.for_method(method, None, head_dim=64)
    x = signs(65504.0, (1, 2, 160, 64))
    layer.append(x, x.clone())
    assert torch.isfinite(layer.keys()).all() and torch.isfinite(layer.values()).all()


def test_reported_vidkv_bytes_after_calibration():
    fmt = get_format("vidkv", 1.5)
    layer = StreamingLayer(fmt, 64)
    g = torch.Generator().manual_seed(0)
    layer.calibrate(torch.randn(1, 2, 64, 64, generator=g), torch.randn(1, 2, 64, 64, generator=g))
    layer.append(torch.randn(1, 2, 160, 64, generator=g), torch.randn(1, 2, 160, 64, generator=g))
    bd = fmt.breakdown(160, 2, 64)
    assert layer.nbytes == bd.per_sequence + bd.shared == 25600  # 256 more held before: the values' identity order
