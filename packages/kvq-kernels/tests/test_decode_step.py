"""The whole decode step (kvq_kernels.decode_step) on tiny shapes: its append against append_kivi, its attention
against an fp64 reference, the quantized caches against fp16, no host sync or per-sequence work in a step,
and (GPU only) a CUDA-graph replay against the eager step."""

import pytest
import torch
from test_quantize_append import assert_same_cache
from torch.overrides import TorchFunctionMode

from kvq_kernels import decode_step as ds
from kvq_kernels.decode_fp16 import decode_reference
from kvq_kernels.decode_kivi import decode_kivi_reference
from kvq_kernels.kivi_layout import allocate
from kvq_kernels.quantize_append import append_kivi, kivi_from_dense

#: head_dim 32 (the CUDA-core KIVI path needs head_dim * bits >= 64 at 2 bits), group 16, residual 32
GROUP, RESIDUAL = 16, 32
MHA = ds.Shape("tiny-mha", layers=2, hidden=64, heads=4, kv_heads=4, head_dim=32, ffn=96, vocab=128)
GQA = ds.Shape("tiny-gqa", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, ffn=96, vocab=128)
CONTEXT = 70  # 64 keys quantized (2 flushed rings), 6 in the key ring; 38 values quantized, 32 in the window


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_append_token_equals_append_kivi_at_per_sequence_positions(bits, device):
    """36 decode tokens from lens 27 and 45: both sequences cross a key flush and slide their value windows at
    different steps; every byte a reader may touch equals append_kivi's (the same quantize kernels)."""
    b, h, d = 2, 3, 32
    gen = torch.Generator().manual_seed(bits)
    k = (torch.randn(b, h, 128, d, generator=gen) * 3).half().to(device)
    v = torch.randn(b, h, 128, d, generator=gen).half().to(device)
    lens = [27, 45]
    got = allocate(b, h, d, 128, bits, GROUP, RESIDUAL, 0, device=device)
    ref = allocate(b, h, d, 128, bits, GROUP, RESIDUAL, 0, device=device)
    kivi_from_dense(got, k, v, lens)
    kivi_from_dense(ref, k, v, lens)
    pos = torch.tensor(lens, device=device, dtype=torch.int64)
    for _ in range(36):
        idx = pos[:, None, None, None].expand(b, h, 1, d)
        kn, vn = k.gather(2, idx), v.gather(2, idx)  # token pos[b] of each sequence's dense K/V
        at = ds.append_rows(pos, h, RESIDUAL, GROUP, got.quant_capacity)
        ds.append_token(got, at, kn[:, :, 0], vn[:, :, 0])
        got.lens += 1
        pos += 1
        append_kivi(ref, kn.contiguous(), vn.contiguous())
    assert got.lens.tolist() == [27 + 36, 45 + 36]
    assert_same_cache(got, ref)


class Recorder:
    """A cache wrapper keeping each layer's (q, k, v, out)."""

    def __init__(self, cache):
        self.cache, self.pos, self.calls = cache, cache.pos, []

    def attend(self, i, q, k, v):
        out = self.cache.attend(i, q, k, v)
        self.calls.append((q.clone(), k.clone(), v.clone(), out.clone()))
        return out


def run(shape, backend, bits, device, batch=2):
    """Logits and layer-0 (q, k, v, out) of one step over random K/V shared by every backend, with the dense
    K/V [B, Hkv, CONTEXT + 1, D] that holds the appended token at slot CONTEXT."""
    gen = torch.Generator().manual_seed(7)
    kv = [torch.randn(batch, shape.kv_heads, CONTEXT + 1, shape.head_dim, generator=gen).half() for _ in range(4)]
    k, v = [t.to(device) for t in kv[:2]], [t.to(device) for t in kv[2:]]
    W = ds.Weights(shape, device)
    x = torch.randn(batch, shape.hidden, generator=gen).half().to(device)
    rec = Recorder(ds.dense_cache(backend, bits, shape, k, v, CONTEXT, GROUP, RESIDUAL))
    logits = ds.decode_step(x, W, shape, rec)
    q0, k0, v0, out0 = rec.calls[0]
    kf, vf = k[0].clone(), v[0].clone()
    kf[:, :, CONTEXT], vf[:, :, CONTEXT] = k0, v0
    return logits, q0, kf, vf, out0, rec.cache


