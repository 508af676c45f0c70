"""Residual plot of `kvq-sim validate`: held-out prediction error against KV bytes read, per kernel family.

    python scripts/validation_residuals.py --gpu h100-80g \
        --measurements reports/measurements/kernel_decode_h100_v5.csv [--e2e ...] -o reports/validation_residuals.png
"""

from __future__ import annotations

import argparse
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kvq_sim.calibrate import check_device  # noqa: E402
from kvq_sim.hardware import load_hardware  # noqa: E402
from kvq_sim.measurements import read_e2e_csv, read_kernel_csv  # noqa: E402
from kvq_sim.validate import KERNEL_MIN_KV_BYTES, KERNEL_WORST_MAX_PCT, validate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", required=True)
    ap.add_argument("--measurements", required=True)
    ap.add_argument("--e2e", default=None)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)
    hw = load_hardware(args.gpu)
    device = check_device(hw)
    kpts, kprov = read_kernel_csv(args.measurements, device)
    epts = read_e2e_csv(args.e2e, device)[0] if args.e2e else None
    rep = validate(hw, kpts, epts)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for fam in sorted({p.group for p in rep.kernel}):
        ps = [p for p in rep.kernel if p.group == fam]
        ax.scatter([p.kv_bytes / 1e6 for p in ps], [p.err_pct for p in ps], s=14, label=fam)
    if rep.e2e:
        ax.scatter(
            [p.kv_bytes / 1e6 for p in rep.e2e], [p.err_pct for p in rep.e2e], marker="*", s=80, c="k", label="e2e step"
        )
    ax.set_xscale("log")
    ax.axvline(KERNEL_MIN_KV_BYTES / 1e6, color="grey", lw=0.8, ls=":")
    for y in (KERNEL_WORST_MAX_PCT, -KERNEL_WORST_MAX_PCT):
        ax.axhline(y, color="red", lw=0.8, ls="--")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("KV bytes read per launch (MB; dotted: 64 MiB threshold)")
    ax.set_ylabel("predicted / measured - 1 (%)")
    ax.set_title(f"{hw.name}: held-out points, {kprov.path} @ {kprov.commit}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output} ({len(rep.kernel)} kernel, {len(rep.e2e)} e2e held-out points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
