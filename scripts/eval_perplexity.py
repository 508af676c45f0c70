"""Perplexity of SmolLM2-135M on pydoc text with transformers' caches (full, quanto, HQQ, fp8), both protocols.

    python scripts/eval_perplexity.py --protocol decode --start 512 --caches full quanto-4 fp8 hqq-2 quanto-2
    python scripts/eval_perplexity.py --protocol teacher-forced --windows 4 --caches full
    python scripts/eval_perplexity.py --protocol forward --windows 4

Protocols are `kvq_core.eval`'s (its module docstring defines them exactly). REFERENCES.md section 7's
numbers correspond to: forward, 4 windows of 512 from token 0 (15.26); decode, prefill 384 and 128 scored
on the window of 512 tokens starting at token 512 (full cache 11.744). Prints one row per cache (with
the bits per K/V element its tensors held at the end of each window, averaged over windows) and,
with --csv, appends rows with provenance (model file, text, protocol parameters, versions, date, seconds).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from kvq_core.eval import decode_perplexity, forward_perplexity, teacher_forced_perplexity, tokenize
from kvq_core.hf_peers import PEER_CACHES, held_bits_per_element, peer_cache_factory
from kvq_core.models import TEXT_SPLITS, find_smollm2_gguf, load_smollm2, pydoc_text

PROTOCOLS = ("decode", "teacher-forced", "forward")


def _append_csv(path: Path | None, row: dict) -> None:
    """Append one result row (header first if the file is new); written per cache so long runs keep results."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", choices=PROTOCOLS, default="decode")
    p.add_argument("--caches", nargs="+", default=["full"], help=f"any of: {', '.join(PEER_CACHES)}")
    p.add_argument("--split", choices=TEXT_SPLITS, default="evaluation", help="pydoc text split")
    p.add_argument("--text-file", type=Path, help="evaluate this UTF-8 text file instead of pydoc text")
    p.add_argument("--start", type=int, default=0, help="first token of the first window")
    p.add_argument("--windows", type=int, default=None, help="default: 1 for decode, 4 otherwise")
    p.add_argument("--window", type=int, default=512, help="teacher-forced/forward window length (tokens)")
    p.add_argument("--prefill", type=int, default=384, help="decode: prompt tokens prefilled through the cache")
    p.add_argument("--scored", type=int, default=128, help="decode: tokens scored one step at a time")
    p.add_argument("--prefix", type=int, default=1, help="teacher-forced: tokens of the first forward")
    p.add_argument("--chunk", type=int, default=1, help="teacher-forced: tokens per later forward")
    p.add_argument("--csv", type=Path, help="append result rows to this CSV file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    unknown = [c for c in args.caches if c not in PEER_CACHES]
    if unknown:
        p.error(f"unknown cache(s) {unknown}; valid: {', '.join(PEER_CACHES)}")
    windows = args.windows or (1 if args.protocol == "decode" else 4)

    model, tok = load_smollm2()
    text = args.text_file.read_text(encoding="utf-8") if args.text_file else pydoc_text(args.split)
    ids = tokenize(tok, text)
    caches = ["none"] if args.protocol == "forward" else args.caches
    measure = lambda cache: held_bits_per_element(cache, model.config)
    print(f"{'cache':<10} {'protocol':<15} {'ppl':>9} {'bits/elem':>9} {'tokens':>7} {'seconds':>8}")
    for name in caches:
        t0 = time.perf_counter()
        common = dict(windows=windows, start=args.start)
        if args.protocol == "forward":
            r = forward_perplexity(model, ids, window=args.window, **common)
            params = f"window={args.window}"
        elif args.protocol == "teacher-forced":
            r = teacher_forced_perplexity(
                model,
                ids,
                peer_cache_factory(name, model.config),
                window=args.window,
                prefix=args.prefix,
                chunk=args.chunk,
                progress=not args.no_progress,
                measure_cache=measure,
                **common,
            )
            params = f"window={args.window} prefix={args.prefix} chunk={args.chunk}"
        else:
            r = decode_perplexity(
                model,
                ids,
                peer_cache_factory(name, model.config),
                prefill=args.prefill,
                scored=args.scored,
                progress=not args.no_progress,
                measure_cache=measure,
                **common,
            )
            params = f"prefill={args.prefill} scored={args.scored}"
        seconds = time.perf_counter() - t0
        bits = f"{r.cache_measure:.3f}" if r.cache_measure is not None else ""
        print(f"{name:<10} {args.protocol:<15} {r.ppl:>9.3f} {bits:>9} {r.tokens:>7} {seconds:>8.1f}", flush=True)
        _append_csv(
            args.csv,
            {
                "cache": name,
                "protocol": args.protocol,
                "ppl": f"{r.ppl:.4f}",
                "nll": f"{r.nll:.6f}",
                "held_bits_per_element": bits,
                "scored_tokens": r.tokens,
                "windows": r.windows,
                "start": args.start,
                "params": params,
                "text": str(args.text_file) if args.text_file else f"pydoc_text({args.split!r})",
                "model": find_smollm2_gguf().name,
                "seconds": f"{seconds:.1f}",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "cpu": platform.processor() or platform.machine(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
