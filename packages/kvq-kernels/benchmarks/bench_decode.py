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

#: The decode targets (H100, head_dim 128, group 128): speedup over SDPA fp16 at batch 1, 128K, per head layout.
SPEEDUP_TARGETS = {(32, 32, 4): 3.3, (32, 32, 2): 5.5, (32, 8, 4): 3.0, (32, 8, 2): 5.0}
#: Least fraction of the streaming read on points reading >= 256 MB, per bit width.
BANDWIDTH_TARGETS = {8: 0.75, 4: 0.75, 3: 0.65, 2: 0.65}


def print_targets(csv_path: str) -> None:
    """The targets above, and never slower than SDPA at >= 16K tokens (>= 0.9x at 4K, batch 1), from a sweep CSV."""
    import csv

    rows = list(csv.DictReader(open(csv_path)))
    kivi = [r for r in rows if r["impl"] == "kvq_kivi"]
    key = lambda r: (int(r["q_heads"]), int(r["kv_heads"]), int(r["batch"]), int(r["context"]), int(r["bits"]))  # noqa: E731
    at = {key(r): r for r in kivi}
    print(f"targets from {csv_path} (commit {rows[0]['commit']}, {rows[0]['device']}):")
    for (hq, hkv, bits), goal in SPEEDUP_TARGETS.items():
        r = at.get((hq, hkv, 1, 131072, bits))
        sp = float(r["speedup_vs_sdpa"]) if r else float("nan")
        print(
            f"  {hq}/{hkv} {bits}-bit batch 1 128K: {sp:.2f}x SDPA (goal >= {goal}x) {'met' if sp >= goal else 'missed'}"
        )
    for hq, hkv in {(k[0], k[1]) for k in SPEEDUP_TARGETS}:
        r3, r4 = at.get((hq, hkv, 1, 131072, 3)), at.get((hq, hkv, 1, 131072, 4))
        if r3 and r4:
            t3, t4 = float(r3["time_us"]), float(r4["time_us"])
            print(
                f"  {hq}/{hkv} 3-bit vs 4-bit batch 1 128K: {t3:.1f} vs {t4:.1f} us {'met' if t3 <= t4 else 'missed'}"
            )
    slow = [r for r in kivi if r["speedup_vs_sdpa"] and int(r["context"]) >= 16384 and float(r["speedup_vs_sdpa"]) < 1]
    print(f"  slower than SDPA at >= 16K: {len(slow)} of {sum(int(r['context']) >= 16384 for r in kivi)} points")
    for r in slow:
        print(
            f"    {r['q_heads']}/{r['kv_heads']} {r['bits']}-bit batch {r['batch']} {r['context']}: {float(r['speedup_vs_sdpa']):.2f}x"
        )
    low = [r for r in kivi if r["batch"] == "1" and r["context"] == "4096" and float(r["speedup_vs_sdpa"]) < 0.9]
    print(
        f"  batch 1 4K under 0.9x SDPA: {len(low)} points "
        + ", ".join(f"{r['q_heads']}/{r['kv_heads']} {r['bits']}-bit" for r in low)
    )
    for bits, goal in BANDWIDTH_TARGETS.items():
        big = [r for r in kivi if int(r["bits"]) == bits and int(r["bytes_read"]) >= 256 * 2**20]
        ok = [r for r in big if float(r["frac_of_hbm_read"]) >= goal]
        worst = min(big, key=lambda r: float(r["frac_of_hbm_read"]), default=None)
        best = max(big, key=lambda r: float(r["frac_of_hbm_read"]), default=None)
        if worst:
            print(f"  {bits}-bit >= 256 MB: {len(ok)} of {len(big)} points at >= {goal:.0%} of the streaming read; "
                  f"range {float(worst['frac_of_hbm_read']):.0%}-{float(best['frac_of_hbm_read']):.0%}")  # fmt: skip


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
    ap.add_argument("--targets", metavar="CSV", help="print the targets met / missed by a sweep CSV and exit (no GPU)")
    ap.add_argument(
        "--configs", choices=("probe", "default"), default="probe", help="probe launch configs, or decode_kivi's"
    )
    args = ap.parse_args()
    if args.targets:
        print_targets(args.targets)
        return
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
