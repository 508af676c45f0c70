"""A whole decode step of a dense LLaMA-shaped model with random fp16 weights, over an fp16 or packed KIVI KV
cache, and its time as a CUDA-graph replay.

Each layer: RMSNorm, fused QKV projection, RoPE, append of the new token's K/V into the cache, decode attention
over the cache, output projection, RMSNorm, SwiGLU MLP; then the final norm and LM head (no embedding table,
no sampling). One step decodes one token per sequence; sequence b's new token sits at position `cache.pos[b]`
(a device tensor) and the attention reads pos + 1 tokens.

Caches (`random_cache` for timing, `dense_cache` to compare backends on the same K/V):

- `DenseCache` "sdpa": fp16 K/V [B, Hkv, T + 1, D] per layer, torch SDPA's flash backend over all T + 1 tokens,
  selected explicitly: the kernel the sweep's `sdpa_flash_fp16` family times. Left to itself, torch 2.11 picks
  cuDNN attention for these shapes on an H100/H200, which is up to 1.9x faster than flash at batch >= 8.
- `DenseCache` "kvq": the same tensors, kvq's `decode_fp16` with per-sequence lengths.
- `KiviStepCache`: one packed `KiviCache` per layer (no sinks), kvq's `decode_kivi`; the new token goes in
  through `append_token`, which launches the product's quantize kernels (`quantize_append.quantize_token_rows`
  and `quantize_channel_blocks`, the ones `append_kivi` launches) on row indices computed on the device.

Nothing in a step reads device values on the host, and its launches do not depend on the batch's contents, so
the whole step captures into one CUDA graph (`time_step`). The model's shape is passed in (`Shape`, e.g. from
kvq_sim's configs/models through `shape_from_config`); this module does not import kvq_sim.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvq_core.attention import apply_rope

from .benchmarking import fill_random
from .decode_fp16 import decode_fp16
from .decode_kivi import decode_kivi
from .kivi_layout import KiviCache, allocate
from .quantize_append import kivi_from_dense, quantize_channel_blocks, quantize_token_rows

#: RoPE base: configs/models/ hold none (a step's cost does not depend on it); LLaMA's (Touvron et al. 2023)
ROPE_THETA = 10000.0
#: random weights' standard deviation: keeps 80 layers' residual stream finite in fp16
WEIGHT_STD = 0.02
#: the step's CSV columns before the provenance ones (kvq_core.provenance.CSV_FIELDS); kvq_sim.measurements
#: reads them by name
E2E_FIELDS = (
    "backend", "bits", "batch", "context", "step_us", "tokens_per_s", "weights_bytes", "cache_bytes",
    "max_allocated_bytes",
)  # fmt: skip
BACKENDS = {"sdpa": (16,), "kvq": (16, 8, 4, 3, 2)}
#: (batches, contexts) of a quick and a full run (benchmarks/e2e_decode.py, kvq-bench)
QUICK_GRID = ((1, 16), (4096, 32768))
FULL_GRID = ((1, 8, 16, 32), (4096, 32768, 131072))


@dataclass(frozen=True)
class Shape:
    """A dense LLaMA-shaped decoder (RMSNorm, RoPE, SwiGLU, no biases)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float = ROPE_THETA


