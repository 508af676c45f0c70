"""The query group's cost in the fragment kernel (GPU; not a test): the same KV (8 heads, 128K tokens, batch 1) under
32 query heads (a group of 4), 64 (8), and 64 with half of each group's query heads zero (whether the data, and
the clock it sets, matters), 2/3/4-bit, decode_kivi's default launch; prints each time, writes
$OUT/group_effect_h200.csv with provenance (reports/measurements/group_effect_h200.csv).

    python packages/kvq-kernels/benchmarks/group_effect.py

The profiles beside it: ncu --section SourceCounters --page source --print-source sass on profile_one.py
--bits 4 --heads 32/8 (and 64/8) --context 131072 (reports/measurements/ncu_frag_h200/sass/).
"""

import csv
import os

import torch

from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.benchmarking import HEAD_DIM, kv_bytes, random_kivi, time_rotation
from kvq_kernels.decode_kivi import decode_kivi, launch_plan

rows, prov = [], provenance(fields=CSV_FIELDS)
for bits in (4, 2, 3):
    for hq, zero_half in ((32, False), (64, False), (64, True), (32, False)):

        def make(hq=hq, zero_half=zero_half, bits=bits):
            q = torch.randn(1, hq, HEAD_DIM, device="cuda", dtype=torch.float16)
            if zero_half:
                g = hq // 8
                q.view(1, 8, g, HEAD_DIM)[:, :, g // 2 :] = 0
            c = random_kivi(1, 8, 131072, bits, 128)
            f = lambda: decode_kivi(q, c, validate_lens=False)
            f.plan = launch_plan(q, c, validate_lens=False)
            return f

        us = time_rotation(make, kv_bytes(bits, 1, 8, 131072, 128))
        rows.append(
            dict(
                bits=bits,
                q_heads=hq,
                kv_heads=8,
                batch=1,
                context=131072,
                zero_half_group=int(zero_half),
                time_us=round(us, 2),
                **prov,
            )
        )
        print(bits, hq, zero_half, round(us, 2), flush=True)
with open(os.path.join(os.environ["OUT"], "group_effect_h200.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
