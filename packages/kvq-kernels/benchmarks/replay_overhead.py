"""GPU benchmark (not a test): the start cost of a CUDA-graph replay, and what it adds to a per-call time.

    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src KVQ_COMMIT=<sha> \
        python packages/kvq-kernels/benchmarks/replay_overhead.py --out $OUT

bench_decode times a point as one replay of a graph over `rotation_copies` cache copies divided by the
copies, so a fixed per-replay cost lands whole on points of >= 256 MB (one copy) and in 1/32 on the
smallest. This script measures, per point: the single-pass time / copies, the differential time
((two passes - one pass) / copies, which cancels any per-replay cost), and the replay of a graph
holding one tiny kernel. Writes replay_overhead_h100.csv.
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
from flush_effect import make

from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.benchmarking import capture, kv_bytes, median_us, rotation_copies, time_rotation

POINTS = [
    (impl, 16, 1, 32, 8, t) for t in (4096, 16384, 65536, 131072, 1048576) for impl in ("sdpa_flash_fp16", "kvq_fp16")
] + [
    ("kvq_kivi", 4, 1, 32, 8, 65536),
    ("kvq_kivi", 4, 1, 32, 8, 1048576),
    ("sdpa_flash_fp16", 16, 1, 32, 32, 4096),
    ("sdpa_flash_fp16", 16, 1, 32, 32, 16384),
    ("sdpa_flash_fp16", 16, 8, 32, 8, 4096),
    ("sdpa_flash_fp16", 16, 8, 32, 8, 65536),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--commit", default=None, help="default: this checkout's (KVQ_COMMIT outside one)")
    args = ap.parse_args()
    prov = provenance(args.commit, CSV_FIELDS)
    print(prov)
    x = torch.zeros(1, device="cuda")
    tiny = capture([lambda: x.add_(1)])
    empty_us = median_us(tiny.replay)
    print(f"replay of a one-kernel graph (read flush before): {empty_us:.2f} us")
    path = os.path.join(args.out, "replay_overhead_h100.csv")
    fields = [*prov, "impl", "bits", "batch", "q_heads", "kv_heads", "context", "kv_bytes", "copies",
              "single_us", "differential_us", "one_kernel_replay_us"]  # fmt: skip
    rows = []
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for impl, bits, batch, hq, hkv, t in POINTS:
            nbytes = kv_bytes(bits, batch, hkv, t, 128)
            fn = make(impl, bits, batch, hq, hkv, t)
            single = min(time_rotation(fn, nbytes) for _ in range(2))
            diff = min(time_rotation(fn, nbytes, differential=True) for _ in range(2))
            copies = rotation_copies(nbytes)
            rows.append((impl, bits, batch, hq, hkv, t, nbytes, copies, single, diff))
            w.writerow(dict(prov, impl=impl, bits=bits, batch=batch, q_heads=hq, kv_heads=hkv, context=t,
                            kv_bytes=nbytes, copies=copies, single_us=f"{single:.2f}", differential_us=f"{diff:.2f}",
                            one_kernel_replay_us=f"{empty_us:.2f}"))  # fmt: skip
            fh.flush()
            torch.cuda.empty_cache()
    print(f"\n{'impl':<16} {'bits':>4} {'batch':>5} {'heads':>6} {'context':>8} {'KV MiB':>7} {'copies':>6} "
          f"{'single us':>10} {'diff us':>10} {'single-diff':>11}")  # fmt: skip
    for impl, bits, batch, hq, hkv, t, nbytes, copies, single, diff in rows:
        print(f"{impl:<16} {bits:>4} {batch:>5} {hq}/{hkv:<3} {t:>8} {nbytes / 2**20:>7.0f} {copies:>6} "
              f"{single:>10.1f} {diff:>10.1f} {single - diff:>11.2f}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
