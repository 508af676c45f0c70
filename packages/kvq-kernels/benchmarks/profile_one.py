"""Run one decode-attention shape a few times, for a profiler (not a test, not a benchmark).

    ncu --clock-control none --kernel-name regex:decode_kivi --launch-skip 2 --launch-count 1 \\
        python packages/kvq-kernels/benchmarks/profile_one.py --bits 4 --heads 32/8 --context 131072

(--kernel-name regex:_combine profiles the split merge that follows each launch.)
"""

from __future__ import annotations

import argparse

import torch

from kvq_kernels.benchmarking import HEAD_DIM, random_kivi
from kvq_kernels.decode_kivi import decode_kivi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--heads", default="32/32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument(
        "--config", default="default", help="path,BLOCK_N,num_warps,num_stages, or 'default' (what decode_kivi picks)"
    )
    args = ap.parse_args()
    hq, hkv = (int(x) for x in args.heads.split("/"))
    if args.config == "default":
        launch = {}
    else:
        path, bn, warps, stages = args.config.split(",")
        launch = dict(block_n=int(bn), num_warps=int(warps), num_stages=int(stages), path=path)
    q = torch.randn(args.batch, hq, HEAD_DIM, device="cuda", dtype=torch.float16)
    c = random_kivi(args.batch, hkv, args.context, args.bits, args.group)
    for _ in range(4):
        decode_kivi(q, c, validate_lens=False, **launch)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
