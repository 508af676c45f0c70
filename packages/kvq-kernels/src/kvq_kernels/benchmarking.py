"""GPU benchmark helpers: decode kernel timing with L2 flushed, bandwidth ceilings, and the kernel-decode CSV sweep.

Each point is timed as the median of CUDA-graph replays, with L2 flushed between replays by *reading* a
256 MB buffer (`median_us`); shapes whose KV is under 256 MB are replayed as a rotation over several cache
copies, so no timing reads a KV that sits in the 50 MB L2. The flush reads rather than writes (triton's
do_bench zeroes a buffer): a write flush leaves up to 50 MB of dirty lines that the timed kernel must write
back to HBM (packages/kvq-kernels/benchmarks/flush_effect.py measures the difference); in a model's decode
step the attention kernel follows weight reads, which leave L2 clean. Effective bandwidth = bytes the kernel must read (codes,
scales, zeros, fp16 rings; q) / time. Used by `kvq-bench` (bench_cli.py) and
packages/kvq-kernels/benchmarks/ (bench_decode.py, tune_decode.py, ...).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import sys
import time

import torch
import triton
import triton.runtime.errors

from kvq_kernels.decode_fp16 import FP16_WARPS_STAGES, decode_fp16, decode_reference, fp16_plan
from kvq_kernels.decode_kivi import decode_kivi, decode_kivi_reference, kernel_path, launch_config, launch_plan
from kvq_kernels.kivi_layout import allocate, quant_rows

HEAD_DIM = 128
ROTATE_BYTES = 256 * 2**20  # 5x the 50 MB L2
BITS = (16, 8, 4, 3, 2)
CONTEXTS = (1024, 4096, 16384, 65536, 131072, 524288, 1048576)
#: Extra contexts at small batches, where the kernels split the context over programs (FlashAttention's
#: split-KV kernel runs below ~211 rows): kvq-sim fits that regime's fixed and streaming terms on them.
SPLIT_REGIME_CONTEXTS = (8192, 32768, 262144)
SPLIT_REGIME_MAX_BATCH = 8
BATCHES = (1, 8, 32, 64, 256)
HEADS = ((32, 32), (32, 8))  # (query heads, kv heads)


def fill_random(c, generator: torch.Generator | None = None):
    """Fill a KIVI cache (`kivi_layout.KiviCache`) with random contents and return it: random bytes (all valid
    codes), scales and zeros that keep dequantized values ~ N(0, 1)-sized, normal fp16 window and sink tokens.
    Lengths are left to the caller."""
    span = 1.0 if c.codebook is not None else 2.0 / (2**c.bits - 1)
    for x in (c.k_codes, c.v_codes):
        x.random_(0, 256, generator=generator)
    for x in (c.k_scale, c.v_scale):
        x.uniform_(0.5 * span, span, generator=generator)
    for x in (c.k_zero, c.v_zero):
        x.uniform_(-1.5, -0.5, generator=generator)
    for x in (c.k_res, c.v_win, c.k_sink, c.v_sink):
        x.normal_(generator=generator)
    return c


#: fp16 residual window of the benchmarks' KIVI caches (random_kivi)
RESIDUAL = 128


def random_kivi(batch, kv_heads, tokens, bits, group, residual=RESIDUAL, sinks=0, nuq=False):
    """A KIVI cache holding `tokens` random tokens per sequence (`fill_random`)."""
    cb = torch.sort(torch.rand(2**bits, device="cuda") * 2 - 1).values.half() if nuq else None
    c = allocate(batch, kv_heads, HEAD_DIM, tokens, bits, group, residual, sinks, device="cuda", codebook=cb)
    fill_random(c)
    c.lens.fill_(tokens)
    return c


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


#: correctness shapes: (query heads, kv heads, lens, capacity): GQA with a 1-token and an odd-length
#: sequence, GQA 9/3, MHA
CORRECTNESS_SHAPES = ((32, 8, (1, 97, 4099), 4100), (9, 3, (300, 5000), 5000), (32, 32, (2048,), 2048))
#: KIVI variants checked per bit width: (group, sinks, nuq)
CORRECTNESS_VARIANTS = ((32, 4, False), (128, 0, False), (32, 0, True))


def correctness(bits_list=(8, 4, 3, 2), shapes=CORRECTNESS_SHAPES, variants=CORRECTNESS_VARIANTS) -> None:
    """Every kernel against its fp64 torch reference on random data (fp16 always, KIVI at `bits_list` in each
    of `variants`), at each of `shapes`; exits non-zero on an error above 2e-3. Each distinct shape and variant
    compiles its own kernels: a sweep that times only some of them checks those (kvq-bench --quick)."""
    torch.manual_seed(0)
    rows = []
    for hq, hkv, lens, cap in shapes:
        b = len(lens)
        q = torch.randn(b, hq, HEAD_DIM, device="cuda", dtype=torch.float16)
        k = torch.randn(b, hkv, cap, HEAD_DIM, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        L = torch.tensor(lens, dtype=torch.int32, device="cuda")
        e = rel_err(decode_fp16(q, k, v, L), decode_reference(q, k, v, L))
        rows.append(("fp16", hq, hkv, list(lens), e))
        for bits in [b for b in bits_list if b != 16]:
            for group, sinks, nuq in variants:
                c = random_kivi(b, hkv, cap, bits, group, RESIDUAL, sinks, nuq)
                c.lens.copy_(L)
                e = rel_err(decode_kivi(q, c), decode_kivi_reference(q, c))
                rows.append((f"kivi{bits} G{group} S{sinks}{' nuq' if nuq else ''}", hq, hkv, list(lens), e))
    worst = max(r[-1] for r in rows)
    for r in rows:
        print(f"correct {r[0]:<22} heads {r[1]}/{r[2]} lens {r[3]}: rel err {r[4]:.2e}")
    if not worst < 2e-3:  # fp16 operands: 1e-3 .. 1e-2 expected for pure bf16; fp16 dot with fp32 acc lands ~5e-4
        sys.exit(f"correctness FAILED: worst relative error {worst:.2e}")
    print(f"correctness ok: worst relative error {worst:.2e}")


def hbm_read_tb_s(rep_ms: float = 200.0) -> float:
    """Streaming-read ceiling: torch sum over 4 GiB, TB/s."""
    x = torch.randn(2**30, device="cuda", dtype=torch.float32)  # 4 GiB
    us = median_us(x.sum, rep_ms=rep_ms)
    del x
    return 2**32 / (us * 1e-6) / 1e12


def copy_tb_s(rep_ms: float = 200.0) -> float:
    """Device-to-device copy of 2 GiB, counted as bytes read + bytes written per second, TB/s."""
    src = torch.empty(2**29, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    us = median_us(functools.partial(dst.copy_, src), rep_ms=rep_ms)
    del src, dst
    return 2 * 2**31 / (us * 1e-6) / 1e12


def matmul_tflops(n: int = 8192, rep_ms: float = 200.0) -> float:
    """Dense bf16 matmul peak: median time of an n x n x n product of random matrices, 2 n^3 FLOP per run."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    us = median_us(functools.partial(torch.mm, a, b, out=c), rep_ms=rep_ms)
    del a, b, c
    return 2 * n**3 / (us * 1e-6) / 1e12