@pytest.mark.parametrize("shape", [MHA, GQA], ids=lambda s: s.name)
def test_fp16_backends_match_the_fp64_reference_and_each_other(shape, device):
    """sdpa and kvq's decode_fp16 read the same fp16 K/V (the appended token included) and round their output to
    fp16 once (2**-11 = 4.9e-4 relative), so each lies within 1e-3 of fp64 attention; the logits, two layers on,
    agree within 2e-3. Attention without the appended token errs by ~1e-2 (asserted: the check can fail)."""
    lens = torch.full((2,), CONTEXT + 1, dtype=torch.int32, device=device)
    logits = {}
    for backend in ("sdpa", "kvq"):
        logits[backend], q0, kf, vf, out0, _ = run(shape, backend, 16, device)
        want = decode_reference(q0, kf, vf, lens)
        assert rel(out0, want) < 1e-3, backend
        stale = decode_reference(q0, kf, vf, lens - 1)
        assert rel(stale, want) > 1e-2
    assert torch.isfinite(logits["kvq"]).all()
    assert rel(logits["kvq"], logits["sdpa"]) < 2e-3


#: Bound on layer 0's attention error against fp16, 1.5x the rms rounding error of one b-bit element relative to
#: the data's size: (range / (2**b - 1)) / sqrt(12), N(0, 1) values whose group of 16 channels spans ~3.5. The
#: output is a softmax average of value rows whose independent errors average down as the output itself does,
#: so its relative error is about one element's (measured with 38 of 71 tokens quantized: 0.055 at 4 bits,
#: 0.24 / 0.31 at 2 bits for MHA / GQA); attention over wrong rows errs by ~1.
QUANT_BOUND = {b: 1.5 * 3.5 / (2**b - 1) / 12**0.5 for b in (8, 4, 3, 2)}


@pytest.mark.parametrize("shape", [MHA, GQA], ids=lambda s: s.name)
def test_quantized_steps_match_their_dequantized_cache_and_stay_near_fp16(shape, device):
    """Layer 0's attention over the packed cache after the step's append equals fp64 attention over that cache's
    dequantized contents (the kernels' own tolerance, 2e-3); against fp16 it errs by less than QUANT_BOUND and
    more at 2 bits than at 4 (each path quantized what it was given)."""
    lens = torch.full((2,), CONTEXT + 1, dtype=torch.int32, device=device)
    _, q0, kf, vf, fp16_out, _ = run(shape, "sdpa", 16, device)
    fp16_ref = decode_reference(q0, kf, vf, lens)
    err = {}
    for bits in (4, 2):
        logits, q, _, _, out0, cache = run(shape, "kvq", bits, device)
        assert torch.equal(q, q0)  # same weights, input and position: layer 0 sees the same q
        assert torch.isfinite(logits).all()
        assert rel(out0, decode_kivi_reference(q, cache.layers[0])) < 2e-3, bits
        err[bits] = rel(out0, fp16_ref)
        assert 0 < err[bits] < QUANT_BOUND[bits], (bits, err[bits])
    assert err[2] > err[4]


SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}


class HostSync(AssertionError):
    pass


