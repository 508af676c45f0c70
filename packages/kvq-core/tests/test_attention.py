"""Reference attention and RoPE (kvq_core.attention) against torch SDPA and against themselves."""

import pytest

torch = pytest.importorskip("torch")

from kvq_core.attention import apply_rope, attention_reference, kv_head_of, rope_cos_sin, unapply_rope  # noqa: E402

# (name, B, H_q, H_kv, T_q, T_k, D): odd token counts hit the causal mask's off-diagonal alignment
SHAPES = [
    ("smollm2_prefill", 1, 9, 3, 97, 97, 64),
    ("chunk_after_cache", 2, 4, 2, 13, 113, 32),
    ("decode_single_query", 2, 9, 3, 1, 129, 64),
    ("mha", 1, 4, 4, 17, 17, 16),
]


@pytest.mark.parametrize("name,b,h_q,h_kv,t_q,t_k,d", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_sdpa(name, b, h_q, h_kv, t_q, t_k, d, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h, t in ((h_q, t_q), (h_kv, t_k), (h_kv, t_k)))
    got = attention_reference(q, k, v, causal=causal)
    mask = None
    if causal and t_q > 1:  # queries aligned to the end of the keys: bottom-right causal mask
        mask = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=h_q != h_kv
    )
    assert got.dtype == torch.float64 and got.shape == (b, h_q, t_q, d)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    got32 = attention_reference(q, k, v, causal=causal, dtype=torch.float32)
    torch.testing.assert_close(got32.double(), ref, atol=1e-5, rtol=1e-5)


def test_gqa_mapping_is_contiguous_groups():
    assert kv_head_of(9, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="multiple"):
        kv_head_of(9, 2)


def test_rope_table_example():
    cos, sin = rope_cos_sin(torch.tensor([0, 1]), 4, 10000.0)
    assert cos[0].tolist() == [1.0, 1.0, 1.0, 1.0] and sin[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    expect = torch.tensor([1.0, 0.01, 1.0, 0.01], dtype=torch.float64)
    torch.testing.assert_close(cos[1], expect.cos())
    torch.testing.assert_close(sin[1], expect.sin())


def test_rope_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=100000.0)
    rot = LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, 2, 37, 32)
    pos = torch.arange(5, 42)[None]
    cos, sin = rot(x, pos)  # [1, T, D]
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(apply_rope(x, cos=cos[:, None], sin=sin[:, None]), ref)
    # our fp64 angles vs transformers' fp32 ones: differ by ~pos * 2**-24
    torch.testing.assert_close(apply_rope(x, pos[0], theta=100000.0), ref, atol=1e-5, rtol=1e-5)


def test_unapply_inverts_apply():
    x = torch.randn(2, 3, 50, 64, dtype=torch.float64)
    pos = torch.arange(100, 150)
    y = apply_rope(x, pos, theta=1e4, dtype=torch.float64)
    torch.testing.assert_close(unapply_rope(y, pos, theta=1e4, dtype=torch.float64), x, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(y, x)


def test_bad_input():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="incompatible"):
        attention_reference(q, torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="T_q <= T_k"):
        attention_reference(q, torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="theta"):
        apply_rope(q)
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(torch.arange(3), 5, 1e4)