@functools.cache
def _flush_buffer() -> torch.Tensor:
    return torch.ones(ROTATE_BYTES // 4, device="cuda", dtype=torch.float32)


def release_flush_buffer() -> None:
    """Free `flush_l2`'s 256 MB buffer (the next flush allocates it again): before a measurement of peak memory."""
    _flush_buffer.cache_clear()
    torch.cuda.empty_cache()


def flush_l2(mode: str = "read") -> None:
    """Evict L2: "read" leaves it holding clean lines of a 256 MB buffer, "write" (do_bench's) dirty ones."""
    buf = _flush_buffer()
    if mode == "read":
        buf.sum()
    elif mode == "write":
        buf.zero_()
    else:
        raise ValueError(f"flush mode must be 'read' or 'write', not {mode!r}")


def median_us(fn, flush: str = "read", warmup_ms: float = 10.0, rep_ms: float = 60.0) -> float:
    """Median microseconds of fn() over CUDA-event timed runs, L2 flushed (`flush_l2`) before each."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        fn()
    n = max(5, int(rep_ms / est_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush_l2(flush)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2] * 1e3


def rotation_copies(nbytes: int) -> int:
    """Cache copies a replay rotates over so that consecutive reads of one copy are >= 256 MB apart."""
    return max(1, min(32, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def capture(fns, passes: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph calling every fn in order, `passes` times over (fns warmed up on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm-up: compiles, allocator pools
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(passes):
            for f in fns:
                f()
    return graph


def time_rotation(make_fn, nbytes: int, flush: str = "read", differential: bool = False, rep_ms: float = 60.0) -> float:
    """Median microseconds of one call: a CUDA graph over `rotation_copies(nbytes)` fresh inputs.

    differential=False: one pass's replay time / copies (includes 1/copies of the replay's own start
    cost). differential=True: (two passes - one pass) / copies, which cancels the per-replay cost.
    """
    copies = rotation_copies(nbytes)
    fns = [make_fn() for _ in range(copies)]
    one = capture(fns)
    us = median_us(one.replay, flush, rep_ms=rep_ms)
    del one
    if differential:
        two = capture(fns, passes=2)
        us = median_us(two.replay, flush, rep_ms=rep_ms) - us
        del two
    del fns
    return us / copies


#: torch SDPA backends a benchmark can pin (`sdpa_fn`); "default" leaves the choice to torch's dispatcher
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "default")


def sdpa_fn(batch, hq, hkv, t, backend: str = "flash"):
    """A call of torch SDPA over a fresh fp16 cache on one backend (`SDPA_BACKENDS`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {backend!r}; choose from {', '.join(SDPA_BACKENDS)}")
    q = torch.randn(batch, hq, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, hkv, t, HEAD_DIM, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    pinned = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(backend)  # fmt: skip

    def f():
        if pinned is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != hq)
        with sdpa_kernel(pinned):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != hq)

    return f


