import pytest
import torch

from kvq_kernels.decode_kivi import decode_kivi, decode_kivi_reference
from kvq_kernels.kivi_layout import allocate


def random_cache(b, h, d, cap, bits, group, residual, sinks, lens, device, nuq=False, seed=0):
    """Random codes, scales, zeros and fp16 parts (never zeros): every stored value is exercised."""
    g = torch.Generator().manual_seed(seed)
    cb = torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values.half().to(device) if nuq else None
    c = allocate(b, h, d, cap, bits, group, residual, sinks, device=device, codebook=cb)
    span = 1.0 if nuq else 2.0 / (2**bits - 1)  # dequantized values of order 1
    for t in (c.k_codes, c.v_codes):
        t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
    for t in (c.k_scale, c.v_scale):
        t.copy_(torch.rand(t.shape, generator=g) * span / 2 + span / 2)
    for t in (c.k_zero, c.v_zero, c.k_res, c.v_win, c.k_sink, c.v_sink):
        t.copy_(torch.randn(t.shape, generator=g))
    c.lens.copy_(torch.tensor(lens, dtype=torch.int32))
    return c


# (name, bits, batch, query heads, kv heads, head_dim, group, residual, sinks, lens)
CASES = [
    ("context-1", 4, 1, 4, 4, 32, 16, 32, 0, [1]),
    ("odd-97-partial-residual", 2, 1, 4, 4, 32, 16, 32, 0, [97]),
    ("smollm2-gqa-9/3-3bit", 3, 2, 9, 3, 64, 32, 64, 4, [3, 300]),
    ("mha-8bit-sinks", 8, 2, 2, 2, 32, 16, 32, 2, [70, 161]),
    ("gqa-4bit-group-ge-headdim", 4, 1, 8, 2, 32, 32, 64, 0, [231]),
    ("nuq-3bit", 3, 1, 6, 3, 32, 16, 32, 1, [150]),
    ("nuq-2bit", 2, 1, 4, 2, 32, 16, 32, 0, [99]),
    # head_dim 128: channel slices wide enough for tl.dot (W = 128 / 4 and 128 / 8)
    ("2bit-d128-value-groups", 2, 1, 4, 4, 128, 32, 64, 0, [300]),
    ("3bit-d128-gqa", 3, 1, 4, 2, 128, 128, 128, 1, [400]),
]


@pytest.mark.parametrize("name,bits,b,hq,hkv,d,group,res,sinks,lens", CASES, ids=[c[0] for c in CASES])
def test_equals_attention_over_kvq_core_dequantized_cache(
    name, bits, b, hq, hkv, d, group, res, sinks, lens, device, dtype
):
    c = random_cache(b, hkv, d, 2 * max(lens) + 64, bits, group, res, sinks, lens, device, nuq=name.startswith("nuq"))
    q = torch.randn(b, hq, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ref = decode_kivi_reference(q, c)  # fp64 over kvq_core.quant.dequantize(unpack(codes))
    same_math = decode_kivi_reference(q, c, dtype=torch.float32 if dtype == torch.float32 else torch.float16)
    out = decode_kivi(q, c, splits=2, block_n=16)
    err = (out.double() - ref).abs().max().item()
    base = (same_math.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-6, (err, base)  # atol 1e-6: ~8 fp32 ulps of outputs of order 1
    assert torch.isfinite(out).all()


def test_bad_inputs_raise_before_launch(device, dtype):
    c = random_cache(1, 2, 32, 64, 4, 16, 32, 0, [40], device)
    q = torch.randn(1, 3, 32, device=device, dtype=dtype)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_kivi(q, c)
    q = torch.randn(1, 4, 32, device=device, dtype=dtype)
    c.lens.fill_(c.capacity + 1)
    with pytest.raises(ValueError, match="capacity"):
        decode_kivi(q, c)
    c.lens.fill_(40)
    c.k_scale = c.k_scale.float()
    with pytest.raises(ValueError, match="k_scale"):
        decode_kivi(q, c)
    c.k_scale = c.k_scale.half()
    c.v_codes = c.v_codes[:, :, :, :-1]
    with pytest.raises(ValueError, match="v_codes"):
        decode_kivi(q, c)
