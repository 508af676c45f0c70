"""Bad inputs to the kvq_kernels launchers: each raises one ValueError line naming the problem, before any
launch, and a rejected append leaves the cache as it was. Tiny shapes (the CPU interpreter is slow).

The reported examples are named `reported-*`: splits=-1 or 0 and max_len below the real lengths returned
wrong attention, append_kivi stored a NaN key as a finite code, block_n=48 or 0 failed inside the interpreter.
"""

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

from kvq_kernels.decode_fp16 import decode_fp16, decode_reference
from kvq_kernels.decode_kivi import decode_kivi, decode_kivi_reference
from kvq_kernels.hf_attention import KiviKernelStore
from kvq_kernels.kivi_layout import allocate
from kvq_kernels.quantize_append import append_kivi, kivi_from_dense

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
D = 16  # head_dim
KIVI = dict(bits=4, group_size=16, residual_tokens=16)  # Tq 48, capacity 48 + 16 - 1 = 63
KIVI_LEN = 40  # rest 40: n_kq 32 keys and n_vq 24 values quantized


def make_inputs(device, dtype) -> SimpleNamespace:
    """fp16-kernel inputs (GQA 4/2, capacity 16, one sequence of 10 tokens) and a filled KIVI cache."""
    g = torch.Generator().manual_seed(0)
    x = SimpleNamespace(device=device, dtype=dtype)
    x.q = torch.randn(1, 4, D, generator=g).to(device, dtype)
    x.k = torch.randn(1, 2, 16, D, generator=g).to(device, dtype)
    x.v = torch.randn(1, 2, 16, D, generator=g).to(device, dtype)
    x.lens = torch.tensor([10], dtype=torch.int32, device=device)
    x.cache = allocate(1, 2, D, 48, device=device, **KIVI)
    kv = torch.randn(2, 1, 2, KIVI_LEN, D, generator=g).half().to(device)
    kivi_from_dense(x.cache, kv[0], kv[1], [KIVI_LEN])
    x.new = torch.randn(1, 2, 1, D, generator=g).half().to(device)  # one decode token for append_kivi
    return x


def fp16(x, **kw):
    args = dict(q=x.q, k=x.k, v=x.v, lens=x.lens) | {n: kw.pop(n) for n in ("q", "k", "v", "lens") if n in kw}
    return decode_fp16(args["q"], args["k"], args["v"], args["lens"], **kw)


def kivi(x, cache=None, q=None, **kw):
    return decode_kivi(x.q if q is None else q, x.cache if cache is None else cache, **kw)


def with_(c, **fields):
    return dataclasses.replace(c, **fields)


def nan_at(t, value=float("nan")):
    t = t.clone()
    t.view(-1)[3] = value
    return t


