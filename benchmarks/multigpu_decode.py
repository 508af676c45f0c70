"""Multi-GPU decode-step benchmark: LLaMA-shaped layers with random weights, tensor or context parallel.

One step decodes one token per sequence at a fixed context, as benchmarks/e2e_decode.py and kvq-sim's
`decode_step` count it: per layer RMSNorm, fused QKV GEMV, RoPE, append of the new K/V, decode attention
(kvq's fused kernels: `decode_fp16` for fp16 KV, the kernel family kvq-sim's fp16 numbers are fitted on,
and `decode_kivi` for KIVI 4/2-bit), output projection, RMSNorm, SwiGLU MLP; then the final RMSNorm and
LM head. No embedding (e2e_decode has none) and no sampling.

- tp (Megatron): each GPU holds heads / N query and KV heads, MLP columns (gate, up) and rows (down), and a
  vocabulary slice of the LM head; one all-reduce after the output projection and one after the MLP
  (2 per layer, as kvq-sim counts). The sharded logits are not gathered (kvq-sim counts no collective).
- cp: weights replicated; each GPU holds context / N tokens of every sequence (its own KIVI stream with its
  own residual window; the last GPU also stores the new token), computes its softmax state (m, l, acc)
  with its own max, all-gathers the fp32 states ([B * heads, head_dim + 2] per GPU, 1 per layer, as
  kvq-sim counts) and merges them with kvq's split-KV combine.
- 1 GPU (--nproc_per_node 1): the baseline, no collectives (labelled tp, gpus 1).

Before timing, every point checks layer 0 of its step against a single-process fp32 reference of the
same layer (full weights regenerated from the same seed, the KV gathered from all GPUs, KIVI dequantized
by kvq_core) on rows 0 and B - 1; a point over the tolerance is recorded as failed and not timed.
Timing: CUDA events around each eager call or CUDA-graph replay (the graph captures the whole step,
collectives included, and its logits must equal the eager step's), median / p10 / p90 over repetitions
after warm-up, the maximum over GPUs of each; a barrier between points. No L2 flush: each layer's
weights alone exceed the 50 MB L2. Memory is planned before allocating (weights and KV per GPU, workspace,
the check's reference) against torch.cuda.mem_get_info: --layers auto runs all layers when they fit,
else as many as fit; the final norm + LM head is timed alone (head_us), so per_layer_us =
(step_us - head_us) / layers_run and step_us_scaled = head_us + layers_model * per_layer_us.

    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src:packages/kvq-sim/src KVQ_COMMIT=<sha> \\
        torchrun --standalone --nproc_per_node 2 benchmarks/multigpu_decode.py --model llama-7b --out $OUT
    python benchmarks/multigpu_decode.py --dry-run --gpus 4 --model llama-2-70b   # planned points, memory

Writes <out>/multigpu_decode_<model>_<N>gpu.csv (rows as measured, with provenance) and prints a short table.
On CPU (tests): TRITON_INTERPRET=1, gloo, fp32, --check-only.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) must stay off on the lent machines (the device tool's KINDS.md); NCCL and torch's
# symmetric memory read these when they load, so they are set before torch is imported.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules when imported by the tests
from e2e_decode import Shape, model_shape, rms_norm, rope  # noqa: E402
from multigpu_attention import KV_BITS, RESIDUAL, KvSpec, LayerCache, merge_ranks, merge_splits  # noqa: E402

from kvq_core.provenance import provenance  # noqa: E402

WEIGHT_STD = 0.02  # as e2e_decode: keeps 80 layers' residual stream finite in fp16
#: A point passes its check when layer 0's update (out - x) errs against the fp32 reference by at most twice
#: the error of the same reference math run in the step's dtype (flash-attention's rule), or by this floor:
#: fp16 at 1024 hidden / 128 head_dim errs by ~1.5e-3 (CPU measurement); a wrong shard or merge errs by ~1.
CHECK_FLOOR = {torch.float16: 5e-3, torch.float32: 1e-4}
#: relative difference allowed between a CUDA-graph replay's logits and the eager step's (the same kernels on
#: the same data; only NCCL's reduction order may differ)
GRAPH_TOLERANCE = 1e-3
#: memory a point may plan to use, of the free memory at its start
MEMORY_FILL = 0.95
#: NCCL buffers, CUDA-graph pools, split-KV partial states, allocator slack
WORKSPACE_BYTES = 2 * 2**30
MODES = ("eager", "graph")
PARALLEL = ("tp", "cp")
#: the CSV's provenance columns (kvq_core.provenance), after the measured ones
PROVENANCE_FIELDS = ("device", "gpu_count", "driver", "nccl", "torch", "triton", "commit", "date")
CSV_FIELDS = (
    "model", "parallel", "gpus", "batch", "context", "kv", "mode", "status", "reason",
    "layers_model", "layers_run", "step_us", "p10_us", "p90_us", "head_us", "per_layer_us", "step_us_scaled",
    "collectives_timed", "collectives_per_step", "reps", "check_rel_err", "check_tolerance",
    "weights_bytes_per_gpu", "kv_bytes_per_gpu", *PROVENANCE_FIELDS,
)  # fmt: skip


#: CPU-test shapes, head_dim 16 (the kernels' smallest): GQA with 2 query heads per KV head (KIVI's
#: tensor-core path, as llama-2-70b) and MHA (KIVI's CUDA-core path, as llama-7b)
TINY = {
    "tiny-gqa": Shape("tiny-gqa", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, vocab=128),
    "tiny-mha": Shape("tiny-mha", layers=2, hidden=64, heads=4, kv_heads=4, head_dim=16, ffn=96, vocab=128),
}


def model_names() -> list[str]:
    from kvq_sim.models import model_names as sim_names

    return [*TINY, *sim_names()]


def load_shape(name: str) -> Shape:
    """A `TINY` shape, or a dense model of configs/models/ by exact name (`e2e_decode.model_shape`)."""
    if name in TINY:
        return TINY[name]
    if name not in model_names():
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(model_names())}")
    return model_shape(name)


@dataclass(frozen=True)
class Layout:
    """How the step is cut over `world` GPUs ("tp" or "cp"), seen from GPU `rank`."""

    parallel: str
    world: int
    rank: int

    @property
    def tp(self) -> int:
        return self.world if self.parallel == "tp" else 1

    @property
    def cp(self) -> int:
        return self.world if self.parallel == "cp" else 1

    @property
    def shard(self) -> int:
        """Index of this GPU's weight shard (0 when weights are replicated)."""
        return self.rank if self.tp > 1 else 0

    @property
    def collectives_per_layer(self) -> int:
        return 2 if self.tp > 1 else 1 if self.cp > 1 else 0

    def why_invalid(self, s: Shape, context: int, kv: str) -> str | None:
        if self.tp > 1 and (s.heads % self.tp or s.kv_heads % self.tp):
            return f"tp {self.tp} does not divide {s.heads} heads / {s.kv_heads} KV heads"
        if self.tp > 1 and s.ffn % self.tp:
            return f"tp {self.tp} does not divide the MLP width {s.ffn}"
        unit = self.cp * (RESIDUAL if KV_BITS[kv] < 16 else 1)
        if self.cp > 1 and context % unit:
            return f"cp {self.cp} with {kv} needs a context multiple of {unit}"
        if KV_BITS[kv] < 16 and context % RESIDUAL:
            return f"{kv} needs a context multiple of {RESIDUAL}"
        return None

    def kv_spec(self, s: Shape, batch: int, context: int, kv: str) -> KvSpec:
        """The cache this GPU holds per layer."""
        if self.cp > 1:
            return KvSpec(kv, batch, s.kv_heads, s.head_dim, context // self.cp, self.rank == self.world - 1)
        return KvSpec(kv, batch, s.kv_heads // self.tp, s.head_dim, context, True)


def layer_weight_bytes(s: Shape, tp: int) -> int:
    """fp16 bytes of one layer's weights on one GPU: 2 norms, QKV, O, gate + up, down."""
    q, kv, f = s.heads // tp * s.head_dim, s.kv_heads // tp * s.head_dim, s.ffn // tp
    return 2 * (2 * s.hidden + s.hidden * (q + 2 * kv) + q * s.hidden + s.hidden * 2 * f + f * s.hidden)


def head_weight_bytes(s: Shape, tp: int) -> int:
    """fp16 bytes of the final norm and this GPU's vocabulary slice of the LM head."""
    return 2 * (s.hidden + s.hidden * math.ceil(s.vocab / tp))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one GPU needs for a point running `layers_run` layers."""

    layers_run: int
    weights_bytes: int
    kv_bytes: int
    workspace_bytes: int  # WORKSPACE_BYTES + activations
    check_bytes: int  # the check's peak above the weights: layer 0's cache + the reference's inputs

    @property
    def need_bytes(self) -> int:
        """The check runs before the other layers' caches exist: the peak is the larger of the two phases."""
        return self.weights_bytes + self.workspace_bytes + max(self.kv_bytes, self.check_bytes)


def plan_memory(s: Shape, lay: Layout, batch: int, context: int, kv: str, layers: int | None, free_bytes: int):
    """(MemoryPlan, None) or (None, why it does not fit). layers None: all if they fit, else as many as fit."""
    tp = lay.tp
    kv_layer = lay.kv_spec(s, batch, context, kv).layer_bytes()
    w_layer = layer_weight_bytes(s, tp)
    widest = 2 * s.ffn // tp + math.ceil(s.vocab / tp) + (s.heads + 2 * s.kv_heads) // tp * s.head_dim
    workspace = WORKSPACE_BYTES + 8 * batch * widest * 4
    rows = min(batch, 2)
    check = kv_layer + (
        3 * layer_weight_bytes(s, 1)  # full layer-0 weights regenerated for the reference, fp16 and fp32
        + rows * 2 * s.kv_heads * (context + 1) * s.head_dim * 4 * 2  # gathered fp32 K, V (+ the local part)
    )
    budget = int(free_bytes * MEMORY_FILL) - head_weight_bytes(s, tp) - workspace
    fit = min(budget // (w_layer + kv_layer), (budget - check) // w_layer)
    n = min(s.layers, fit) if layers is None else min(layers, s.layers)
    if n < 1 or n > fit:
        n = max(1, n)
        plan = MemoryPlan(n, n * w_layer + head_weight_bytes(s, tp), n * kv_layer, workspace, check)
        usable = free_bytes * MEMORY_FILL / 2**30
        return None, f"needs {plan.need_bytes / 2**30:.1f} GiB for {n} layer(s), {usable:.1f} GiB usable"
    return MemoryPlan(n, n * w_layer + head_weight_bytes(s, tp), n * kv_layer, workspace, check), None


def full_layer(s: Shape, seed: int, device, dtype) -> dict[str, torch.Tensor]:
    """Unsharded random weights of one layer, [in, out] (x @ w); the same on every GPU for one seed."""
    g = torch.Generator(device=device).manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).mul_(WEIGHT_STD)

    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return dict(
        wq=w(s.hidden, q), wk=w(s.hidden, kv), wv=w(s.hidden, kv), wo=w(q, s.hidden),
        wg=w(s.hidden, s.ffn), wu=w(s.hidden, s.ffn), wd=w(s.ffn, s.hidden),
    )  # fmt: skip


def shard_layer(full: dict[str, torch.Tensor], s: Shape, lay: Layout) -> dict[str, torch.Tensor]:
    """This GPU's Megatron shard of a layer: QKV and gate/up split by output columns (heads, MLP width),
    O and down by input rows; fused as [q | k | v] and [gate | up]. Replicated (a copy) when tp = 1."""
    r, tp = lay.shard, lay.tp
    q, kv, f = s.heads // tp * s.head_dim, s.kv_heads // tp * s.head_dim, s.ffn // tp
    ones = torch.ones(s.hidden, device=full["wq"].device, dtype=full["wq"].dtype)
    return dict(
        n1=ones,
        wqkv=torch.cat([full["wq"][:, r * q : (r + 1) * q], full["wk"][:, r * kv : (r + 1) * kv],
                        full["wv"][:, r * kv : (r + 1) * kv]], 1),  # [hidden, (Hq + 2 Hkv) D / tp]
        wo=full["wo"][r * q : (r + 1) * q].clone(),  # [Hq D / tp, hidden]
        n2=ones.clone(),
        wgu=torch.cat([full["wg"][:, r * f : (r + 1) * f], full["wu"][:, r * f : (r + 1) * f]], 1),
        wd=full["wd"][r * f : (r + 1) * f].clone(),  # [ffn / tp, hidden]
    )  # fmt: skip


def head_shard(s: Shape, lay: Layout, device, dtype) -> dict[str, torch.Tensor]:
    """Final norm and this GPU's vocabulary columns of the LM head [hidden, vocab / tp]."""
    g = torch.Generator(device=device).manual_seed(1 << 20)
    w = torch.randn(s.hidden, s.vocab, device=device, dtype=dtype, generator=g).mul_(WEIGHT_STD)
    v = math.ceil(s.vocab / lay.tp)
    return dict(
        norm=torch.ones(s.hidden, device=device, dtype=dtype), w=w[:, lay.shard * v : (lay.shard + 1) * v].clone()
    )


class DecodeStep:
    """One decode step on one GPU: `layers` layers (caller-built shards and caches), then norm + LM head."""

    def __init__(self, s: Shape, lay: Layout, layers, head, caches: list[LayerCache], batch: int, context: int):
        self.s, self.lay, self.layers, self.head, self.caches = s, lay, layers, head, caches
        w = head["w"]
        g = torch.Generator(device=w.device).manual_seed(2)
        self.x = torch.randn(batch, s.hidden, device=w.device, dtype=w.dtype, generator=g)  # same on every GPU
        self.pos = torch.full((batch,), context, device=w.device)  # the new token's position

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.lay.tp > 1:
            dist.all_reduce(t)

    def attention(self, c: LayerCache, q: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D] -> [B, Hq, D]: over this GPU's heads (tp), or merged over every GPU's tokens (cp)."""
        if self.lay.cp == 1:
            return c.attend(q)
        state = merge_splits(*c.state(q))  # [B * Hq, D + 2] fp32
        states = torch.empty(self.lay.world * state.shape[0], state.shape[1], device=q.device)
        dist.all_gather_into_tensor(states, state)
        return merge_ranks(states.view(self.lay.world, *state.shape), torch.empty_like(q))

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        L, c, s = self.layers[i], self.caches[i], self.s
        b, d = x.shape[0], s.head_dim
        hq, hkv = s.heads // self.lay.tp, s.kv_heads // self.lay.tp
        h = rms_norm(x, L["n1"]) @ L["wqkv"]
        q, k, v = h.split([hq * d, hkv * d, hkv * d], -1)
        q = rope(q.view(b, hq, 1, d), self.pos, s.rope_theta)  # [B, Hq, 1, D]
        k = rope(k.view(b, hkv, 1, d), self.pos, s.rope_theta)
        c.append(k[:, :, 0], v.view(b, hkv, d))
        o = self.attention(c, q.view(b, hq, d))
        a = o.reshape(b, hq * d) @ L["wo"]  # this GPU's heads' share of the projection (tp)
        self.all_reduce(a)
        x = x + a
        gate, up = (rms_norm(x, L["n2"]) @ L["wgu"]).chunk(2, -1)
        mlp = (F.silu(gate) * up) @ L["wd"]
        self.all_reduce(mlp)
        return x + mlp

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.head["norm"]) @ self.head["w"]

    def __call__(self) -> torch.Tensor:
        x = self.x
        for i in range(len(self.layers)):
            x = self.layer(i, x)
        return self.logits(x)

    def head_only(self) -> torch.Tensor:
        return self.logits(self.x)


def reference_layer(s: Shape, full, x, pos, k_old, v_old, dtype=torch.float32) -> torch.Tensor:
    """The spec: one layer on one process in `dtype` (fp32 for the reference). full: `full_layer` weights;
    x [R, hidden]; pos [R]; k_old, v_old [R, kv_heads, T, head_dim] the cached tokens; returns [R, hidden]."""
    r, d, kvh = x.shape[0], s.head_dim, s.kv_heads
    group = s.heads // kvh
    w = {name: t.to(dtype) for name, t in full.items()}
    ones = torch.ones(s.hidden, device=x.device, dtype=dtype)
    x = x.to(dtype)
    xn = rms_norm(x, ones)
    q = rope((xn @ w["wq"]).view(r, s.heads, 1, d), pos, s.rope_theta)
    k = rope((xn @ w["wk"]).view(r, kvh, 1, d), pos, s.rope_theta)
    v = (xn @ w["wv"]).view(r, kvh, 1, d)
    k_old, v_old = k_old.to(dtype), v_old.to(dtype)  # no copy in fp32
    q = q.view(r, kvh, group, d)  # query head j reads KV head j // group
    # scores over the cached tokens, then the new token's (no concatenated copy of a long cache)
    scores = torch.cat(
        [torch.einsum("rkgd,rktd->rkgt", q, k_old), torch.einsum("rkgd,rkd->rkg", q, k[:, :, 0])[..., None]], -1
    )
    p = torch.softmax(scores / math.sqrt(d), -1)  # [R, Hkv, group, T + 1]
    o = torch.einsum("rkgt,rktd->rkgd", p[..., :-1], v_old) + p[..., -1:] * v  # v: [R, Hkv, 1, D]
    o = o.reshape(r, s.heads * d)
    x = x + o @ w["wo"]
    xn = rms_norm(x, ones)
    return x + (F.silu(xn @ w["wg"]) * (xn @ w["wu"])) @ w["wd"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def gather_to_rank0(t: torch.Tensor, lay: Layout) -> list[torch.Tensor] | None:
    """Every GPU's `t` (same shape) on rank 0, in rank order; None on the other ranks."""
    if lay.world == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(lay.world)] if lay.rank == 0 else None
    dist.gather(t.contiguous(), parts, dst=0)
    return parts


def check_layer(step: DecodeStep, device) -> tuple[float, float]:
    """(error, tolerance) of layer 0's update (out - x) on rows 0 and B - 1 against `reference_layer` on the
    gathered weights and KV: relative L2 error, and max(2 x the step-dtype reference's own error, the floor).
    Every GPU returns rank 0's numbers."""
    s, lay = step.s, step.lay
    rows = sorted({0, step.x.shape[0] - 1})
    out = step.layer(0, step.x)
    k_old, v_old = step.caches[0].old_kv(rows)  # [R, Hkv / tp, T / cp, D] fp32
    ks, vs = gather_to_rank0(k_old, lay), gather_to_rank0(v_old, lay)
    result = torch.zeros(2, dtype=torch.float64, device=device)
    if lay.rank == 0:
        axis = 1 if lay.tp > 1 else 2  # tp: heads in rank order; cp: tokens in rank order
        k_all, v_all = torch.cat(ks, axis), torch.cat(vs, axis)  # [R, Hkv, T, D]
        del ks, vs, k_old, v_old
        full = full_layer(s, 0, device, step.x.dtype)
        x, pos = step.x[rows], step.pos[rows]
        ref = reference_layer(s, full, x, pos, k_all, v_all).double() - x.double()
        low = reference_layer(s, full, x, pos, k_all, v_all, x.dtype).double() - x.double()
        got = out[rows].double() - x.double()
        result[0] = rel_err(got, ref)
        result[1] = max(2 * rel_err(low, ref), CHECK_FLOOR[x.dtype])
        del full, k_all, v_all
    if lay.world > 1:
        dist.broadcast(result, 0)
    return float(result[0]), float(result[1])


def all_reduce_values(values: list[float], op, device) -> list[float]:
    """Element-wise reduction of a few numbers over GPUs (identity on one)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op)
    return t.tolist()


def capture(fn) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A CUDA graph of fn() (collectives included), warmed up on a side stream first, and its output tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def time_us(fn, rep_s: float, device) -> tuple[float, float, float, int]:
    """(median, p10, p90) microseconds of fn() over CUDA-event timed calls, each the maximum over GPUs, and
    the repetitions. Every GPU runs the same count (the collectives pair up): from the slowest GPU's estimate."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    (est_us,) = all_reduce_values([start.elapsed_time(end) * 1e3 / 3], dist.ReduceOp.MAX, device)
    reps = int(min(500, max(20, rep_s * 1e6 / max(est_us, 1.0))))
    for _ in range(max(3, reps // 10)):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for a, b in zip(starts, ends):
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    us = sorted(a.elapsed_time(b) * 1e3 for a, b in zip(starts, ends))
    pick = [us[len(us) // 2], us[int(0.1 * (len(us) - 1))], us[int(0.9 * (len(us) - 1))]]
    med, p10, p90 = all_reduce_values(pick, dist.ReduceOp.MAX, device)
    return med, p10, p90, reps


def parse_list(text: str, valid=None, kind=int) -> list:
    items = [kind(x) for x in text.split(",") if x]
    if valid is not None:
        bad = [x for x in items if x not in valid]
        if bad:
            raise SystemExit(f"unknown value(s) {', '.join(map(str, bad))}; valid: {', '.join(valid)}")
    return items


def planned_points(args, world: int) -> list[tuple[str, int, int, str]]:
    """(parallel, batch, context, kv) in run order; one GPU runs the tp baseline only (cp = tp there)."""
    parallels = ["tp"] if world == 1 else args.parallel
    return [(p, b, c, kv) for p in parallels for kv in args.kv for b in args.batch for c in args.context]


def dry_run(args, s: Shape) -> int:
    world = args.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        free, where = torch.cuda.mem_get_info()[0], "free on this GPU"
    else:
        free, where = int(args.mem_gib * 2**30), "--mem-gib"
    print(f"{s.name}: {s.layers} layers, {world} GPU(s), {free / 2**30:.1f} GiB per GPU ({where})")
    print(
        f"{'par':>3} {'batch':>5} {'context':>7} {'kv':>5} {'layers':>6} {'weights':>8} {'kv GiB':>8} {'need':>7}  note"
    )
    for parallel, batch, context, kv in planned_points(args, world):
        lay = Layout(parallel, world, world - 1)  # the last GPU holds the most (cp: the new token)
        why = lay.why_invalid(s, context, kv)
        plan, why = (None, why) if why else plan_memory(s, lay, batch, context, kv, args.layers, free)
        if plan is None:
            print(f"{parallel:>3} {batch:>5} {context:>7} {kv:>5} {'-':>6} {'':>8} {'':>8} {'':>7}  skip: {why}")
            continue
        g = 2**30
        print(
            f"{parallel:>3} {batch:>5} {context:>7} {kv:>5} {plan.layers_run:>6} {plan.weights_bytes / g:>8.2f} "
            f"{plan.kv_bytes / g:>8.2f} {plan.need_bytes / g:>7.2f}"
        )
    return 0


def run_point(args, s: Shape, lay: Layout, batch: int, context: int, kv: str, device, dtype) -> list[dict]:
    """Rows (one per mode) of one point: skipped, failed, or timed."""
    base = dict(
        model=s.name, parallel=lay.parallel, gpus=lay.world, batch=batch, context=context, kv=kv,
        layers_model=s.layers, collectives_per_step=s.layers * lay.collectives_per_layer,
    )  # fmt: skip
    modes = ["check"] if args.check_only else args.modes
    why = lay.why_invalid(s, context, kv)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else int(args.mem_gib * 2**30)
    (free,) = all_reduce_values([free], dist.ReduceOp.MIN, device)
    plan = None
    if why is None:
        plan, why = plan_memory(s, lay, batch, context, kv, args.layers, int(free))
    # the GPUs' plans differ by one cp token: run the fewest layers any GPU can hold
    (n,) = all_reduce_values([plan.layers_run if plan else 0], dist.ReduceOp.MIN, device)
    if why is None and n < 1:
        why = "another GPU cannot hold one layer"
    if why is not None:
        return [dict(base, mode=m, status="skipped", reason=why) for m in modes]
    n = int(n)
    spec = lay.kv_spec(s, batch, context, kv)
    layers = []
    for i in range(n):
        full = full_layer(s, i, device, dtype)
        layers.append(shard_layer(full, s, lay))
        del full
    head = head_shard(s, lay, device, dtype)

    def cache(i: int) -> LayerCache:
        return LayerCache(spec, s.heads // lay.tp, 100 + i * lay.world + lay.rank, device, dtype)

    caches = [cache(0)]  # the other layers' caches come after the check has freed its reference
    step = DecodeStep(s, lay, layers, head, caches, batch, context)
    err, tol = check_layer(step, device)
    caches += [cache(i) for i in range(1, n)]
    base.update(
        layers_run=n,
        collectives_timed=n * lay.collectives_per_layer,
        weights_bytes_per_gpu=sum(t.nbytes for w in [*layers, head] for t in w.values()),
        kv_bytes_per_gpu=sum(c.nbytes for c in caches),
        check_rel_err=f"{err:.2e}",
        check_tolerance=f"{tol:.2e}",
    )
    if not err <= tol:
        why = f"layer 0 off the fp32 reference by {err:.2e} > {tol:.2e}"
        return [dict(base, mode=m, status="failed", reason=why) for m in modes]
    if args.check_only:
        return [dict(base, mode="check", status="ok")]
    rows = []
    for mode in modes:
        if dist.is_initialized():
            dist.barrier()
        fn, head_fn = step, step.head_only
        if mode == "graph":
            (graph, logits), (head_graph, _) = capture(step), capture(step.head_only)
            fn, head_fn = graph.replay, head_graph.replay
            # the replay must compute what the eager step computes (same kernels, data and collectives)
            eager = step().float()
            graph.replay()
            (diff,) = all_reduce_values([rel_err(logits.float(), eager)], dist.ReduceOp.MAX, device)
            if not diff <= GRAPH_TOLERANCE:
                rows.append(dict(base, mode=mode, status="failed", reason=f"graph replay off eager by {diff:.2e}"))
                continue
        med, p10, p90, reps = time_us(fn, args.rep_s, device)
        head_us, _, _, _ = time_us(head_fn, args.rep_s / 4, device)
        per_layer = (med - head_us) / n
        rows.append(dict(
            base, mode=mode, status="ok", step_us=f"{med:.1f}", p10_us=f"{p10:.1f}", p90_us=f"{p90:.1f}",
            head_us=f"{head_us:.1f}", per_layer_us=f"{per_layer:.2f}", step_us_scaled=f"{head_us + s.layers * per_layer:.1f}",
            reps=reps,
        ))  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'par':>3} {'gpus':>4} {'batch':>5} {'context':>7} {'kv':>5} {'mode':>5} {'layers':>6} "
        f"{'step_us':>9} {'full_step_us':>12}  status"
    )
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        print(
            f"{r['parallel']:>3} {r['gpus']:>4} {r['batch']:>5} {r['context']:>7} {r['kv']:>5} {r['mode']:>5} "
            f"{r.get('layers_run', '-'):>6} {r.get('step_us', '-'):>9} {r.get('step_us_scaled', '-'):>12}  {status}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="llama-7b",
        help="a configs/models name (llama-7b, llama-2-70b, ...) or tiny-gqa / tiny-mha (CPU test)",
    )
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--context", default="4096,32768,131072")
    ap.add_argument("--kv", default="fp16,kivi4,kivi2", help=f"of {', '.join(KV_BITS)}")
    ap.add_argument("--parallel", default="tp,cp", help="tp and/or cp (one GPU runs the tp baseline only)")
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--layers", default="auto", help="layers to run: a number, or auto (all that fit)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="no new point starts after this many seconds")
    ap.add_argument("--rep-s", type=float, default=1.0, help="seconds of timed calls per point and mode")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="directory of the CSV")
    ap.add_argument("--check-only", action="store_true", help="check every point, time none; exit 1 on a failure")
    ap.add_argument("--dry-run", action="store_true", help="list the planned points and their memory, run none")
    ap.add_argument("--gpus", type=int, default=0, help="--dry-run: GPUs to plan for (default WORLD_SIZE or 1)")
    ap.add_argument("--mem-gib", type=float, default=79.0, help="memory per GPU when there is no GPU to ask")
    args = ap.parse_args(argv)
    args.batch, args.context = parse_list(args.batch), parse_list(args.context)
    args.kv = parse_list(args.kv, list(KV_BITS), str)
    args.parallel = parse_list(args.parallel, list(PARALLEL), str)
    args.modes = parse_list(args.modes, list(MODES), str)
    args.layers = None if args.layers == "auto" else int(args.layers)
    try:
        s = load_shape(args.model)
    except ValueError as e:
        ap.error(str(e))
    if args.dry_run:
        return dry_run(args, s)

    t0 = time.time()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), torch.float16
        torch.cuda.set_device(device)
        if world > 1:
            dist.init_process_group("nccl", device_id=device)
    else:
        if not args.check_only or os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("without a GPU only --check-only runs, under TRITON_INTERPRET=1 (fp32, gloo)")
        device, dtype = torch.device("cpu"), torch.float32
        if world > 1:
            dist.init_process_group("gloo")
    prov = provenance(fields=PROVENANCE_FIELDS)
    path = Path(args.out) / f"multigpu_decode_{s.name}_{world}gpu.csv"
    rows: list[dict] = []
    fh = writer = None
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "w", newline="")
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, restval="")
        writer.writeheader()
    stopped = False
    for parallel, batch, context, kv in planned_points(args, world):
        lay = Layout(parallel, world, rank)
        (over,) = all_reduce_values([float(time.time() - t0 > args.budget_s)], dist.ReduceOp.MAX, device)
        stopped = stopped or over > 0
        if stopped:
            new = [dict(model=s.name, parallel=parallel, gpus=world, batch=batch, context=context, kv=kv, mode=m,
                        layers_model=s.layers, status="not_run", reason=f"--budget-s {args.budget_s:g} spent")
                   for m in (["check"] if args.check_only else args.modes)]  # fmt: skip
        else:
            new = run_point(args, s, lay, batch, context, kv, device, dtype)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if dist.is_initialized():
                dist.barrier()
        rows += new
        if writer:
            writer.writerows(dict(r, **prov) for r in new)
            fh.flush()
            for r in new:
                if r["mode"] in ("check", args.modes[0]):
                    print(f"{parallel} {world} GPU(s) batch {batch} context {context} {kv}: {r['status']} "
                          f"{r.get('check_rel_err', '')} {r.get('reason', '')}", flush=True)  # fmt: skip
    if fh:
        fh.close()
        print_table(rows)
        print(f"wrote {len(rows)} rows to {path} in {time.time() - t0:.0f} s")
    failed = any(r["status"] == "failed" for r in rows)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