def shape_from_config(name: str, m) -> Shape:
    """The `Shape` of a model config with Hugging Face field names (kvq_sim.models.ModelConfig); dense
    full-attention models without biases only (ValueError otherwise)."""
    if (
        getattr(m, "is_moe", False)
        or getattr(m, "sliding_window", None) is not None
        or getattr(m, "attention_bias", False)
    ):
        raise ValueError(f"{name}: the benchmarks build dense full-attention LLaMA layers without biases only")
    return Shape(
        name, m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim,
        m.intermediate_size, m.vocab_size,
    )  # fmt: skip


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """kvq_core's rotate-half RoPE (`apply_rope`) of x [B, H, 1, D] at per-sequence positions pos [B], computed
    in fp32 and returned in x's dtype. The cos/sin tables [B, 1, 1, D] are built here, on x's device in fp32,
    in every call (kvq-sim's EAGER_KERNELS_PER_LAYER counts these kernels): `rope_cos_sin` builds tables
    along T (one position per token, shared by the batch) on the CPU in fp64, which a CUDA graph cannot
    capture."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv[None]  # [B, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, None]  # [B, 1, 1, D]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, None]
    return apply_rope(x, cos=cos, sin=sin).to(x.dtype)


class Weights:
    """Random fp16 weights of every layer (std WEIGHT_STD, norms 1), allocated once."""

    def __init__(self, s: Shape, device, dtype=torch.float16, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)

        def w(*shape):
            return (torch.randn(*shape, device=device, dtype=dtype, generator=g) * WEIGHT_STD).contiguous()

        self.layers = [
            dict(
                n1=torch.ones(s.hidden, device=device, dtype=dtype),
                wqkv=w(s.hidden, _qkv(s)),
                wo=w(s.heads * s.head_dim, s.hidden),
                n2=torch.ones(s.hidden, device=device, dtype=dtype),
                wgu=w(s.hidden, 2 * s.ffn),
                wd=w(s.ffn, s.hidden),
            )
            for _ in range(s.layers)
        ]
        self.norm = torch.ones(s.hidden, device=device, dtype=dtype)
        self.lm_head = w(s.hidden, s.vocab)

    @property
    def nbytes(self) -> int:
        per = sum(t.nbytes for layer in self.layers for t in layer.values())
        return per + self.norm.nbytes + self.lm_head.nbytes

    @staticmethod
    def bytes_of(s: Shape) -> int:
        """`nbytes` of a shape's fp16 weights, without allocating them."""
        per = s.hidden * (_qkv(s) + 2 * s.ffn + 2) + s.heads * s.head_dim * s.hidden + s.ffn * s.hidden
        return 2 * (s.layers * per + s.hidden * (1 + s.vocab))


def _qkv(s: Shape) -> int:
    return (s.heads + 2 * s.kv_heads) * s.head_dim


def decode_step(x: torch.Tensor, W: Weights, s: Shape, cache) -> torch.Tensor:
    """Logits [B, vocab] of one decode step from hidden states x [B, hidden]; `cache.attend(layer, q, k, v)`
    appends k, v [B, Hkv, D] and returns the attention output [B, Hq, D] of q [B, Hq, D]."""
    b = x.shape[0]
    pos = cache.pos
    for i, L in enumerate(W.layers):
        h = rms_norm(x, L["n1"]) @ L["wqkv"]
        q, k, v = h.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        q = rope(q.view(b, s.heads, 1, s.head_dim), pos, s.rope_theta).view(b, s.heads, s.head_dim)
        k = rope(k.view(b, s.kv_heads, 1, s.head_dim), pos, s.rope_theta).view(b, s.kv_heads, s.head_dim)
        o = cache.attend(i, q, k, v.reshape(b, s.kv_heads, s.head_dim))
        x = x + o.reshape(b, -1) @ L["wo"]
        gu = rms_norm(x, L["n2"]) @ L["wgu"]
        g_, u = gu.chunk(2, -1)
        x = x + (torch.nn.functional.silu(g_) * u) @ L["wd"]
    return rms_norm(x, W.norm) @ W.lm_head


def _per_head(pos: torch.Tensor, heads: int) -> torch.Tensor:
    """Each sequence's position once per head, int64 [B * heads] in (sequence, head) order (no host sync)."""
    return pos[:, None].expand(pos.shape[0], heads).reshape(-1)


