"""GPU benchmark (not a test): kvq's decode kernels against every torch SDPA backend, not only flash.

    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src KVQ_COMMIT=<sha> \
        python packages/kvq-kernels/benchmarks/bench_sdpa_backends.py --out $OUT --name sdpa_backends_h100.csv

The kernel sweep (bench_decode.py) compares kvq with SDPA pinned to its flash backend. Left to its dispatcher,
torch picks another backend for a decode query on Hopper (cuDNN attention with torch 2.11), so the baseline a
user gets by default can differ from flash. At each point (32/32 and 32/8 heads, head_dim 128, batch 1/8/32,
4K/32K/128K tokens) this times SDPA pinned to flash, cuDNN and memory-efficient attention, SDPA as dispatched
(the `config` column names the backend torch chose), kvq_fp16 and KIVI 4/2-bit (group 128, decode_kivi's own
launch choice). Each backend's output is first checked against flash on the same inputs. A backend that
refuses a shape is listed, not timed. `speedup_vs_sdpa` is against SDPA as dispatched. Timing, L2 flush and
the CSV schema: kvq_kernels.benchmarking (time_rotation, kernel_row).
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import time

import torch

from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.benchmarking import (
    AUTO_CONFIG,
    FP16_CONFIG,
    HEAD_DIM,
    KERNEL_FIELDS,
    config_name,
    hbm_read_tb_s,
    kernel_row,
    kv_bytes,
    kvq_kivi_fn,
    plan_tag,
    resolved_config,
    sdpa_fn,
    time_fp16,
    time_rotation,
)

HEADS = ((32, 32), (32, 8))
BATCHES = (1, 8, 32)
CONTEXTS = (4096, 32768, 131072)
KIVI_BITS = (4, 2)
GROUP = 128
PINNED = ("flash", "cudnn", "efficient")
#: torch._fused_sdp_choice's return value -> backend name (torch.nn.attention.SDPBackend's order)
CHOICE = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def dispatched(batch, hq, hkv, t) -> str:
    """The backend torch's dispatcher picks for a decode query of this shape."""
    q = torch.empty(batch, hq, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
    k = torch.empty(batch, hkv, t, HEAD_DIM, device="cuda", dtype=torch.float16)
    return CHOICE.get(int(torch._fused_sdp_choice(q, k, k, enable_gqa=hq != hkv)), "unknown")


def agrees_with_flash(backend, batch, hq, hkv, t) -> str | None:
    """None when `backend` matches flash within fp16 rounding on one random input, else why not."""
    torch.manual_seed(0)
    try:
        out = sdpa_fn(batch, hq, hkv, t, backend)()
    except RuntimeError as e:  # a pinned backend that does not support the shape
        return f"not supported: {str(e).splitlines()[0][:120]}"
    torch.manual_seed(0)
    ref = sdpa_fn(batch, hq, hkv, t, "flash")()
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    return None if err < 2e-3 else f"differs from flash: rel err {err:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--commit", default=None)
    ap.add_argument("--name", default="sdpa_backends.csv")
    args = ap.parse_args()
    t0 = time.time()
    prov = provenance(args.commit, CSV_FIELDS)
    print(prov)
    hbm = hbm_read_tb_s()
    print(f"streaming read (torch sum, 4 GiB): {hbm:.3f} TB/s")
    path = os.path.join(args.out, args.name)
    table = []
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*prov, *KERNEL_FIELDS])
        w.writeheader()
        for (hq, hkv), batch, t in ((h, b, c) for h in HEADS for b in BATCHES for c in CONTEXTS):
            fp16 = kv_bytes(16, batch, hkv, t, GROUP)
            if fp16 * 1.3 + 2**30 > torch.cuda.mem_get_info()[0]:
                continue
            row = functools.partial(kernel_row, prov, group=GROUP, batch=batch, q_heads=hq, kv_heads=hkv, context=t,
                                    hbm=hbm)  # fmt: skip
            chosen = dispatched(batch, hq, hkv, t)
            base = time_rotation(functools.partial(sdpa_fn, batch, hq, hkv, t, "default"), fp16)
            times = {"sdpa_default_fp16": base}
            w.writerow(row(impl="sdpa_default_fp16", bits=16, kv_bytes_read=fp16, time_us=base, sdpa_us=base,
                           config=chosen))  # fmt: skip
            for backend in PINNED:
                why = agrees_with_flash(backend, batch, hq, hkv, t)
                if why:
                    print(f"{hq}/{hkv} b{batch} {t}: sdpa {backend} {why}")
                    continue
                us = time_rotation(functools.partial(sdpa_fn, batch, hq, hkv, t, backend), fp16)
                times[f"sdpa_{backend}_fp16"] = us
                w.writerow(row(impl=f"sdpa_{backend}_fp16", bits=16, kv_bytes_read=fp16, time_us=us, sdpa_us=base,
                               config=""))  # fmt: skip
            us, plan = time_fp16(batch, hq, hkv, t, fp16)
            times["kvq_fp16"] = us
            w.writerow(row(impl="kvq_fp16", bits=16, kv_bytes_read=fp16, time_us=us, sdpa_us=base,
                           config=FP16_CONFIG + plan_tag(plan)))  # fmt: skip
            for bits in KIVI_BITS:
                nbytes = kv_bytes(bits, batch, hkv, t, GROUP)
                us = time_rotation(functools.partial(kvq_kivi_fn, batch, hq, hkv, t, bits, GROUP, AUTO_CONFIG), nbytes)
                times[f"kivi{bits}"] = us
                cfg = config_name(resolved_config(AUTO_CONFIG, bits, batch, hq, hkv, t, GROUP))
                w.writerow(row(impl="kvq_kivi", bits=bits, kv_bytes_read=nbytes, time_us=us, sdpa_us=base, config=cfg))
            fh.flush()
            table.append((hq, hkv, batch, t, chosen, times))
            torch.cuda.empty_cache()
    cols = ("sdpa_default_fp16", "sdpa_flash_fp16", "sdpa_cudnn_fp16", "sdpa_efficient_fp16", "kvq_fp16", "kivi4",
            "kivi2")  # fmt: skip
    print(f"\n{'heads':>6} {'batch':>5} {'context':>7} {'torch picks':>11} " + " ".join(f"{c[:12]:>12}" for c in cols))
    for hq, hkv, batch, t, chosen, times in table:
        cells = " ".join(f"{times[c]:>12.1f}" if c in times else f"{'-':>12}" for c in cols)
        print(f"{hq}/{hkv:<3} {batch:>5} {t:>7} {chosen:>11} {cells}")
    print(f"wrote {path} in {time.time() - t0:.0f} s (times in us; speedup_vs_sdpa in the CSV is against dispatch)")


if __name__ == "__main__":
    main()
