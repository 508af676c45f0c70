"""Speed of kvq-sim: cold `kvq-sim plan` wall time (subprocess) and a 100,000-point API sweep.

Run: python packages/kvq-sim/benchmarks/bench_speed.py   (targets: plan < 0.5 s cold, sweep < 1 s)
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

PLAN = ["plan", "--model", "llama-7b", "--gpu", "a100-80g", "--bits", "2"]
REPEATS = 5


def cold_plan_seconds() -> list[float]:
    """Wall time of a fresh process running the installed `kvq-sim` script (interpreter start included)."""
    exe = shutil.which("kvq-sim")
    cmd = [exe, *PLAN] if exe else [sys.executable, "-m", "kvq_sim.cli", *PLAN]
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def sweep_seconds() -> tuple[int, list[float]]:
    """4 models x 5 GPUs x 5 methods x 50 contexts x 20 batches = 100,000 points."""
    from kvq_sim.api import sweep

    args = (
        ["llama-7b", "llama-2-13b", "llama-3-8b", "mistral-7b"],
        ["a100-40g", "a100-80g", "l40s", "h100-80g", "h200"],
        [("fp16", None), ("kivi", 2), ("kvquant", 2), ("skvq", "k2v1.5"), ("int", 4)],
        [1024 * i for i in range(1, 51)],
        list(range(1, 21)),
    )
    times, n = [], 0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        n = len(sweep(*args))
        times.append(time.perf_counter() - t0)
    return n, times


def main() -> None:
    plan = cold_plan_seconds()
    n, sw = sweep_seconds()
    print(f"python {sys.version.split()[0]}, {REPEATS} runs each")
    print(
        f"cold `kvq-sim {' '.join(PLAN)}`: median {statistics.median(plan):.3f} s, max {max(plan):.3f} s (target < 0.5 s)"
    )
    print(f"API sweep of {n:,} points: median {statistics.median(sw):.3f} s, first {sw[0]:.3f} s (target < 1 s)")


if __name__ == "__main__":
    main()
