import math

import pytest
import torch

from kvq_kernels.decode_fp16 import decode_fp16, decode_reference

# (name, batch, query heads, kv heads, head_dim, capacity, lens)
SHAPES = [
    ("context-1", 1, 4, 4, 32, 8, [1]),
    ("odd-97-mha", 2, 4, 4, 32, 128, [97, 60]),
    ("smollm2-gqa-9/3", 2, 9, 3, 64, 300, [1, 257]),
    ("empty-and-full", 2, 8, 2, 32, 64, [0, 64]),
]


@pytest.mark.parametrize("name,b,hq,hkv,d,cap,lens", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_fp64_reference(name, b, hq, hkv, d, cap, lens, device, dtype):
    g = torch.Generator().manual_seed(len(name))
    q = torch.randn(b, hq, d, generator=g).to(device, dtype)
    k = torch.randn(b, hkv, cap, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, cap, d, generator=g).to(device, dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    ref = decode_reference(q, k, v, lens_t)  # fp64
    same_math = decode_reference(q, k, v, lens_t, dtype=torch.float32 if dtype == torch.float32 else torch.float16)
    out = decode_fp16(q, k, v, lens_t, splits=3)
    err = (out.double() - ref).abs().max().item()
    base = (same_math.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-6, (err, base)  # atol 1e-6: ~8 fp32 ulps of |out| <= 4
    assert torch.isfinite(out).all()


def test_bad_inputs_raise_before_launch(device, dtype):
    q = torch.randn(1, 6, 32, device=device, dtype=dtype)
    k = torch.randn(1, 4, 16, 32, device=device, dtype=dtype)
    lens = torch.tensor([16], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_fp16(q, k, k, lens)
    q = torch.randn(1, 4, 32, device=device, dtype=dtype)
    with pytest.raises(ValueError, match="dtype"):
        decode_fp16(q, k.to(torch.float64), k, lens)
    with pytest.raises(ValueError, match="contiguous"):
        decode_fp16(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, lens)
    with pytest.raises(ValueError, match="capacity"):
        decode_fp16(q, k, k, torch.tensor([17], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="int32"):
        decode_fp16(q, k, k, lens.long())
    with pytest.raises(ValueError, match="shape"):
        decode_fp16(q, k, k[..., :16].contiguous(), lens)


def test_split_rule_counts_at_most_two_resident_programs(device, dtype, monkeypatch):
    """fp16_plan: a given split count is kept (resident 0); the rule sizes one wave of the programs an SM holds,
    counted at most FP16_SPLIT_RESIDENT_MAX; the default call gives the reference's attention."""
    from kvq_core.splits import split_count
    from kvq_kernels import _launch
    from kvq_kernels import decode_fp16 as mod

    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 8, 32, generator=g).to(device, dtype)
    k = torch.randn(1, 2, 1000, 32, generator=g).to(device, dtype)
    v = torch.randn(1, 2, 1000, 32, generator=g).to(device, dtype)
    lens = torch.tensor([999], dtype=torch.int32, device=device)
    assert mod.fp16_plan(q, k, v, lens, 5, 64, 1000) == mod.Fp16Plan(4, 256, 0)  # 5 asked: 4 of 256 tokens
    sms = _launch.num_sms(q.device)
    for held, counted in ((1, 1), (2, 2), (3, 2), (8, 2)):
        monkeypatch.setattr(mod, "resident_programs", lambda *a, held=held: held)
        plan = mod.fp16_plan(q, k, v, lens, None, 16, 1000)
        want = split_count(2, 63, sms, 4, True, counted)
        tokens = math.ceil(math.ceil(1000 / want) / 16) * 16
        assert plan == mod.Fp16Plan(math.ceil(1000 / tokens), tokens, counted), (held, plan)
    out = mod.decode_fp16(q, k, v, lens, block_n=16)
    ref = decode_reference(q, k, v, lens)
    same_math = decode_reference(q, k, v, lens, dtype=torch.float32 if dtype == torch.float32 else torch.float16)
    assert (out.double() - ref).abs().max().item() <= 2 * (same_math.double() - ref).abs().max().item() + 1e-6
