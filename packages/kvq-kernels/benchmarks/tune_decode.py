"""Tune the packed decode kernels' launch configs at one shape (GPU; not a test). Prints one line per config.

    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src \\
        python packages/kvq-kernels/benchmarks/tune_decode.py --bits 4,2 --heads 32/32 --context 131072

A config is path,BLOCK_N,num_warps,num_stages,prefetch,defer,waves (waves: programs per SM-count,
which sets the number of context splits). Timing as in kvq_kernels.benchmarking (CUDA-graph replays, L2 flushed).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math

import torch

from kvq_core.provenance import provenance
from kvq_kernels._launch import num_sms
from kvq_kernels.benchmarking import HEAD_DIM, correctness, kv_bytes, random_kivi, sdpa_fn, time_rotation
from kvq_kernels.decode_kivi import decode_kivi


def kivi_fn(batch, hq, hkv, t, bits, group, cfg):
    path, bn, warps, stages, prefetch, defer, waves = cfg
    q = torch.randn(batch, hq, HEAD_DIM, device="cuda", dtype=torch.float16)
    c = random_kivi(batch, hkv, t, bits, group)
    splits = max(1, min(math.ceil(t / bn), math.ceil(waves * num_sms(q.device) / (batch * hkv))))
    return lambda: decode_kivi(
        q, c, validate_lens=False, block_n=bn, num_warps=warps, num_stages=stages, path=path,
        prefetch=prefetch, defer=defer, splits=splits,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--heads", default="32/32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--path", default="simt")
    ap.add_argument("--block-n", default="32,64")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="1")
    ap.add_argument("--prefetch", default="0,1")
    ap.add_argument("--defer", default="0,1")
    ap.add_argument("--waves", default="4,8,16")
    ap.add_argument("--skip-correctness", action="store_true")
    a = ap.parse_args()
    print(provenance())
    if not a.skip_correctness:
        correctness()  # exits non-zero on a wrong kernel
    hq, hkv = (int(x) for x in a.heads.split("/"))
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    sdpa = time_rotation(
        functools.partial(sdpa_fn, a.batch, hq, hkv, a.context), kv_bytes(16, a.batch, hkv, a.context, 0)
    )
    print(f"sdpa fp16 {hq}/{hkv} batch {a.batch} context {a.context}: {sdpa:.1f} us")
    for bits in ints(a.bits):
        nbytes = kv_bytes(bits, a.batch, hkv, a.context, a.group)
        res = []
        for cfg in itertools.product(
            [a.path], ints(a.block_n), ints(a.warps), ints(a.stages), map(bool, ints(a.prefetch)),
            map(bool, ints(a.defer)), ints(a.waves),
        ):  # fmt: skip
            try:
                us = time_rotation(functools.partial(kivi_fn, a.batch, hq, hkv, a.context, bits, a.group, cfg), nbytes)
            except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is reported, not fatal
                print(f"{bits}-bit {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            res.append((us, cfg))
            print(f"{bits}-bit {cfg}: {us:8.1f} us  {nbytes / us / 1e6:6.2f} TB/s  {sdpa / us:5.2f}x SDPA", flush=True)
        res.sort()
        if res:
            print(f"best {bits}-bit: {res[0][1]} {res[0][0]:.1f} us ({sdpa / res[0][0]:.2f}x SDPA)")


if __name__ == "__main__":
    main()