class Ops(TorchFunctionMode):
    """Counts torch calls; a call that reads device values on the host raises HostSync."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            raise HostSync(f"host sync: {name}")
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend,bits", [("sdpa", 16), ("kvq", 16), ("kvq", 4), ("kvq", 2)])
def test_a_step_neither_syncs_nor_loops_over_sequences(backend, bits, monkeypatch, device):
    """The step's own torch calls (kernel launchers stubbed: they are timed and captured on the GPU) read no
    device value on the host, and their count does not grow with the batch: 1 and 5 sequences make the same
    calls and the same launches. append_kivi (lens on the host) is caught by the same check."""
    launches = []

    def stub(name, ret=None):
        def f(*args, **kw):
            launches.append(name)
            return torch.zeros_like(args[0]) if ret == "q" else None

        return f

    monkeypatch.setattr(ds, "quantize_token_rows", stub("tokens"))
    monkeypatch.setattr(ds, "quantize_channel_blocks", stub("channels"))
    monkeypatch.setattr(ds, "decode_kivi", stub("decode_kivi", "q"))
    monkeypatch.setattr(ds, "decode_fp16", stub("decode_fp16", "q"))
    counts = []
    for batch in (1, 5):
        cache = ds.random_cache(backend, bits, MHA, batch, CONTEXT, "cpu", GROUP, RESIDUAL)
        W = ds.Weights(MHA, "cpu")
        x = torch.randn(batch, MHA.hidden).half()
        launches.clear()
        with Ops() as ops:
            ds.decode_step(x, W, MHA, cache)
        counts.append((ops.n, list(launches)))
    assert counts[0] == counts[1]
    if backend == "kvq":
        per_layer = ["tokens", "channels", "decode_kivi"] if bits < 16 else ["decode_fp16"]
        assert counts[0][1] == per_layer * MHA.layers
    c = allocate(1, 2, 32, 64, 4, GROUP, RESIDUAL, 0, device=device)  # launchable here: CUDA, or the interpreter
    new = torch.randn(1, 2, 1, 32).half().to(device)
    with pytest.raises(HostSync, match="tolist"), Ops():
        append_kivi(c, new, new, check_values=False)


def test_bad_backend_or_bits_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'vllm'; valid: sdpa, kvq"):
        ds.random_cache("vllm", 16, MHA, 1, CONTEXT, "cpu", GROUP, RESIDUAL)
    with pytest.raises(ValueError, match="the sdpa backend stores 16-bit KV, not 4"):
        ds.random_cache("sdpa", 4, MHA, 1, CONTEXT, "cpu", GROUP, RESIDUAL)


def test_plan_and_fit():
    pts = ds.plan(("sdpa", "kvq"), (4, 2), (1, 16), (4096, 32768))
    assert [(p.backend, p.bits) for p in pts[::4]] == [("sdpa", 16), ("kvq", 4), ("kvq", 2)]
    assert len(pts) == 12
    llama = ds.Shape("llama-7b", 32, 4096, 32, 32, 128, 11008, 32000)
    w = ds.Weights.bytes_of(llama)
    assert w == 13_214_687_232  # the weights_bytes of reports/measurements/e2e_decode_h100.csv (allocated there)
    assert ds.Weights.bytes_of(GQA) == ds.Weights(GQA, "cpu").nbytes
    h100 = 85_017_493_504
    # fp16 KV at 16 x 32K is 256 GiB; 2-bit ~ 37 GB with metadata: fits beside 13 GB of weights
    assert not ds.fits(llama, w, 16, 16, 32768, h100)
    assert ds.fits(llama, w, 2, 16, 32768, h100)
    assert ds.fits(llama, w, 16, 16, 4096, h100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend,bits", [("sdpa", 16), ("kvq", 16), ("kvq", 4), ("kvq", 2)])
@pytest.mark.parametrize("shape", [MHA, GQA], ids=lambda s: s.name)
def test_captured_step_replays_as_the_eager_step(shape, backend, bits):
    """The step captured in one CUDA graph and replayed from the same cache contents gives the eager step's
    logits: the same kernels on the same data (cuBLAS may pick another reduction split on the capture stream:
    1e-3 relative, as multigpu_decode's graph check)."""
    cache = ds.random_cache(backend, bits, shape, 3, CONTEXT, "cuda", GROUP, RESIDUAL)
    W = ds.Weights(shape, "cuda")
    x = torch.randn(3, shape.hidden, device="cuda", dtype=torch.float16)
    tensors = [t for c in getattr(cache, "layers", []) for t in vars(c).values() if isinstance(t, torch.Tensor)]
    tensors += getattr(cache, "k", []) + getattr(cache, "v", [])
    before = [t.clone() for t in tensors]
    eager = ds.decode_step(x, W, shape, cache)
    for t, b in zip(tensors, before):
        t.copy_(b)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ds.decode_step(x, W, shape, cache)
    for t, b in zip(tensors, before):
        t.copy_(b)
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(eager).all()
    assert rel(out, eager) < 1e-3
    changed = [not torch.equal(t, b) for t, b in zip(tensors, before)]
    assert any(changed)  # the replay appended the token
