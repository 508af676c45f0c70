"""kvq's decode kernels beside a quantized-KV decode kernel users would pick instead (GPU; not a test).

    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src python packages/kvq-kernels/benchmarks/bench_peers.py

The peer is FlashInfer's batch decode over a paged KV cache (`flashinfer.BatchDecodeWithPagedKVCacheWrapper`,
installed from the `flashinfer-python` wheel; its kernels are compiled by its JIT with nvcc on first use), with
fp16 KV and with fp8 (e4m3) KV, tensor-core path (`use_tensor_cores=True`, FlashInfer's choice for GQA groups of 4
and more), CUDA-graph mode, pages of `--page-size` tokens. Beside it at every point: torch SDPA flash over fp16
KV, kvq's fp16 kernel and kvq's KIVI 4-bit and 2-bit caches (group 128, `decode_kivi`'s own defaults). Each time is
`kvq_kernels.benchmarking.time_rotation`'s (CUDA-graph replays over fresh copies, L2 flushed), as in
`bench_decode.py`. Before timing, FlashInfer's outputs are checked against an fp64 reference over the same K/V
(fp8: the fp8 values it reads) at odd lengths; a failed check stops the run (exit 1). Writes $OUT/--name with
provenance and prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import math
import os
import sys

import torch

from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.benchmarking import (
    AUTO_CONFIG,
    HEAD_DIM,
    config_name,
    hbm_read_tb_s,
    kv_bytes,
    kvq_fp16_fn,
    kvq_kivi_fn,
    parse_points,
    resolved_config,
    sdpa_fn,
    time_rotation,
)

KV_DTYPES = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}
WORKSPACE_BYTES = 128 * 2**20


def flashinfer_fn(batch, hq, hkv, t, kv: str, page_size: int, lens=None):
    """A FlashInfer decode call (planned, CUDA-graph mode) over a fresh random paged cache of sequences of `lens`
    tokens (default t each); returns (call, q, the cache [pages, 2, page_size, hkv, d], page indptr, lens) for the
    reference check."""
    import flashinfer

    lens = lens or [t] * batch
    pages = [math.ceil(n / page_size) for n in lens]
    cache = torch.randn(sum(pages), 2, page_size, hkv, HEAD_DIM, device="cuda", dtype=torch.float16)
    cache = cache.to(KV_DTYPES[kv])
    indptr = torch.tensor([0, *itertools.accumulate(pages)], dtype=torch.int32, device="cuda")
    indices = torch.arange(sum(pages), dtype=torch.int32, device="cuda")
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(lens, pages)], dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, HEAD_DIM, device="cuda", dtype=torch.float16)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda"),
        "NHD",
        use_cuda_graph=True,
        use_tensor_cores=True,
        paged_kv_indptr_buffer=indptr,
        paged_kv_indices_buffer=indices,
        paged_kv_last_page_len_buffer=last,
    )
    w.plan(indptr, indices, last, hq, hkv, HEAD_DIM, page_size, q_data_type=torch.float16, kv_data_type=KV_DTYPES[kv])
    out = torch.empty_like(q)

    def call():
        return w.run(q, cache, out=out)

    return call, q, cache, indptr, lens


def check_flashinfer(kv: str, page_size: int) -> float:
    """Largest error of FlashInfer's output against fp64 attention over the K/V it reads (odd lengths, GQA 32/8)."""
    hq, hkv, lens = 32, 8, [1, 97, 4099]
    call, q, cache, indptr, lens = flashinfer_fn(len(lens), hq, hkv, max(lens), kv, page_size, lens)
    out = call().double()
    worst = 0.0
    for b, n in enumerate(lens):
        pages = cache[indptr[b] : indptr[b + 1]].double()  # [p, 2, page, hkv, d]
        k = pages[:, 0].reshape(-1, hkv, HEAD_DIM)[:n]
        v = pages[:, 1].reshape(-1, hkv, HEAD_DIM)[:n]
        qb = q[b].double().view(hkv, hq // hkv, HEAD_DIM)
        s = torch.einsum("hgd,thd->hgt", qb, k) / math.sqrt(HEAD_DIM)
        ref = torch.einsum("hgt,thd->hgd", torch.softmax(s, -1), v).reshape(hq, HEAD_DIM)
        worst = max(worst, ((out[b] - ref).abs().max() / ref.abs().max()).item())
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=parse_points, default="1:131072,8:32768,32:4096,1:4096,1:32768,8:131072")
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--name", default="peers_decode.csv", help="CSV file name under $OUT")
    args = ap.parse_args()
    points = args.points
    try:
        hq, hkv = (int(x) for x in args.heads.split("/"))
    except ValueError:
        raise SystemExit(f"--heads: expected Q/KV, got {args.heads!r}") from None
    try:
        import flashinfer
    except ImportError as e:
        print(f"error: flashinfer is not importable ({e}); install the flashinfer-python wheel", file=sys.stderr)
        return 2
    for kv in KV_DTYPES:
        err = check_flashinfer(kv, args.page_size)
        tol = 2e-3 if kv == "fp16" else 2e-2  # fp16 softmax / output rounding; fp8 adds its P rounding
        print(f"correct flashinfer {kv}: max rel err {err:.2e} (tolerance {tol:.0e})", flush=True)
        if not err <= tol:
            print(f"error: flashinfer {kv} output differs from the fp64 reference", file=sys.stderr)
            return 1
    prov = provenance(fields=CSV_FIELDS)
    hbm = hbm_read_tb_s()
    rows = []
    for batch, t in points:
        nb16 = kv_bytes(16, batch, hkv, t, 128)
        impls = {
            "sdpa_flash_fp16": (functools.partial(sdpa_fn, batch, hq, hkv, t), nb16, ""),
            "kvq_fp16": (functools.partial(kvq_fp16_fn, batch, hq, hkv, t), nb16, ""),
        }
        for bits in (4, 2):
            cfg = resolved_config(AUTO_CONFIG, bits, batch, hq, hkv, t, 128)
            impls[f"kvq_kivi{bits}"] = (
                functools.partial(kvq_kivi_fn, batch, hq, hkv, t, bits, 128, cfg),
                kv_bytes(bits, batch, hkv, t, 128),
                config_name(cfg),
            )
        for kv in KV_DTYPES:
            nb = nb16 // (2 if kv == "fp8" else 1)
            make = functools.partial(lambda *a: flashinfer_fn(*a)[0], batch, hq, hkv, t, kv, args.page_size)
            impls[f"flashinfer_{kv}"] = (make, nb, f"tc-page{args.page_size}")
        sdpa_us = None
        for impl, (make, nb, cfg) in impls.items():
            try:
                us = time_rotation(make, nb)
            except torch.OutOfMemoryError:
                print(f"skip {impl} batch {batch} context {t}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            sdpa_us = us if impl == "sdpa_flash_fp16" else sdpa_us
            rows.append(
                dict(
                    **prov, impl=impl, q_heads=hq, kv_heads=hkv, head_dim=HEAD_DIM, batch=batch, context=t,
                    bytes_read=nb, time_us=round(us, 2), eff_bw_tb_s=round(nb / us / 1e6, 3),
                    frac_of_hbm_read=round(nb / us / 1e6 / hbm, 4), hbm_read_tb_s=round(hbm, 3),
                    speedup_vs_sdpa=round(sdpa_us / us, 4) if sdpa_us else "", config=cfg,
                    flashinfer=flashinfer.__version__,
                )
            )  # fmt: skip
            print(f"{impl:16s} B{batch:<3d} T{t:<7d} {us:9.1f} us  {nb / us / 1e6:5.2f} TB/s", flush=True)
            torch.cuda.empty_cache()
        with open(os.path.join(os.environ.get("OUT", "."), args.name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(f"\nflashinfer {flashinfer.__version__}, streaming read {hbm:.2f} TB/s; speedup vs SDPA flash fp16:")
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    print(f"{'batch':>5s} {'context':>8s} " + " ".join(f"{i:>16s}" for i in impls))
    for batch, t in points:
        got = {r["impl"]: r for r in rows if (r["batch"], r["context"]) == (batch, t)}
        cells = [f"{got[i]['time_us']:8.1f} {got[i]['speedup_vs_sdpa'] or 0:5.2f}x" if i in got else "-" for i in impls]
        print(f"{batch:5d} {t:8d} " + " ".join(f"{c:>16s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
