"""GPU benchmark (not a test): kvq decode kernels (fp16, KIVI 8/4/3/2-bit) against torch SDPA fp16 flash.

Run on the GPU machine from the repo root:
    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src KVQ_COMMIT=<sha> \
        python packages/kvq-kernels/benchmarks/bench_decode.py --out $OUT
Steps: the GPU-only kernel tests (tests/test_decode_gpu.py), correctness on the GPU against the fp64 torch
references (random data), a streaming-read ceiling (torch sum over 4 GiB), a launch-config probe per bit
width (or `decode_kivi`'s defaults with --configs default), then the sweep. Timing, L2 flush
and the CSV schema: kvq_kernels.benchmarking (shared with the installed `kvq-bench`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.benchmarking import (
    BATCHES,
    BITS,
    CONTEXTS,
    SPLIT_REGIME_CONTEXTS,
    SPLIT_REGIME_MAX_BATCH,
    correctness,
    decode_grid,
    default_configs,
    hbm_read_tb_s,
    print_table,
    probe,
    sweep,
)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--commit", default=None, help="default: this checkout's (KVQ_COMMIT outside one)")
    ap.add_argument("--group", type=int, default=128, help="KIVI group size (tokens for keys, channels for values)")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument(
        "--split-contexts",
        default=",".join(map(str, SPLIT_REGIME_CONTEXTS)),
        help=f"extra contexts at batch <= {SPLIT_REGIME_MAX_BATCH} ('' for none)",
    )
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--bits", default=",".join(map(str, BITS)))
    ap.add_argument("--heads", default="32/32,32/8")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop the sweep after this many seconds")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--name", default="kernel_decode_h100.csv", help="CSV file name under --out")
    ap.add_argument(
        "--configs", choices=("probe", "default"), default="probe", help="probe launch configs, or decode_kivi's"
    )
    args = ap.parse_args()
    t_start = time.time()
    prov = provenance(args.commit, CSV_FIELDS)
    print(prov)
    if not args.skip_correctness:
        tests = os.path.join(os.path.dirname(__file__), "..", "tests", "test_decode_gpu.py")
        if subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests]).returncode:
            sys.exit("GPU kernel tests FAILED")
        correctness()
    hbm = hbm_read_tb_s()
    print(f"streaming read (torch sum, 4 GiB): {hbm:.3f} TB/s")
    bits_list = [int(b) for b in args.bits.split(",")]
    heads = [tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")]
    if args.configs == "probe":
        configs = probe(bits_list, args.group, heads)
    else:
        configs = default_configs(bits_list, args.group, heads)
        print("configs (decode_kivi defaults):", configs)
    path = os.path.join(args.out, args.name)
    points = decode_grid(heads, _ints(args.batches), _ints(args.contexts), _ints(args.split_contexts))
    results, stopped = sweep(path, prov, hbm, points, bits_list, args.group, configs, args.budget_s, t_start)
    if stopped:
        print(f"sweep stopped by --budget-s at heads {stopped[0]}/{stopped[1]} batch {stopped[2]} context {stopped[3]}")
    print_table(results, hbm, (1, 32), (4096, 131072, 1048576))
    print(f"wrote {len(results)} points to {path} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
