"""The split-KV combine pass against fp64: its torch reference, and attention computed in one piece."""

import math

import pytest
import torch

from kvq_kernels.combine import MAX_BLOCK_S, alloc_partials, block_splits, combine, combine_reference


def chunk_states(scores: torch.Tensor, values: torch.Tensor, splits: int):
    """Per-split (m, l, acc) in log2 units, as the decode kernels write them, of attention rows `scores`
    [rows, T] (already scaled by log2 e) over `values` [rows, T, D], T cut into `splits` near-equal chunks;
    a chunk with no tokens is empty (m = -inf, l = 0, acc = 0)."""
    rows, t = scores.shape
    m = torch.full((rows, splits), float("-inf"), dtype=torch.float64)
    l_part = torch.zeros(rows, splits, dtype=torch.float64)
    acc = torch.zeros(rows, splits, values.shape[-1], dtype=torch.float64)
    per = math.ceil(t / splits)
    for s in range(splits):
        lo, hi = s * per, min(t, (s + 1) * per)
        if lo >= hi:
            continue
        sc = scores[:, lo:hi]
        m[:, s] = sc.max(dim=1).values
        p = torch.exp2(sc - m[:, s, None])
        l_part[:, s] = p.sum(dim=1)
        acc[:, s] = torch.einsum("rt,rtd->rd", p, values[:, lo:hi])
    return m, l_part, acc


@pytest.mark.parametrize("splits", [1, 3, MAX_BLOCK_S - 1, MAX_BLOCK_S, MAX_BLOCK_S + 1, 133])
def test_combine_is_attention_in_one_piece(device, splits):
    g = torch.Generator().manual_seed(splits)
    rows, t, d = 5, 150, 64
    scores = 4 * torch.randn(rows, t, generator=g, dtype=torch.float64)
    values = torch.randn(rows, t, d, generator=g, dtype=torch.float64)
    m, l_part, acc = chunk_states(scores, values, splits)  # more splits than tokens leaves empty ones
    want = torch.einsum("rt,rtd->rd", torch.softmax(scores * math.log(2), dim=1), values)
    torch.testing.assert_close(combine_reference(m, l_part, acc), want, rtol=1e-12, atol=1e-12)
    parts = alloc_partials(rows, splits, d, torch.device(device))
    for dst, src in zip(parts, (m, l_part, acc)):
        dst.copy_(src)
    out = combine(*parts, torch.empty(1, rows, d, dtype=torch.float32, device=device))
    # fp32 states merged in fp32: each output is a convex combination of values of size ~1, so the
    # rounding is a few fp32 ulps of the weights and sums (~1e-6 relative)
    torch.testing.assert_close(out[0].double().cpu(), want, rtol=2e-5, atol=2e-5)


def test_combine_empty_rows_and_splits(device):
    """Rows whose splits are all empty give zeros (a length-0 sequence); empty splits between live ones add
    nothing, also where the first block of splits is all empty."""
    g = torch.Generator().manual_seed(0)
    rows, splits, d = 3, 2 * MAX_BLOCK_S + 5, 32
    m = torch.randn(rows, splits, generator=g) * 3
    l_part = torch.rand(rows, splits, generator=g) + 0.5
    acc = torch.randn(rows, splits, d, generator=g)
    empty = torch.rand(rows, splits, generator=g) < 0.3
    empty[0] = True  # a length-0 sequence
    empty[1, :MAX_BLOCK_S] = True  # the first step sees no live split
    m[empty], l_part[empty], acc[empty] = float("-inf"), 0.0, 0.0
    out = combine(m.to(device), l_part.to(device), acc.to(device), torch.empty(rows, 1, d, device=device))
    want = combine_reference(m, l_part, acc)
    assert torch.all(out[0] == 0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 0].double().cpu(), want, rtol=2e-5, atol=2e-5)


def test_block_splits():
    assert [block_splits(s) for s in (0, 1, 2, 3, 33, 64, 65, 1000)] == [1, 1, 2, 4, 64, 64, 64, 64]
