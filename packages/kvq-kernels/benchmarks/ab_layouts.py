"""decode_kivi's default launches across head layouts, bit widths and points (GPU; not a test), for an A/B of two
trees: run it once with each tree on PYTHONPATH (KVQ_COMMIT naming it), alternating, and compare the CSVs by commit.

    python packages/kvq-kernels/benchmarks/ab_layouts.py --heads 32/8,64/8,32/4,32/32 --bits 4,2,3,8 \\
        --points 1:131072,8:32768 --name ab_layouts_new.csv

Timing as kvq_kernels.benchmarking.time_rotation (CUDA graph replays, L2 flushed); writes $OUT/<name> with
provenance and each launch's tag (kernel, tile, warps, stages, resident programs, splits).
"""

import argparse
import csv
import os

from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.benchmarking import AUTO_CONFIG, config_name, kv_bytes, parse_points, plan_tag, time_kivi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="32/8,64/8,32/4,32/32", help="query/kv head layouts")
    ap.add_argument("--bits", default="4,2,3,8")
    ap.add_argument("--points", type=parse_points, default=parse_points("1:131072,8:32768"), help="batch:context")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--name", default="ab_layouts.csv", help="CSV file name under $OUT")
    args = ap.parse_args()
    heads = [tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    prov, rows = provenance(fields=CSV_FIELDS), []
    path = os.path.join(os.environ.get("OUT", "."), args.name)
    for (hq, hkv), bits, (batch, t) in ((h, b, p) for h in heads for b in bits_list for p in args.points):
        us, plan = time_kivi(
            batch, hq, hkv, t, bits, args.group, AUTO_CONFIG, kv_bytes(bits, batch, hkv, t, args.group)
        )
        tag = config_name((plan.path, plan.block_n, plan.num_warps, plan.num_stages, True)) + plan_tag(plan)
        rows.append(dict(q_heads=hq, kv_heads=hkv, bits=bits, batch=batch, context=t, config=tag,
                         time_us=round(us, 2), **prov))  # fmt: skip
        print(f"{hq}/{hkv} {bits}-bit {batch} x {t}: {us:.2f} us ({tag})", flush=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