class DenseCache:
    """fp16 K/V [B, Hkv, C, D] per layer (C = capacity), lengths pos + 1: `kernel` "sdpa" attends with torch SDPA
    over all C slots (so pos must be C - 1 for every sequence), "kvq" with `decode_fp16` over lens = pos + 1.
    The new token's slot is computed from pos on the device once per step (at layer 0)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], pos: torch.Tensor, kernel: str):
        if kernel not in ("sdpa", "kvq"):
            raise ValueError(f"kernel must be 'sdpa' or 'kvq', got {kernel!r}")
        self.k, self.v, self.kernel = k, v, kernel
        b, h, self.capacity, _ = k[0].shape
        self.pos = pos.to(torch.int64)
        self.lens = (self.pos + 1).to(torch.int32)
        self._base = torch.arange(b * h, device=pos.device) * self.capacity  # row of (b, h, 0) in [B*Hkv*C, D]

    def attend(self, i, q, k, v):
        b, hq, d = q.shape
        h = k.shape[1]
        if i == 0:
            self._slot = self._base + _per_head(self.pos, h)
        self.k[i].view(-1, d).index_copy_(0, self._slot, k.reshape(b * h, d))
        self.v[i].view(-1, d).index_copy_(0, self._slot, v.reshape(b * h, d))
        if self.kernel == "sdpa":
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None], self.k[i], self.v[i], enable_gqa=hq != h
                )
            return out.reshape(b, hq, d)
        return decode_fp16(q, self.k[i], self.v[i], self.lens, validate_lens=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v) + (self.lens.nbytes if self.kernel == "kvq" else 0)


@dataclass(frozen=True)
class AppendRows:
    """Where one new token per sequence goes in sink-free KIVI caches of one shape, flat rows over
    (sequence, head) in that order, all int64 on the device (`append_rows`)."""

    ring: torch.Tensor  # [B * Hkv]: ring slot p % R of the new token, in a [B * Hkv * R, D] view
    value_row: torch.Tensor  # [B * Hkv]: value-code row of the token p - R leaving the window (row 0 while p < R)
    key_rows: torch.Tensor  # [B * Hkv * R / G]: first key-code row of each G-token block of the ring's R rows
    # where this token fills the ring, else -1 (the block is left unwritten)


def append_rows(pos: torch.Tensor, heads: int, residual: int, group: int, quant_capacity: int) -> AppendRows:
    """`AppendRows` of tokens at post-sink positions pos (int64 [B]) from torch ops on the device (no host sync)."""
    r, tq = residual, quant_capacity
    p = _per_head(pos, heads)
    base = torch.arange(p.shape[0], device=pos.device)
    cycle = base * tq + p - p % r  # first row of the ring's cycle
    blocks = cycle[:, None] + torch.arange(0, r, group, device=pos.device)
    fills = (p % r == r - 1)[:, None]
    return AppendRows(
        ring=base * r + p % r,
        value_row=base * tq + (p - r).clamp_min(0),
        key_rows=torch.where(fills, blocks, -1).reshape(-1),
    )


def append_token(c: KiviCache, at: AppendRows, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write one new token per sequence (k, v fp16 [B, Hkv, D]) into a sink-free cache at the rows `at` names
    (`append_rows` of each sequence's post-sink position p), as `append_kivi` does for one token, with the
    quantize kernels it launches and no host sync. c.lens is left to the caller.

    Values: ring slot p % R holds token p - R, which leaves the window: `quantize_token_rows` writes it to value
    row p - R (row 0 while p < R, rewritten with the right token at p = R), then the new value takes the slot.
    Keys: the new key takes ring slot p % R; on the step that fills the ring (p % R = R - 1)
    `quantize_channel_blocks` quantizes it (R / G blocks) into rows [p - R + 1, p + 1), as append_kivi's flush.
    The kernel is launched every step over every ring (no launch depends on device values) and its programs
    for rings that are not full exit at once (key_rows -1). Needs p < the cache's quantized capacity."""
    b, h, _, d = c.k_res.shape
    leaving = c.v_win.view(-1, d).index_select(0, at.ring)
    quantize_token_rows(leaving, c.v_codes, c.v_scale, c.v_zero, at.value_row, c.bits, c.group_size)
    c.v_win.view(-1, d).index_copy_(0, at.ring, v.reshape(b * h, d))
    c.k_res.view(-1, d).index_copy_(0, at.ring, k.reshape(b * h, d))
    quantize_channel_blocks(c.k_res.view(-1, c.group_size, d), c.k_codes, c.k_scale, c.k_zero, at.key_rows, c.bits)


