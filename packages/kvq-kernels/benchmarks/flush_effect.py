"""GPU benchmark (not a test): how the L2 flush between timed replays changes decode-kernel timings.

    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src KVQ_COMMIT=<sha> \
        python packages/kvq-kernels/benchmarks/flush_effect.py --out $OUT

Times the same points as bench_decode twice: with L2 evicted by *writing* 256 MB (triton's do_bench
zeroes a buffer, leaving dirty lines the timed kernel must write back) and by *reading* 256 MB (clean
lines, as after a decode step's weight reads). The two modes alternate, twice each; the lower of
each mode's two medians is compared. Writes flush_effect_h100.csv.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os

import torch

from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.benchmarking import kv_bytes, kvq_fp16_fn, kvq_kivi_fn, sdpa_fn, time_rotation

#: (impl, bits, batch, q_heads, kv_heads, context): batch 1 across the 64 MB .. 4 GB range, plus controls.
POINTS = [
    (impl, bits, 1, 32, 8, t)
    for t in (16384, 65536, 131072, 1048576)
    for impl, bits in (("sdpa_flash_fp16", 16), ("kvq_fp16", 16), ("kvq_kivi", 4))
] + [
    ("sdpa_flash_fp16", 16, 1, 32, 32, 16384),
    ("kvq_kivi", 4, 1, 32, 32, 16384),
    ("sdpa_flash_fp16", 16, 8, 32, 8, 4096),
    ("sdpa_flash_fp16", 16, 32, 32, 8, 65536),
]


def make(impl, bits, batch, hq, hkv, t):
    if impl == "sdpa_flash_fp16":
        return functools.partial(sdpa_fn, batch, hq, hkv, t)
    if impl == "kvq_fp16":
        return functools.partial(kvq_fp16_fn, batch, hq, hkv, t)
    path = "simt" if hq == hkv else "tc"
    cfg = ("simt", 32, 4, 1, True) if path == "simt" else ("tc", 64, 4, 3, True)
    return functools.partial(kvq_kivi_fn, batch, hq, hkv, t, bits, 128, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--commit", default=None, help="default: this checkout's (KVQ_COMMIT outside one)")
    args = ap.parse_args()
    prov = provenance(args.commit, CSV_FIELDS)
    print(prov)
    path = os.path.join(args.out, "flush_effect_h100.csv")
    fields = [*prov, "impl", "bits", "batch", "q_heads", "kv_heads", "context", "kv_bytes",
              "write_flush_us", "read_flush_us", "write_over_read"]  # fmt: skip
    rows = []
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for impl, bits, batch, hq, hkv, t in POINTS:
            nbytes = kv_bytes(bits, batch, hkv, t, 128)
            fn = make(impl, bits, batch, hq, hkv, t)
            times = {"write": [], "read": []}
            for mode in ("write", "read", "read", "write"):
                times[mode].append(time_rotation(fn, nbytes, flush=mode))
            wr, rd = (sorted(times[m])[0] for m in ("write", "read"))  # best of two medians per mode
            rows.append((impl, bits, batch, hq, hkv, t, nbytes, wr, rd))
            w.writerow(dict(prov, impl=impl, bits=bits, batch=batch, q_heads=hq, kv_heads=hkv, context=t,
                            kv_bytes=nbytes, write_flush_us=f"{wr:.2f}", read_flush_us=f"{rd:.2f}",
                            write_over_read=f"{wr / rd:.4f}"))  # fmt: skip
            fh.flush()
            torch.cuda.empty_cache()
    print(f"\n{'impl':<16} {'bits':>4} {'batch':>5} {'heads':>6} {'context':>8} {'KV MiB':>7} "
          f"{'write us':>9} {'read us':>9} {'write/read':>10}")  # fmt: skip
    for impl, bits, batch, hq, hkv, t, nbytes, wr, rd in rows:
        print(f"{impl:<16} {bits:>4} {batch:>5} {hq}/{hkv:<3} {t:>8} {nbytes / 2**20:>7.0f} "
              f"{wr:>9.1f} {rd:>9.1f} {wr / rd:>10.3f}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