def kvq_fp16_fn(batch, hq, hkv, t, splits=None):
    """kvq's fp16 decode kernel over random K/V of `t` tokens; splits None is decode_fp16's own rule. The call's
    `plan` attribute is its `decode_fp16.Fp16Plan`."""
    q = torch.randn(batch, hq, HEAD_DIM, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, hkv, t, HEAD_DIM, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    L = torch.full((batch,), t, dtype=torch.int32, device="cuda")

    def f():
        return decode_fp16(q, k, v, L, splits=splits, validate_lens=False)

    f.plan = fp16_plan(q, k, v, L, splits, FP16_BLOCK_N, t)
    return f


def time_fp16(batch, hq, hkv, t, nbytes: int, rep_ms: float = 60.0, splits=None):
    """(`time_rotation` microseconds of `kvq_fp16_fn` calls, the `Fp16Plan` they ran)."""
    return _time_planned(functools.partial(kvq_fp16_fn, batch, hq, hkv, t, splits), nbytes, rep_ms)


def _time_planned(make_fn, nbytes: int, rep_ms: float):
    """(`time_rotation` microseconds of the calls `make_fn` makes, the `plan` attribute of the first)."""
    plans = []

    def make():
        f = make_fn()
        plans.append(f.plan)
        return f

    return time_rotation(make, nbytes, rep_ms=rep_ms), plans[0]


def config_kwargs(config) -> dict:
    """decode_kivi's keyword arguments of a launch config (path, BLOCK_N, num_warps, num_stages, prefetch)."""
    path, block_n, warps, stages, prefetch = config
    return dict(path=path, block_n=block_n, num_warps=warps, num_stages=stages, prefetch=prefetch)


def kvq_kivi_fn(batch, hq, hkv, t, bits, group, config=("tc", 64, 4, 3, True), splits=None):
    """A decode_kivi call over a fresh random cache with one launch config; splits: None for decode_kivi's rule.
    The call's `plan` attribute is its `decode_kivi.LaunchPlan`."""
    q = torch.randn(batch, hq, HEAD_DIM, device="cuda", dtype=torch.float16)
    c = random_kivi(batch, hkv, t, bits, group)
    kw = dict(validate_lens=False, splits=splits, **config_kwargs(config))

    def f():
        return decode_kivi(q, c, **kw)

    f.plan = launch_plan(q, c, **kw)
    return f


#: (path, BLOCK_N, num_warps, num_stages, prefetch) tried per bit width and head layout at batch 1, 128K
#: context: MHA runs the CUDA-core kernel (decode_kivi_simt; prefetch = next tile's codes loaded ahead),
#: GQA the tensor-core slices (decode_kivi; prefetch unused). Candidates from tune_decode.py runs.
PROBE_CONFIGS = {
    "simt": (("simt", 32, 4, 1, True), ("simt", 32, 4, 1, False), ("simt", 64, 4, 1, True), ("simt", 64, 4, 1, False)),
    "tc": (("tc", 64, 4, 3, True), ("tc", 128, 4, 1, True), ("tc", 128, 8, 2, True), ("tc", 64, 4, 2, True),
           ("tc", 128, 4, 2, True)),
}  # fmt: skip


def resolved_config(cfg, bits: int, batch: int, q_heads: int, kv_heads: int, context: int, group: int) -> tuple:
    """The launch config a call with `cfg` runs at one point: AUTO_CONFIG resolved as decode_kivi resolves it
    (its kernel_path, with max_len = the quantized capacity of random_kivi's cache, and launch_config); any other
    config unchanged."""
    if cfg[0] != "auto":
        return cfg
    quant_capacity = quant_rows(context, RESIDUAL)  # random_kivi's cache: capacity = context
    rows = batch * kv_heads
    path = kernel_path("auto", bits, q_heads, kv_heads, HEAD_DIM, False, quant_capacity, group)
    return (path, *launch_config(path, bits, group, rows, quant_capacity), cfg[4])


def time_kivi(batch, hq, hkv, t, bits, group, cfg, nbytes: int, rep_ms: float = 60.0, splits=None):
    """(`time_rotation` microseconds of `kvq_kivi_fn` calls, the `LaunchPlan` they ran)."""
    return _time_planned(functools.partial(kvq_kivi_fn, batch, hq, hkv, t, bits, group, cfg, splits), nbytes, rep_ms)


def plan_tag(plan) -> str:
    """The launch's resident programs per SM (when computed) and its splits, as a config-tag suffix: -r4-sp64."""
    return (f"-r{plan.resident_programs}" if plan.resident_programs else "") + f"-sp{plan.splits}"


def config_name(cfg) -> str:
    name = "{}-bn{}-w{}-s{}".format(*cfg[:4])
    return name + ("-pf" if cfg[0] == "simt" and cfg[4] else "")


def probe(bits_list, group, heads) -> dict:
    """Pick the fastest kernel config per (bits, q_heads, kv_heads) at one large point (batch 1, 128K)."""
    best = {}
    for hq, hkv in heads:
        path = "simt" if hq == hkv else "tc"
        for bits in bits_list:
            if bits == 16:
                continue
            times = {}
            for cfg in PROBE_CONFIGS[path]:
                if group % cfg[1]:
                    continue
                try:
                    fn = functools.partial(kvq_kivi_fn, 1, hq, hkv, 131072, bits, group, cfg)
                    times[cfg] = time_rotation(fn, kv_bytes(bits, 1, hkv, 131072, group))
                except triton.runtime.errors.OutOfResources as e:  # e.g. shared memory of deep pipelines
                    print(f"probe {bits}-bit {cfg}: skipped ({e})")
            best[(bits, hq, hkv)] = min(times, key=times.get)
            print(
                f"probe {hq}/{hkv} {bits}-bit: "
                + ", ".join(f"{config_name(c)}: {us:.0f} us" for c, us in times.items())
                + f" -> {config_name(best[(bits, hq, hkv)])}"
            )
    return best


#: the launch config of a call that leaves path, BLOCK_N, warps and stages to decode_kivi (its `auto` dispatch)
AUTO_CONFIG = ("auto", None, None, None, True)


def default_configs(bits_list, group, heads) -> dict:
    """What `decode_kivi` runs without launch arguments, per (bits, q_heads, kv_heads): AUTO_CONFIG, so the path
    (`decode_kivi.kernel_path`) and its `launch_config` are chosen per call as a user's call chooses them. No
    probe."""
    return {(bits, hq, hkv): AUTO_CONFIG for hq, hkv in heads for bits in bits_list if bits != 16}


def parse_points(text: str) -> list[tuple[int, int]]:
    """'1:1024,32:4096' -> (batch, context) points, for a benchmark's argparse `type=`: a malformed list is an
    argparse error (one line, exit 2)."""
    try:
        pts = [(int(b), int(t)) for b, t in (item.split(":") for item in text.split(","))]
    except ValueError:
        pts = []
    if not pts or any(b < 1 or t < 1 for b, t in pts):
        raise argparse.ArgumentTypeError(f"expected batch:context[,...], got {text!r}")
    return pts


def kv_bytes(bits, batch, hkv, t, group, residual=RESIDUAL) -> int:
    """Bytes one decode step must read (KIVI layout; 16 = fp16 K and V), q and out excluded."""
    if bits == 16:
        return 2 * batch * hkv * t * HEAD_DIM * 2
    n_kq, n_vq = t - t % residual, t - min(t, residual)
    row = HEAD_DIM * bits // 8
    per_seq = (n_kq + n_vq) * row + (n_kq // group) * HEAD_DIM * 4 + n_vq * (HEAD_DIM // min(group, HEAD_DIM)) * 4
    per_seq += ((t - n_kq) + (t - n_vq)) * HEAD_DIM * 2
    return batch * hkv * per_seq


#: kernel-decode CSV columns after the provenance ones (`kvq_core.provenance.CSV_FIELDS`); kvq_sim.measurements
#: reads them
KERNEL_FIELDS = (
    "impl", "bits", "group_size", "batch", "q_heads", "kv_heads", "head_dim", "context",
    "bytes_read", "time_us", "eff_bw_tb_s", "frac_of_hbm_read", "hbm_read_tb_s",
    "sdpa_time_us", "speedup_vs_sdpa", "config", "l2_flush",
)  # fmt: skip
#: decode_fp16's default BLOCK_N, and its launch tag (BLOCK_N, warps, stages; `plan_tag` adds resident programs
#: and splits)
FP16_BLOCK_N = 64
FP16_CONFIG = "bn{}-w{}-s{}".format(FP16_BLOCK_N, *FP16_WARPS_STAGES)


def decode_grid(heads, batches, contexts, split_contexts=()) -> list[tuple[int, int, int, int]]:
    """Sweep points (q_heads, kv_heads, batch, context) in sweep order: per head layout and batch, the
    contexts ascending, plus `split_contexts` at batches <= SPLIT_REGIME_MAX_BATCH."""
    points = []
    for hq, hkv in heads:
        for batch in batches:
            extra = split_contexts if batch <= SPLIT_REGIME_MAX_BATCH else ()
            points += [(hq, hkv, batch, t) for t in sorted({*contexts, *extra})]
    return points


def row_bytes(kv_bytes_read: int, batch: int, q_heads: int) -> int:
    """A kernel-decode row's `bytes_read`: `kv_bytes_read` (`kv_bytes`) plus q read and out written, fp16."""
    return kv_bytes_read + 2 * batch * q_heads * HEAD_DIM * 2


def kernel_row(
    prov, impl, bits, group, batch, q_heads, kv_heads, context, kv_bytes_read, time_us, hbm, sdpa_us, config
):
    """One kernel-decode CSV row: `row_bytes` over `time_us`; `hbm` the streaming-read ceiling in TB/s; `sdpa_us`
    SDPA's time at the same point or None."""
    nbytes = row_bytes(kv_bytes_read, batch, q_heads)
    bw = nbytes / (time_us * 1e-6) / 1e12
    sp = sdpa_us / time_us if sdpa_us else None
    return dict(prov, impl=impl, bits=bits, group_size=group if bits < 16 else "", batch=batch, q_heads=q_heads,
                kv_heads=kv_heads, head_dim=HEAD_DIM, context=context, bytes_read=nbytes, time_us=f"{time_us:.2f}",
                eff_bw_tb_s=f"{bw:.4f}", frac_of_hbm_read=f"{bw / hbm:.4f}", hbm_read_tb_s=f"{hbm:.4f}",
                sdpa_time_us=f"{sdpa_us:.2f}" if sdpa_us else "", speedup_vs_sdpa=f"{sp:.4f}" if sp else "",
                config=config, l2_flush="read 256 MB")  # fmt: skip


def sweep(path, prov, hbm, points, bits_list, group, configs, budget_s, t_start, progress=iter, rep_ms=60.0):
    """Time every point of `points` (`decode_grid`) at each of `bits_list` (16: SDPA flash and kvq_fp16)
    and write the CSV rows to `path` as they come. Points whose KV does not fit in free memory are left out;
    the sweep stops at the first point reached `budget_s` seconds after `t_start`. `progress` wraps the
    point iterable (a progress bar); rep_ms: the timed runs per measurement (`median_us`). Returns
    ([(hq, hkv, batch, context, bits, us, TB/s, speedup)], the point the budget stopped at or None)."""
    results = []
    stopped = None
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*prov, *KERNEL_FIELDS])
        w.writeheader()
        for hq, hkv, batch, t in progress(points):
            if time.time() - t_start > budget_s:
                stopped = (hq, hkv, batch, t)
                break
            free = torch.cuda.mem_get_info()[0]
            sdpa_us = None
            for bits in [16, *[b for b in bits_list if b != 16]] if 16 in bits_list else bits_list:
                nbytes = kv_bytes(bits, batch, hkv, t, group)
                if nbytes * 1.15 + 2**30 > free:
                    continue  # does not fit: skipped (the CSV lists the points it holds)
                row = functools.partial(kernel_row, prov, bits=bits, group=group, batch=batch, q_heads=hq,
                                        kv_heads=hkv, context=t, kv_bytes_read=nbytes, hbm=hbm)  # fmt: skip
                if bits == 16:
                    sdpa_us = time_rotation(functools.partial(sdpa_fn, batch, hq, hkv, t), nbytes, rep_ms=rep_ms)
                    w.writerow(row(impl="sdpa_flash_fp16", time_us=sdpa_us, sdpa_us=sdpa_us, config=""))
                    us, plan = time_fp16(batch, hq, hkv, t, nbytes, rep_ms)
                    impl, config = "kvq_fp16", FP16_CONFIG + plan_tag(plan)
                else:
                    cfg = configs[(bits, hq, hkv)]
                    us, plan = time_kivi(batch, hq, hkv, t, bits, group, cfg, nbytes, rep_ms)
                    config = config_name(resolved_config(cfg, bits, batch, hq, hkv, t, group)) + plan_tag(plan)
                    impl = "kvq_kivi"
                r = row(impl=impl, time_us=us, sdpa_us=sdpa_us, config=config)
                w.writerow(r)
                fh.flush()
                bw = r["bytes_read"] / (us * 1e-6) / 1e12
                results.append((hq, hkv, batch, t, bits, us, bw, sdpa_us / us if sdpa_us else None))
                torch.cuda.empty_cache()
    return results, stopped


def print_table(results, hbm, batches, contexts) -> None:
    """The sweep's results at `batches` x `contexts`: time, effective TB/s, % of the read ceiling, vs SDPA."""
    print(
        f"\n{'heads':>6} {'batch':>5} {'context':>8} {'bits':>4} {'time_us':>10} {'TB/s':>6} {'%HBM':>5} {'vs SDPA':>7}"
    )
    for hq, hkv, batch, t, bits, us, bw, sp in results:
        if batch in batches and t in contexts:
            sps = f"{sp:.2f}x" if sp else "-"
            print(f"{hq}/{hkv:<3} {batch:>5} {t:>8} {bits:>4} {us:>10.1f} {bw:>6.2f} {100 * bw / hbm:>5.0f} {sps:>7}")
