"""Launch paths and configs of decode_kivi across contexts and batches (GPU; not a test), each beside SDPA fp16.

    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src python packages/kvq-kernels/benchmarks/tune_paths.py

GQA 32/8 at 2/3/4-bit: the word kernel (tc) at 1 and 2 stages and BLOCK_N 64, and the channel-slice kernel;
MHA 32/32 at 2/4/8-bit: CUDA-core configs. Splits follow decode_kivi's own rule (no `splits` argument), so
each time is what that config costs in a default call; --splits times given split counts beside the rule's. Timing as kvq_kernels.benchmarking.time_rotation (CUDA
graph replays, L2 flushed). Writes $OUT/tune_stages_h100.csv with provenance; decode_kivi's SIMT_CONFIG and
SLICE_MAX_TOKENS cite it.
"""

import argparse
import csv
import functools
import itertools
import os

from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.benchmarking import (
    AUTO_CONFIG,
    kv_bytes,
    parse_points,
    sdpa_fn,
    time_fp16,
    time_kivi,
    time_rotation,
)
from kvq_kernels.decode_kivi import FRAG_CONTAINER_BITS, PATHS, SIMT_CONFIG, WORDS_CONFIG, frag_geometry

GQA_CONFIGS = [("tc", 128, 4, 1, True), ("tc", 128, 4, 2, True), ("tc", 64, 4, 1, True), ("slice", 128, 4, 1, True)]
GQA_POINTS = [(1, 1024), (1, 4096), (8, 1024), (32, 1024), (256, 1024), (1, 32768), (32, 4096)]
MHA_CONFIGS = [("simt", 64, 4, 3, True), ("simt", 32, 4, 1, True), ("simt", 64, 4, 1, False), ("simt", 64, 4, 1, True)]
MHA_POINTS = [(1, 4096), (1, 131072), (32, 4096), (8, 32768)]
#: --wide: more CUDA-core tiles and warp counts (BLOCK_N 16-64, 2-8 warps)
MHA_WIDE = [("simt", 16, 4, 1, True), ("simt", 32, 2, 1, True), ("simt", 32, 8, 1, True), ("simt", 64, 8, 1, True)]
#: --frag: the fragment-dequantizing kernel's launches against each layout's current default (GQA 32/8 and MHA
#: 32/32), at short, long and batched points; --frag-wide adds 2 warps and 3 stages
FRAG_CONFIGS = [
    ("frag", 128, 4, 2, True),
    ("frag", 128, 4, 1, True),
    ("frag", 64, 4, 2, True),
    ("frag", 128, 8, 2, True),
]
FRAG_WIDE = [("frag", 64, 4, 3, True), ("frag", 128, 4, 3, True), ("frag", 64, 2, 2, True), ("frag", 64, 2, 3, True),
             ("frag", 128, 2, 2, True), ("frag", 32, 2, 2, True), ("slice", 128, 4, 1, True)]  # fmt: skip
FRAG_POINTS = [(1, 4096), (1, 32768), (1, 131072), (8, 32768), (32, 4096)]
FRAG_WIDE_POINTS = [(1, 4096), (1, 131072), (8, 32768), (32, 4096)]


def _bits(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b]


def _config(item: str) -> tuple:
    prefetch = not item.endswith(":nopf")
    item = item.removesuffix(":nopf")
    if item == "auto":
        return AUTO_CONFIG[:4] + (prefetch,)
    path, bn, warps, stages = item.split(":")
    return (path, int(bn), int(warps), int(stages), prefetch)


def _configs(text: str) -> list[tuple]:
    """'auto,frag:64:4:3,slice:128:4:1:nopf' -> configs: decode_kivi's own choice (AUTO_CONFIG), or
    path:BLOCK_N:num_warps:num_stages each; a trailing :nopf passes prefetch=False."""
    try:
        cfgs = [_config(item) for item in text.split(",")]
    except ValueError:
        cfgs = []
    if not cfgs or any(c[0] not in PATHS for c in cfgs):
        raise SystemExit(f"--configs: expected auto or path:BLOCK_N:warps:stages[,...], got {text!r}")
    return cfgs