class KiviStepCache:
    """One packed KIVI cache per layer (no sinks), lengths pos + 1; attention by `decode_kivi` with `launch` (its
    keyword arguments: block_n, num_warps, ..., or {} for its defaults). The append's rows are computed from pos
    on the device once per step (at layer 0)."""

    def __init__(self, layers: list[KiviCache], pos: torch.Tensor, launch: dict):
        c = layers[0]
        if c.sink_tokens:
            raise ValueError("the step's append handles sink-free caches only")
        self.layers, self.launch = layers, dict(launch)
        self.pos = pos.to(torch.int64)
        for layer in layers:
            layer.lens.copy_(self.pos + 1)

    def attend(self, i, q, k, v):
        c = self.layers[i]
        if i == 0:
            self._at = append_rows(self.pos, c.kv_heads, c.residual_tokens, c.group_size, c.quant_capacity)
        append_token(c, self._at, k, v)
        return decode_kivi(q, c, validate_lens=False, **self.launch)

    @property
    def nbytes(self) -> int:
        names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_win", "k_sink", "v_sink")
        return sum(getattr(c, n).nbytes for c in self.layers for n in (*names, "lens"))


def _check_backend(backend: str, bits: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if bits not in BACKENDS[backend]:
        raise ValueError(f"the {backend} backend stores {', '.join(map(str, BACKENDS[backend]))}-bit KV, not {bits}")


def random_cache(backend, bits, s: Shape, batch, context, device, group, residual, launch=None, seed: int = 1):
    """A cache of every layer holding `context` random tokens (never zeros) per sequence plus the step's slot:
    fp16 normal K/V, or a packed cache filled by `fill_random`. launch: decode_kivi's launch arguments (default
    none: its own per-path defaults, as a user's call gets)."""
    _check_backend(backend, bits)
    g = torch.Generator(device=device).manual_seed(seed)
    pos = torch.full((batch,), context, device=device, dtype=torch.int64)
    if bits == 16:
        shape = (batch, s.kv_heads, context + 1, s.head_dim)
        k = [torch.randn(shape, device=device, dtype=torch.float16, generator=g) for _ in range(s.layers)]
        v = [torch.randn(shape, device=device, dtype=torch.float16, generator=g) for _ in range(s.layers)]
        return DenseCache(k, v, pos, backend)
    layers = [
        fill_random(allocate(batch, s.kv_heads, s.head_dim, context + 1, bits, group, residual, 0, device=device), g)
        for _ in range(s.layers)
    ]
    return KiviStepCache(layers, pos, launch or {})


def dense_cache(backend, bits, s: Shape, k, v, context, group, residual, launch=None):
    """A cache of every layer from fp16 K/V lists of [B, Hkv, C, D] (C > context): the first `context` tokens
    quantized by `kivi_from_dense` (kvq_core's quantizer) for a packed cache, copied for fp16; the step
    appends token `context`. For comparing backends on the same data."""
    _check_backend(backend, bits)
    b, h, _, d = k[0].shape
    pos = torch.full((b,), context, device=k[0].device, dtype=torch.int64)
    if bits == 16:
        return DenseCache(
            [x[:, :, : context + 1].clone() for x in k], [x[:, :, : context + 1].clone() for x in v], pos, backend
        )
    layers = []
    for kl, vl in zip(k, v):
        c = allocate(b, h, d, context + 1, bits, group, residual, 0, device=kl.device)
        kivi_from_dense(c, kl, vl, [context] * b)
        layers.append(c)
    return KiviStepCache(layers, pos, launch or {})


def fits(s: Shape, weights_bytes: int, bits: int, batch: int, context: int, memory_bytes: int) -> bool:
    """Whether a point fits: weights plus the fp16-equivalent KV scaled to `bits`, with 30% for metadata and
    activations, within 92% of the GPU's memory."""
    kv_fp16 = 2 * s.layers * batch * (context + 1) * s.kv_heads * s.head_dim * 2
    return weights_bytes + kv_fp16 * bits / 16 * 1.3 <= 0.92 * memory_bytes


@dataclass(frozen=True)
class StepPoint:
    backend: str
    bits: int
    batch: int
    context: int


def plan(backends, kvq_bits, batches, contexts) -> list[StepPoint]:
    """Points in run order: per backend (sdpa: fp16; kvq: each of kvq_bits), batch, context."""
    return [
        StepPoint(backend, bits, batch, context)
        for backend in backends
        for bits in (BACKENDS["sdpa"] if backend == "sdpa" else kvq_bits)
        for batch in batches
        for context in contexts
    ]


def graph_median_ms(step, what: str, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds of `step()` replayed from a CUDA graph (`triton.testing.do_bench`, L2 flushed). The step
    runs once eagerly first and must return finite logits (RuntimeError naming `what` otherwise)."""
    import triton.testing

    if not torch.isfinite(step()).all():
        raise RuntimeError(f"non-finite logits: {what}")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return triton.testing.do_bench(g.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def time_step(s: Shape, W: Weights, p: StepPoint, group, residual, launch=None, warmup_ms=50, rep_ms=300) -> dict:
    """One point's E2E_FIELDS: the step captured in a CUDA graph and timed as the median replay
    (`triton.testing.do_bench`, whose 256 MiB L2-flush buffer counts in max_allocated_bytes). Replays rewrite the
    same slots, so each does one step's work. Raises RuntimeError on non-finite logits."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if torch.cuda.memory_allocated() > W.nbytes + (512 << 20):  # do_bench keeps a 256 MB L2-flush buffer
        raise RuntimeError("memory of the previous point is still allocated")
    cache = random_cache(p.backend, p.bits, s, p.batch, p.context, "cuda", group, residual, launch)
    x = torch.randn(p.batch, s.hidden, device="cuda", dtype=torch.float16)
    step = functools.partial(decode_step, x, W, s, cache)
    ms = graph_median_ms(step, str(p), warmup_ms, rep_ms)
    row = dict(
        backend=p.backend,
        bits=p.bits,
        batch=p.batch,
        context=p.context,
        step_us=round(ms * 1e3, 2),
        tokens_per_s=round(p.batch / (ms / 1e3), 1),
        weights_bytes=W.nbytes,
        cache_bytes=cache.nbytes,
        max_allocated_bytes=torch.cuda.max_memory_allocated(),
    )
    del step, cache
    return row


def run_points(s, points, group, residual, prov, launch=None, warmup_ms=50, rep_ms=300, progress=iter) -> list[dict]:
    """E2E CSV rows (E2E_FIELDS, then the provenance `prov`) of every point that `fits` this GPU, in order; []
    without allocating anything when none does. launch: {bits: decode_kivi arguments} (default: its own);
    progress wraps the list of points that fit."""
    memory = torch.cuda.get_device_properties(0).total_memory
    todo = [p for p in points if fits(s, Weights.bytes_of(s), p.bits, p.batch, p.context, memory)]
    if not todo:
        return []
    W = Weights(s, "cuda")
    rows = []
    for p in progress(todo):
        cfg = None if launch is None or p.bits == 16 else launch.get(p.bits)
        rows.append({**time_step(s, W, p, group, residual, cfg, warmup_ms, rep_ms), **prov})
    del W
    torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict]) -> None:
    """The rows as a table: backend, bits, batch, context, step time, tokens/s, cache GB."""
    print(f"{'backend':8s} {'bits':>4s} {'batch':>5s} {'context':>8s} {'step_us':>10s} {'tok/s':>9s} {'cache GB':>9s}")
    for r in rows:
        print(
            f"{r['backend']:8s} {r['bits']:4d} {r['batch']:5d} {r['context']:8d} {r['step_us']:10.1f} "
            f"{r['tokens_per_s']:9.1f} {r['cache_bytes'] / 1e9:9.2f}"
        )


def write_rows(path, rows: list[dict]) -> None:
    """The rows as a CSV with their keys as the header (a header only when there are none)."""
    from kvq_core.provenance import CSV_FIELDS

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [*E2E_FIELDS, *CSV_FIELDS])
        w.writeheader()
        w.writerows(rows)