# (name, call, message regex)
CASES = [
    # decode_fp16: launch arguments
    ("reported-fp16-splits-minus-1", lambda x: fp16(x, splits=-1), r"splits must be in \[1, inf\], got -1"),
    ("reported-fp16-splits-0", lambda x: fp16(x, splits=0), r"splits must be in \[1, inf\], got 0"),
    ("fp16-splits-float", lambda x: fp16(x, splits=2.5), r"splits must be an int, got 2.5"),
    ("fp16-splits-bool", lambda x: fp16(x, splits=True), r"splits must be an int, got True"),
    ("reported-fp16-max-len-below-lens", lambda x: fp16(x, max_len=4), r"max_len \(4\) is below the longest .*10"),
    ("fp16-max-len-negative", lambda x: fp16(x, max_len=-1), r"max_len must be in \[0, 16\]"),
    ("fp16-max-len-over-capacity", lambda x: fp16(x, max_len=17), r"max_len must be in \[0, 16\]"),
    ("reported-fp16-block-n-48", lambda x: fp16(x, block_n=48), r"block_n must be a power of two in \[16, 256\]"),
    ("reported-fp16-block-n-0", lambda x: fp16(x, block_n=0), r"block_n must be in \[16, 256\], got 0"),
    ("fp16-block-n-8", lambda x: fp16(x, block_n=8), r"block_n must be in \[16, 256\], got 8"),
    ("fp16-block-n-512", lambda x: fp16(x, block_n=512), r"block_n must be in \[16, 256\], got 512"),
    ("fp16-sm-scale-nan", lambda x: fp16(x, sm_scale=float("nan")), r"sm_scale must be a finite number"),
    ("fp16-sm-scale-zero", lambda x: fp16(x, sm_scale=0.0), r"sm_scale must be positive"),
    # decode_fp16: tensors
    ("fp16-q-bf16", lambda x: fp16(x, q=x.q.bfloat16()), r"q must have dtype torch.float16 or torch.float32"),
    ("fp16-k-dtype-differs", lambda x: fp16(x, k=x.k.double()), r"k must have dtype"),
    ("fp16-q-2d", lambda x: fp16(x, q=x.q[0]), r"q must be a \[batch, query_heads, head_dim\] tensor"),
    ("fp16-k-3d", lambda x: fp16(x, k=x.k[0]), r"k must be a \[batch, kv_heads, capacity, head_dim\] tensor"),
    ("fp16-v-list", lambda x: fp16(x, v=x.v.tolist()), r"v must be a torch.Tensor, got list"),
    ("fp16-v-shape", lambda x: fp16(x, v=x.v[:, :, :8].contiguous()), r"v must have shape \[1, 2, 16, 16\]"),
    ("fp16-v-transposed", lambda x: fp16(x, v=x.v.transpose(2, 3).contiguous().transpose(2, 3)), r"contiguous"),
    ("fp16-gqa-6-over-4", lambda x: fp16(x, q=x.q.repeat(1, 3, 1)[:, :6], k=x.k.repeat(1, 2, 1, 1), v=x.v.repeat(1, 2, 1, 1)),
     r"query heads \(6\) must be a positive multiple of kv heads \(4\)"),  # fmt: skip
    ("fp16-head-dim-24", lambda x: fp16(x, q=x.q.new_zeros(1, 4, 24), k=x.k.new_zeros(1, 2, 16, 24), v=x.v.new_zeros(1, 2, 16, 24)),
     r"head_dim must be a power of two >= 16, got 24"),  # fmt: skip
    ("fp16-head-dim-8", lambda x: fp16(x, q=x.q[..., :8].contiguous(), k=x.k[..., :8].contiguous(), v=x.v[..., :8].contiguous()),
     r"head_dim must be a power of two >= 16, got 8"),  # fmt: skip
    ("fp16-k-on-other-device", lambda x: fp16(x, k=x.k.to("meta")), r"k is on meta, expected"),
    ("fp16-lens-int64", lambda x: fp16(x, lens=x.lens.long()), r"lens must have dtype torch.int32, got torch.int64"),
    ("fp16-lens-shape", lambda x: fp16(x, lens=x.lens.repeat(2)), r"lens must have shape \[1\], got \[2\]"),
    ("fp16-lens-2d", lambda x: fp16(x, lens=x.lens[None]), r"lens must have shape \[1\], got \[1, 1\]"),
    ("fp16-lens-list", lambda x: fp16(x, lens=[10]), r"lens must be a torch.Tensor, got list"),
    ("fp16-lens-negative", lambda x: fp16(x, lens=-x.lens), r"lens must lie in \[0, 16\] .* min -10"),
    ("fp16-lens-over-capacity", lambda x: fp16(x, lens=x.lens + 7), r"lens must lie in \[0, 16\] .* max 17"),
    ("fp16-lens-on-other-device", lambda x: fp16(x, lens=x.lens.to("meta")), r"lens is on meta, expected"),
    # decode_kivi: launch arguments
    ("reported-kivi-splits-minus-1", lambda x: kivi(x, splits=-1), r"splits must be in \[1, inf\], got -1"),
    ("reported-kivi-splits-0", lambda x: kivi(x, splits=0), r"splits must be in \[1, inf\], got 0"),
    ("reported-kivi-max-len-below-lens", lambda x: kivi(x, max_len=8), r"max_len \(8\) is below the 24 quantized tokens"),
    ("kivi-max-len-over-capacity", lambda x: kivi(x, max_len=64), r"max_len must be in \[0, 63\], got 64"),
    ("reported-kivi-block-n-48", lambda x: kivi(x, block_n=48), r"block_n must be a power of two in \[16, 256\]"),
    ("reported-kivi-block-n-0", lambda x: kivi(x, block_n=0), r"block_n must be in \[16, 256\], got 0"),
    ("kivi-block-n-over-group", lambda x: kivi(x, block_n=32), r"block_n \(32\) must divide group_size \(16\)"),
    ("kivi-num-warps-3", lambda x: kivi(x, num_warps=3), r"num_warps must be a power of two in \[1, 32\]"),
    ("kivi-num-warps-0", lambda x: kivi(x, num_warps=0), r"num_warps must be in \[1, 32\], got 0"),
    ("kivi-num-stages-0", lambda x: kivi(x, num_stages=0), r"num_stages must be in \[1, 8\], got 0"),
    ("kivi-path-unknown", lambda x: kivi(x, path="fast"), r"path must be one of auto, frag, tc, slice, simt, got 'fast'"),
    ("kivi-simt-with-gqa", lambda x: kivi(x, path="simt"), r"path='simt' needs one query head per KV head"),
    ("kivi-sm-scale-negative", lambda x: kivi(x, sm_scale=-1.0), r"sm_scale must be positive"),
    # decode_kivi: q and the cache
    ("kivi-gqa-3-over-2", lambda x: kivi(x, q=x.q[:, :3].contiguous()), r"query heads \(3\) must be a positive multiple"),
    ("kivi-q-bf16", lambda x: kivi(x, q=x.q.bfloat16()), r"q must have dtype torch.float16 or torch.float32"),
    ("kivi-q-head-dim", lambda x: kivi(x, q=x.q.new_zeros(1, 4, 32)), r"q must have shape \[1, 4, 16\]"),
    ("kivi-q-on-other-device", lambda x: kivi(x, q=x.q.to("meta")), r"cache.k_codes is on .*, expected meta"),
    ("kivi-cache-not-a-cache", lambda x: kivi(x, cache={"k_codes": None}), r"cache must be a .*KiviCache, got dict"),
    ("kivi-cache-bits-5", lambda x: kivi(x, cache=with_(x.cache, bits=5)), r"bits must be 2, 3, 4 or 8, got 5"),
    ("kivi-k-scale-fp32", lambda x: kivi(x, cache=with_(x.cache, k_scale=x.cache.k_scale.float())), r"cache.k_scale must have dtype"),
    ("kivi-v-codes-short-row", lambda x: kivi(x, cache=with_(x.cache, v_codes=x.cache.v_codes[..., :-1].contiguous())),
     r"cache.v_codes must have shape"),  # fmt: skip
    ("kivi-v-zero-on-other-device", lambda x: kivi(x, cache=with_(x.cache, v_zero=x.cache.v_zero.to("meta"))),
     r"cache.v_zero is on meta"),  # fmt: skip
    ("kivi-codebook-length", lambda x: kivi(x, cache=with_(x.cache, codebook=torch.zeros(8, dtype=torch.float16, device=x.device))),
     r"cache.codebook must have shape \[16\]"),  # fmt: skip
    ("kivi-lens-int64", lambda x: kivi(x, cache=with_(x.cache, lens=x.cache.lens.long())), r"lens must have dtype torch.int32"),
    ("kivi-lens-negative", lambda x: kivi(x, cache=with_(x.cache, lens=-x.cache.lens)), r"lens must lie in \[0, 63\]"),
    ("kivi-lens-over-capacity", lambda x: kivi(x, cache=with_(x.cache, lens=x.cache.lens + 24)), r"lens must lie in \[0, 63\] .* max 64"),
    # append_kivi
    ("reported-append-nan-key", lambda x: append_kivi(x.cache, nan_at(x.new), x.new), r"k_new contains 1 NaN and 0 Inf"),
    ("append-inf-value", lambda x: append_kivi(x.cache, x.new, nan_at(x.new, float("inf"))), r"v_new contains 0 NaN and 1 Inf"),
    ("append-nan-key-lens-host", lambda x: append_kivi(x.cache, nan_at(x.new), x.new, lens_host=[KIVI_LEN]), r"k_new contains 1 NaN"),
    ("append-fp32-key", lambda x: append_kivi(x.cache, x.new.float(), x.new), r"k_new must have dtype torch.float16"),
    ("append-3d-key", lambda x: append_kivi(x.cache, x.new[0], x.new), r"k_new must be \[batch, kv_heads, new_tokens, head_dim\]"),
    ("append-head-count", lambda x: append_kivi(x.cache, x.new[:, :1].contiguous(), x.new), r"k_new must have shape \[1, 2, 1, 16\]"),
    ("append-value-length", lambda x: append_kivi(x.cache, x.new, x.new.repeat(1, 1, 2, 1)), r"v_new must have shape \[1, 2, 1, 16\]"),
    ("append-key-on-other-device", lambda x: append_kivi(x.cache, x.new.to("meta"), x.new), r"k_new is on meta"),
    ("append-past-capacity", lambda x: append_kivi(x.cache, x.new.repeat(1, 1, 24, 1), x.new.repeat(1, 1, 24, 1)),
     r"appending 24 tokens to lens up to 40 exceeds the capacity 63"),  # fmt: skip
    ("append-lens-host-length", lambda x: append_kivi(x.cache, x.new, x.new, lens_host=[40, 40]), r"lens_host must be a list of 1"),
    ("append-lens-host-negative", lambda x: append_kivi(x.cache, x.new, x.new, lens_host=[-1]), r"lens_host entry must be in \[0, 63\]"),
    ("append-lens-host-stale", lambda x: append_kivi(x.cache, x.new, x.new, lens_host=[39]), r"lens_host \[39\] differs from cache.lens \[40\]"),
    ("append-not-a-cache", lambda x: append_kivi(None, x.new, x.new), r"cache must be a KiviCache"),
    # allocate
    ("allocate-bits-5", lambda x: allocate(1, 2, D, 32, 5), r"bits must be 2, 3, 4 or 8, got 5"),
    ("allocate-bits-float", lambda x: allocate(1, 2, D, 32, 4.0), r"bits must be 2, 3, 4 or 8, got 4.0"),
    ("allocate-head-dim-24", lambda x: allocate(1, 2, 24, 32, 4), r"head_dim must be a power of two >= 16, got 24"),
    ("allocate-group-8", lambda x: allocate(1, 2, D, 32, 4, group_size=8), r"group_size must be a power of two >= 16"),
    ("allocate-residual-not-multiple", lambda x: allocate(1, 2, D, 32, 4, 16, 24), r"residual_tokens \(24\) must be a positive multiple"),
    ("allocate-capacity-negative", lambda x: allocate(1, 2, D, -1, 4), r"capacity must be in \[0, inf\], got -1"),
    ("allocate-sinks-negative", lambda x: allocate(1, 2, D, 32, 4, sink_tokens=-2), r"sink_tokens must be in \[0, inf\]"),
    ("allocate-batch-float", lambda x: allocate(1.5, 2, D, 32, 4), r"batch must be an int, got 1.5"),
    ("allocate-zero-kv-heads", lambda x: allocate(1, 0, D, 32, 4), r"kv_heads must be in \[1, inf\], got 0"),
    ("allocate-codebook-nan", lambda x: allocate(1, 2, D, 32, 2, codebook=torch.tensor([-1, 0, float("nan"), 1]).half()),
     r"codebook levels must be finite and in \[-1, 1\]"),  # fmt: skip
    ("allocate-codebook-fp32", lambda x: allocate(1, 2, D, 32, 2, codebook=torch.linspace(-1, 1, 4)), r"codebook must have dtype torch.float16"),
]  # fmt: skip


