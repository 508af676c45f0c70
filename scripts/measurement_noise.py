"""Run-to-run noise of a committed measurement: the same script run twice, points matched by shape.

    python scripts/measurement_noise.py reports/measurements/kernel_decode_h100.csv \\
        reports/measurements/kernel_decode_h100_repeat.csv
    python scripts/measurement_noise.py reports/measurements/e2e_decode_h100.csv \\
        reports/measurements/e2e_decode_h100_repeat.csv

Kernel sweep: per implementation and overall, the median / p95 / max of |t_b - t_a| / t_a over matched
points (all points, and those reading >= 64 MiB of KV as the validation gate does). End-to-end steps:
the same for step_us per backend, and the largest difference of max_memory_allocated.
"""

from __future__ import annotations

import sys

import pandas as pd

KEY = ["impl", "bits", "batch", "q_heads", "kv_heads", "context"]
E2E_KEY = ["backend", "bits", "batch", "context"]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: measurement_noise.py FIRST.csv REPEAT.csv", file=sys.stderr)
        return 2
    a, b = (pd.read_csv(p) for p in argv)
    if "step_us" in a.columns:
        return e2e_noise(a, b)
    m = a.merge(b, on=KEY, suffixes=("_a", "_b"))
    m["rel_pct"] = ((m.time_us_b - m.time_us_a) / m.time_us_a * 100).abs()
    print(f"{len(m)} matched points ({a.commit.iloc[0]} {a.date.iloc[0]} vs {b.commit.iloc[0]} {b.date.iloc[0]})")
    for name, x in (("all points", m), (">= 64 MiB of KV", m[m.bytes_read_a >= 64 * 2**20])):
        q = x.rel_pct
        print(f"{name:>16}: median {q.median():.2f}%  p95 {q.quantile(0.95):.2f}%  max {q.max():.2f}%  (n={len(x)})")
    for impl, x in m.groupby("impl"):
        print(f"{impl:>16}: median {x.rel_pct.median():.2f}%  p95 {x.rel_pct.quantile(0.95):.2f}%")
    return 0


def e2e_noise(a: pd.DataFrame, b: pd.DataFrame) -> int:
    m = a.merge(b, on=E2E_KEY, suffixes=("_a", "_b"))
    m["rel_pct"] = ((m.step_us_b - m.step_us_a) / m.step_us_a * 100).abs()
    mem = ((m.max_allocated_bytes_b - m.max_allocated_bytes_a) / m.max_allocated_bytes_a * 100).abs()
    print(f"{len(m)} matched steps ({a.commit.iloc[0]} {a.date.iloc[0]} vs {b.commit.iloc[0]} {b.date.iloc[0]})")
    q = m.rel_pct
    print(f"       all steps: median {q.median():.2f}%  p95 {q.quantile(0.95):.2f}%  max {q.max():.2f}%  (n={len(m)})")
    for backend, x in m.groupby("backend"):
        print(f"{backend:>16}: median {x.rel_pct.median():.2f}%  max {x.rel_pct.max():.2f}%")
    print(f"max_memory_allocated: max difference {mem.max():.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