def _splits(text: str) -> list[int | None]:
    """'rule,64,82' -> [None, 64, 82] (None: decode_kivi's own split rule)."""
    try:
        out = [None if item == "rule" else int(item) for item in text.split(",")]
    except ValueError:
        out = []
    if not out or any(s is not None and s < 1 for s in out):
        raise argparse.ArgumentTypeError(f"expected 'rule' or positive split counts, comma-separated; got {text!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gqa-bits", default="4,2,3", help="GQA 32/8 bit widths ('' for none)")
    ap.add_argument("--mha-bits", default="4,2,8", help="MHA 32/32 bit widths ('' for none)")
    ap.add_argument("--wide", action="store_true", help="also the MHA_WIDE CUDA-core configs")
    ap.add_argument("--frag", action="store_true", help="FRAG_CONFIGS against the defaults at FRAG_POINTS instead")
    ap.add_argument("--frag-wide", action="store_true", help="--frag with FRAG_WIDE too, at FRAG_WIDE_POINTS")
    ap.add_argument(
        "--container-bits", type=int, choices=(8, 16), help="the fragment kernel's container width for every bit width"
    )
    ap.add_argument("--configs", help="GQA: these configs only (auto, or path:BLOCK_N:warps:stages; comma-separated)")
    ap.add_argument("--mha-configs", help="MHA: these configs only (as --configs)")
    ap.add_argument("--points", type=parse_points, help="GQA and MHA: these batch:context points")
    ap.add_argument(
        "--splits", type=_splits, default=[None], help="split counts to time, 'rule' for decode_kivi's (default: rule)"
    )
    ap.add_argument(
        "--fp16", action="store_true", help="instead: kvq's fp16 kernel (decode_fp16) at --splits, GQA and MHA points"
    )
    ap.add_argument("--name", default="tune_stages_h100.csv", help="CSV file name under $OUT")
    args = ap.parse_args()
    if args.container_bits:
        for b in FRAG_CONTAINER_BITS:
            FRAG_CONTAINER_BITS[b] = args.container_bits
    mha_configs = MHA_CONFIGS + (MHA_WIDE if args.wide else [])
    gqa_configs, gqa_points, mha_points = GQA_CONFIGS, GQA_POINTS, MHA_POINTS
    rows = []
    prov = provenance(fields=CSV_FIELDS)

    def run(hq, hkv, bits, batch, t, cfgs):
        nb = kv_bytes(bits, batch, hkv, t, 128)
        sd = time_rotation(functools.partial(sdpa_fn, batch, hq, hkv, t), kv_bytes(16, batch, hkv, t, 128))
        for cfg, splits in itertools.product(cfgs, args.splits):
            try:
                us, plan = time_kivi(batch, hq, hkv, t, bits, 128, cfg, nb, splits=splits)
            except Exception as e:  # a config the GPU cannot launch (shared memory, registers)
                print("skip", cfg, type(e).__name__)
                continue
            rows.append(dict(q_heads=hq, kv_heads=hkv, bits=bits, batch=batch, context=t, path=plan.path,
                             block_n=plan.block_n, warps=plan.num_warps, stages=plan.num_stages, prefetch=cfg[4],
                             container_bits=frag_geometry(bits)[0] if plan.path == "frag" else "",
                             split_rule=splits is None, splits=plan.splits, resident=plan.resident_programs,
                             time_us=round(us, 2), sdpa_us=round(sd, 2), **prov))  # fmt: skip
            print(f"{hq}/{hkv} b{bits} B{batch} T{t} {plan}: {us:.1f} us (sdpa {sd:.1f})", flush=True)
        if rows:
            write()  # after every point, so that a run stopped early keeps what it measured

    def write():
        with open(os.path.join(os.environ.get("OUT", "."), args.name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    def run_fp16(hq, hkv, batch, t):
        nb = kv_bytes(16, batch, hkv, t, 128)
        for splits in args.splits:
            us, plan = time_fp16(batch, hq, hkv, t, nb, splits=splits)
            rows.append(dict(q_heads=hq, kv_heads=hkv, bits=16, batch=batch, context=t, path="fp16",
                             split_rule=splits is None, splits=plan.splits, resident=plan.resident_programs,
                             time_us=round(us, 2), tb_s=round(nb / us / 1e6, 3), **prov))  # fmt: skip
            print(f"fp16 {hq}/{hkv} B{batch} T{t} splits {splits or 'rule'} {plan}: {us:.1f} us", flush=True)
        write()

    if args.fp16:
        for (hq, hkv), (batch, t) in itertools.product(((32, 8), (32, 32)), args.points or GQA_POINTS):
            run_fp16(hq, hkv, batch, t)
        return
    frag_configs = FRAG_CONFIGS + (FRAG_WIDE if args.frag_wide else [])
    if args.frag or args.frag_wide:
        gqa_points = mha_points = FRAG_WIDE_POINTS if args.frag_wide else FRAG_POINTS
        gqa_configs = [("tc", *WORDS_CONFIG, True)] + frag_configs
    if args.configs:
        gqa_configs = _configs(args.configs)
    if args.points:
        gqa_points = mha_points = args.points
    for bits, (batch, t) in itertools.product(_bits(args.gqa_bits), gqa_points):
        run(32, 8, bits, batch, t, gqa_configs)
    for bits, (batch, t) in itertools.product(_bits(args.mha_bits), mha_points):
        cfgs = [("simt", *SIMT_CONFIG[bits], True)] + frag_configs if (args.frag or args.frag_wide) else mha_configs
        if args.mha_configs:
            cfgs = _configs(args.mha_configs)
        run(32, 32, bits, batch, t, cfgs)


if __name__ == "__main__":
    main()