def snapshot(c) -> dict:
    return {
        f.name: getattr(c, f.name).clone()
        for f in dataclasses.fields(c)
        if isinstance(getattr(c, f.name), torch.Tensor)
    }


@pytest.mark.parametrize("name,call,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_one_clear_line(name, call, message, device, dtype):
    x = make_inputs(device, dtype)
    before = snapshot(x.cache)
    with pytest.raises(ValueError, match=message) as err:
        call(x)
    assert "\n" not in str(err.value), str(err.value)
    for field, t in before.items():  # a rejected append (or decode) leaves the cache as it was
        assert torch.equal(getattr(x.cache, field), t), field


def test_corpus_size():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


def test_valid_baseline_runs(device, dtype):
    """The inputs every case perturbs are valid: the unperturbed calls give the reference attention, with
    max_len at the bounds the checks accept (the longest sequence; the longest's quantized tokens)."""
    x = make_inputs(device, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # outputs of order 1: fp32 / fp16 rounding
    out = fp16(x, splits=2, block_n=16, max_len=10)
    torch.testing.assert_close(out.double(), decode_reference(x.q, x.k, x.v, x.lens), atol=tol, rtol=tol)
    q32 = x.q.float()  # fp16 q at head_dim 16 is refused on the GPU (test_fp16_q_at_head_dim_16_refused_on_gpu)
    out = kivi(x, q=q32, splits=2, block_n=16, max_len=24)
    torch.testing.assert_close(out.double(), decode_kivi_reference(q32, x.cache), atol=1e-5, rtol=1e-5)
    append_kivi(x.cache, x.new, x.new, lens_host=[KIVI_LEN])
    assert x.cache.lens.tolist() == [KIVI_LEN + 1]


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="the fp16 tensor-core dots run on a GPU only")
def test_fp16_q_at_head_dim_16_refused_on_gpu():
    """The tensor-core path's fp16 dots are wrong at head_dim 16 below 8 bits: an error, not a wrong answer."""
    x = make_inputs("cuda", torch.float16)
    with pytest.raises(ValueError, match=r"wrong attention for fp16 q at head_dim 16 with 4-bit codes"):
        kivi(x)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """Without TRITON_INTERPRET=1 CPU tensors get a clear error instead of Triton's driver traceback."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make_inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"tensors on cpu need a CUDA device, or TRITON_INTERPRET=1"):
        fp16(x)
    with pytest.raises(ValueError, match=r"tensors on cpu need a CUDA device, or TRITON_INTERPRET=1"):
        kivi(x)
    with pytest.raises(ValueError, match=r"tensors on cpu need a CUDA device, or TRITON_INTERPRET=1"):
        append_kivi(x.cache, x.new, x.new)


def test_kernel_store_checks_the_prefill_and_poisons_decode_on_nan(device):
    """KiviKernelStore (KVQCache's kernel path): NaN in a prefill raises; a NaN decode token, not checked on
    the host, turns this and every later output of the layer to NaN instead of a finite answer."""
    store = KiviKernelStore(4, 16, 16, 1, 2, D, torch.device(device))
    k = torch.randn(1, 2, 20, D, generator=torch.Generator().manual_seed(5)).to(device)
    with pytest.raises(ValueError, match=r"k_new contains 1 NaN"):
        store.append(nan_at(k), k)
    assert store.tokens == 0
    store.append(k, k)
    q = torch.randn(1, 4, D, device=device)  # fp32: see test_fp16_q_at_head_dim_16_refused_on_gpu
    assert torch.isfinite(store.attend(q, None)).all()
    store.append(nan_at(k[:, :, :1]), k[:, :, :1])
    assert torch.isnan(store.attend(q, None)).all()
    for _ in range(17):  # past the next key flush, where the NaN key would become a finite code
        store.append(k[:, :, :1], k[:, :, :1])
    assert torch.isnan(store.attend(q, None)).all()
