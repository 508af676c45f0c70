"""Print the kernel tables (Markdown) of docs/kernels.md and the kvq-kernels README from the benchmark CSV.

python packages/kvq-kernels/benchmarks/summarize.py reports/measurements/kernel_decode_h100_v4.csv
"""

from __future__ import annotations

import csv
import sys

KV_256MB = 256 * 10**6


def load(path: str) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def kvq_rows(rows):
    return [r for r in rows if r["impl"].startswith("kvq")]


def targets(rows) -> str:
    kvq = kvq_rows(rows)

    def point(bits):
        for r in kvq:
            if (int(r["bits"]), int(r["batch"]), int(r["q_heads"]), int(r["kv_heads"]), int(r["context"])) == (
                bits,
                1,
                32,
                32,
                131072,
            ):
                return float(r["speedup_vs_sdpa"])
        return None

    big = [r for r in kvq if int(r["bytes_read"]) >= KV_256MB]
    ok_bw = [r for r in big if float(r["frac_of_hbm_read"]) >= 0.85]
    worst_bw = min(big, key=lambda r: float(r["frac_of_hbm_read"]))
    cmp = [r for r in kvq if r["speedup_vs_sdpa"]]
    slower = [r for r in cmp if float(r["speedup_vs_sdpa"]) < 1.0]
    worst = min(cmp, key=lambda r: float(r["speedup_vs_sdpa"]))
    p4, p2 = point(4), point(2)
    hbm = float(kvq[0]["hbm_read_tb_s"])
    lines = [
        "| target (batch 1, 32 heads, head_dim 128, 128K context unless stated) | goal | measured | met |",
        "| --- | --- | --- | --- |",
        f"| 4-bit (group 128) vs SDPA fp16 | >= 3.3x | {p4:.2f}x | {'yes' if p4 >= 3.3 else 'no'} |",
        f"| 2-bit (group 128) vs SDPA fp16 | >= 6x | {p2:.2f}x | {'yes' if p2 >= 6 else 'no'} |",
        f"| effective bandwidth, points with >= 256 MB read (streaming read {hbm:.2f} TB/s) | >= 85% | "
        f"{len(ok_bw)} of {len(big)} points; worst {100 * float(worst_bw['frac_of_hbm_read']):.0f}% "
        f"({worst_bw['impl']} {worst_bw['bits']}-bit, batch {worst_bw['batch']}, {worst_bw['q_heads']}/{worst_bw['kv_heads']} heads, "
        f"context {worst_bw['context']}) | {'yes' if len(ok_bw) == len(big) else 'no'} |",
        f"| never slower than SDPA fp16 | 0 points slower | {len(slower)} of {len(cmp)} points slower; worst "
        f"{float(worst['speedup_vs_sdpa']):.2f}x ({worst['impl']} {worst['bits']}-bit, batch {worst['batch']}, "
        f"{worst['q_heads']}/{worst['kv_heads']} heads, context {worst['context']}) | {'yes' if not slower else 'no'} |",
    ]
    return "\n".join(lines)


def table(rows, heads: tuple[int, int], batches=(1, 32), contexts=(4096, 131072, 1048576)) -> str:
    bits_list = (16, 8, 4, 3, 2)
    head = "| batch | context | " + " | ".join(f"{b}-bit" if b < 16 else "fp16" for b in bits_list) + " |"
    out = [head, "| --- | --- | " + " | ".join("---" for _ in bits_list) + " |"]
    idx = {
        (int(r["bits"]), int(r["batch"]), int(r["context"])): r
        for r in kvq_rows(rows)
        if (int(r["q_heads"]), int(r["kv_heads"])) == heads
    }
    for b in batches:
        for t in contexts:
            cells = []
            for bits in bits_list:
                r = idx.get((bits, b, t))
                if r is None:
                    cells.append("-")
                    continue
                sp = f"{float(r['speedup_vs_sdpa']):.2f}x" if r["speedup_vs_sdpa"] else "no SDPA"
                cells.append(f"{float(r['time_us']):.0f} us, {sp}, {100 * float(r['frac_of_hbm_read']):.0f}%")
            out.append(f"| {b} | {t // 1024}K | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    rows = load(sys.argv[1] if len(sys.argv) > 1 else "reports/measurements/kernel_decode_h100_v4.csv")
    r0 = rows[0]
    print(f"Measured {r0['date']} on {r0['device']} (driver {r0['driver']}, torch {r0['torch']}, triton {r0['triton']}, "
          f"commit {r0['commit']}); {len(kvq_rows(rows))} kvq points, {len(rows) - len(kvq_rows(rows))} SDPA points.\n")  # fmt: skip
    print(targets(rows))
    for heads in ((32, 32), (32, 8)):
        print(f"\nkvq kernels, {heads[0]}/{heads[1]} heads (time, speedup vs SDPA fp16 flash, % of streaming read):\n")
        print(table(rows, heads))


if __name__ == "__main__":
    main()
