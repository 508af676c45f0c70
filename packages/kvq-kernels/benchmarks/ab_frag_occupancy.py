"""A/B of the fragment kernel's one-warp launches (GPU; not a test): BLOCK_N 64 and 32 with and without a register
cap (Triton's maxnreg), which sets how many programs an SM holds; on a tree whose kernel takes SUMS_MMA (4387655:
the softmax and value-zero sums as MMAs of ones instead of per-token tiles) each launch both ways. Prints a table
last, writes $OUT/ab17_h200.csv with provenance (reports/measurements/ab_frag_occupancy_h200.csv).

    python packages/kvq-kernels/benchmarks/ab_frag_occupancy.py 4,2,3
"""

import csv
import os
import sys

import pandas as pd

import kvq_kernels.decode_kivi as dk
from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.benchmarking import kv_bytes, time_kivi

orig, knob = dk.kernel_call, {"cap": None, "mma": True}


def kc(*a, **k):
    fn, args, kw = orig(*a, **k)
    if fn is dk._decode_kivi_frag_kernel:
        if "SUMS_MMA" in fn.arg_names:
            kw = dict(kw, SUMS_MMA=knob["mma"])
        if knob["cap"]:
            kw["maxnreg"] = knob["cap"]
    return fn, args, kw


dk.kernel_call = kc
CFG = {
    4: [(64, 1, 3, None), (64, 1, 3, 168), (32, 1, 3, None), (32, 1, 3, 168), (32, 1, 4, 168), (32, 1, 3, 128)],
    3: [(64, 1, 2, None), (64, 1, 2, 168), (32, 1, 2, None), (32, 1, 2, 168), (32, 1, 3, 168)],
}
CFG[2] = CFG[4]
PTS = [(8, 1, 131072), (8, 8, 32768), (8, 32, 4096), (32, 1, 131072)]
rows, prov = [], provenance(fields=CSV_FIELDS)
out = os.path.join(os.environ["OUT"], "ab17_h200.csv")
for bits in [int(b) for b in sys.argv[1].split(",")]:
    for hkv, batch, t in PTS:
        for bn, w, s, cap in CFG[bits]:
            for mma in (False, True) if "SUMS_MMA" in dk._decode_kivi_frag_kernel.arg_names else (False,):
                knob.update(cap=cap, mma=mma)
                try:
                    us, plan = time_kivi(
                        batch, 32, hkv, t, bits, 128, ("frag", bn, w, s, True), kv_bytes(bits, batch, hkv, t, 128)
                    )
                except Exception as e:  # a launch that does not fit is a row, not a stop
                    print("fail", bits, hkv, batch, t, bn, w, s, cap, mma, repr(e)[:200], flush=True)
                    continue
                rows.append(
                    dict(
                        q_heads=32,
                        kv_heads=hkv,
                        bits=bits,
                        batch=batch,
                        context=t,
                        block_n=bn,
                        warps=w,
                        stages=s,
                        maxnreg=cap or 0,
                        sums_mma=int(mma),
                        resident=plan.resident_programs,
                        splits=plan.splits,
                        time_us=round(us, 2),
                        **prov,
                    )
                )
                print(
                    bits,
                    hkv,
                    batch,
                    t,
                    (bn, w, s, cap),
                    mma,
                    plan.resident_programs,
                    plan.splits,
                    round(us, 1),
                    flush=True,
                )
                with open(out, "w", newline="") as f:
                    wr = csv.DictWriter(f, fieldnames=list(rows[0]))
                    wr.writeheader()
                    wr.writerows(rows)
d = pd.DataFrame(rows)
d["pt"] = d.kv_heads.astype(str) + "/" + d.batch.astype(str) + "x" + (d.context // 1024).astype(str) + "K"
d["cfg"] = (
    d.block_n.astype(str) + ":" + d.stages.astype(str) + ":" + d.maxnreg.astype(str) + ":r" + d.resident.astype(str)
)
print(d.pivot_table(index=["bits", "cfg"], columns=["pt", "sums_mma"], values="time_us").round(1).to_string())
