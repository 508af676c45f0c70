import pytest
import torch

from kvq_kernels.kivi_layout import allocate
from kvq_kernels.quantize_append import append_kivi, kivi_from_dense


def assert_same_cache(c, ref):
    """Bit-identical over everything a reader may touch: valid codes, scales, zeros, ring slots, sinks."""
    r, g = c.residual_tokens, c.group_size
    assert torch.equal(c.lens, ref.lens)
    for i, t in enumerate(c.lens.tolist()):
        n = c.counts(t)
        for name, rows in (("k_codes", n["n_kq"]), ("k_scale", n["n_kq"] // g), ("k_zero", n["n_kq"] // g)):
            assert torch.equal(getattr(c, name)[i, :, :rows], getattr(ref, name)[i, :, :rows]), name
        for name in ("v_codes", "v_scale", "v_zero"):
            assert torch.equal(getattr(c, name)[i, :, : n["n_vq"]], getattr(ref, name)[i, :, : n["n_vq"]]), name
        ks = [p % r for p in range(n["n_kq"], n["rest"])]
        vs = [p % r for p in range(n["n_vq"], n["rest"])]
        assert torch.equal(c.k_res[i][:, ks], ref.k_res[i][:, ks])
        assert torch.equal(c.v_win[i][:, vs], ref.v_win[i][:, vs])
        assert torch.equal(c.k_sink[i, :, : n["sinks"]], ref.k_sink[i, :, : n["sinks"]])


@pytest.mark.parametrize("bits,d", [(2, 32), (3, 16), (3, 32), (3, 128), (4, 32), (8, 32)])
def test_prefill_then_decode_is_bit_identical_to_kvq_core(bits, d, device):
    """3-bit at head_dim 16 (one 16-channel block of the 1-bit plane), 32 and 128 (several 32-channel blocks)."""
    b, h, g, r, s = 2, 3, 16, 32, 3
    total = 90  # crosses two key flushes (R = 32) and slides the value window
    gen = torch.Generator().manual_seed(bits)
    k = (torch.randn(b, h, total, d, generator=gen) * 3).half().to(device)
    v = torch.randn(b, h, total, d, generator=gen).half().to(device)
    c = allocate(b, h, d, 128, bits, g, r, s, device=device)
    append_kivi(c, k[:, :, :37].contiguous(), v[:, :, :37].contiguous())  # prefill block
    for j in range(37, 40):  # single decode tokens, one of them flushes a key block
        append_kivi(c, k[:, :, j : j + 1].contiguous(), v[:, :, j : j + 1].contiguous())
    append_kivi(c, k[:, :, 40:total].contiguous(), v[:, :, 40:total].contiguous())
    ref = allocate(b, h, d, 128, bits, g, r, s, device=device)
    kivi_from_dense(ref, k, v, [total] * b)
    assert_same_cache(c, ref)


def test_group_larger_than_head_dim_and_single_tokens(device):
    b, h, d, g, r = 1, 2, 32, 64, 64
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(b, h, 140, d, generator=gen).half().to(device)
    v = torch.randn(b, h, 140, d, generator=gen).half().to(device)
    c = allocate(b, h, d, 256, 4, g, r, 0, device=device)
    append_kivi(c, k[:, :, :127].contiguous(), v[:, :, :127].contiguous())
    for j in range(127, 140):
        append_kivi(c, k[:, :, j : j + 1].contiguous(), v[:, :, j : j + 1].contiguous())
    ref = allocate(b, h, d, 256, 4, g, r, 0, device=device)
    kivi_from_dense(ref, k, v, [140])
    assert_same_cache(c, ref)


def test_append_rejects_bad_input(device):
    c = allocate(1, 2, 32, 64, 4, 16, 32, 0, device=device)
    with pytest.raises(ValueError, match="float16"):
        append_kivi(c, torch.randn(1, 2, 1, 32, device=device), torch.randn(1, 2, 1, 32, device=device))
    x = torch.randn(1, 2, 200, 32, device=device).half()
    with pytest.raises(ValueError, match="capacity"):
        append_kivi(c, x, x)


@pytest.mark.parametrize("sinks", [0, 3])
def test_filled_to_capacity_matches_kvq_core_and_no_further(sinks, device):
    """At `capacity` tokens every key code row fits the Tq rows (one token more would flush a key block
    past them, into the next head's rows); appending beyond it raises."""
    c = allocate(1, 2, 16, 32, 4, 16, 16, sinks, device=device)
    assert c.capacity == sinks + c.quant_capacity + 16 - 1
    gen = torch.Generator().manual_seed(sinks)
    k = torch.randn(1, 2, c.capacity, 16, generator=gen).half().to(device)
    v = torch.randn(1, 2, c.capacity, 16, generator=gen).half().to(device)
    append_kivi(c, k[:, :, :-1].contiguous(), v[:, :, :-1].contiguous())
    append_kivi(c, k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous())
    ref = allocate(1, 2, 16, 32, 4, 16, 16, sinks, device=device)
    kivi_from_dense(ref, k, v, [c.capacity])
    assert_same_cache(c, ref)
    with pytest.raises(ValueError, match="exceeds the capacity"):
        append_kivi(c, k[:, :, :1].contiguous(), v[:, :, :1].contiguous())


@pytest.mark.parametrize("bits", [2, 4])
def test_channel_blocks_skip_negative_rows(bits, device):
    """quantize_channel_blocks writes block i from row dst_row0[i] and leaves a block with a negative row unwritten:
    the same codes and scales as flushing only the blocks it names."""
    from kvq_kernels.quantize_append import quantize_channel_blocks

    g, d, rows = 32, 64, 96
    x = torch.randn(3, g, d, generator=torch.Generator().manual_seed(bits)).half().to(device)

    def flush(dst):
        c = allocate(1, 1, d, rows, bits, g, g, 0, device=device)
        for t in (c.k_codes, c.k_scale, c.k_zero):
            t.fill_(7)  # sentinel: anything left unwritten keeps it
        quantize_channel_blocks(x, c.k_codes, c.k_scale, c.k_zero, torch.tensor(dst, device=device), bits)
        return c

    some = flush([64, -1, 0])
    only = flush([64, -1, -1])
    assert (only.k_codes.view(-1, only.k_codes.shape[-1])[:64] == 7).all()
    assert (only.k_scale.view(-1, d)[:2] == 7).all()
    assert torch.equal(
        only.k_codes.view(-1, only.k_codes.shape[-1])[64:], some.k_codes.view(-1, some.k_codes.shape[-1])[64:]
    )
    assert not torch.equal(
        some.k_codes.view(-1, some.k_codes.shape[-1])[:32], only.k_codes.view(-1, only.k_codes.shape[-1])[:32]
    )
    assert (some.k_codes.view(-1, some.k_codes.shape[-1])[32:64] == 7).all()  # block 1 (-1) untouched
