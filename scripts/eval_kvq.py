"""Decode-protocol perplexity of SmolLM2-135M with kvq's caches, beside transformers' (scripts/eval_perplexity.py).

    python scripts/eval_kvq.py --csv reports/quality/kvq_decode.csv kivi:2 kvquant:3 skvq:k2v1.5 ...

Same protocol and text as the peers' rows: window of 512 tokens starting at token 512 of
pydoc_text('evaluation'), prefill 384 through the cache, then 128 tokens scored one decode step at
a time. Methods that calibrate (KVQuant codebooks with Fisher weights, SKVQ order and clip, ...) do
so on the first 512 tokens of the disjoint pydoc_text('calibration'). One CSV row per method, with
the average bits the format stores at 512 tokens and the bits the cache actually held.
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

from kvq_core.calibration import calibrate
from kvq_core.eval import decode_perplexity, tokenize
from kvq_core.formats import get_format
from kvq_core.hf_cache import KVQCache
from kvq_core.models import find_smollm2_gguf, load_smollm2, pydoc_text

CALIBRATED = {"kvquant", "kvquant-dense", "skvq", "million", "rotatekv", "cskv", "bfp"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("methods", nargs="+", help="method:bits, e.g. kivi:2 skvq:k2v1.5")
    p.add_argument("--csv", type=Path)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    cfg = model.config
    ids = tokenize(tok, pydoc_text("evaluation"))
    calib_ids = tokenize(tok, pydoc_text("calibration"))[:512][None]
    for spec in args.methods:
        method, _, bits = spec.partition(":")
        fmt = get_format(method, bits or None)
        t0 = time.time()
        state = calibrate(model, calib_ids, fmt=fmt, fisher=True) if method in CALIBRATED else None
        caches = []

        def factory(fmt=fmt, state=state, caches=caches):
            caches.append(KVQCache(fmt=fmt, model=model, calibration=state))
            return caches[-1]

        res = decode_perplexity(model, ids, factory, prefill=384, scored=128, windows=1, start=512, progress=False)
        held = caches[-1].nbytes * 8 / (2 * cfg.num_hidden_layers * 512 * cfg.num_key_value_heads * cfg.head_dim)
        row = dict(
            cache=f"kvq:{fmt.name}",
            method=method,
            bits=bits,
            protocol="decode",
            ppl=round(res.ppl, 4),
            avg_bits=round(fmt.avg_bits(512, cfg.num_key_value_heads, cfg.head_dim), 3),
            held_bits_per_element=round(held, 3),
            scored_tokens=128,
            start=512,
            params="prefill=384 scored=128",
            text="pydoc_text('evaluation')",
            calibration="pydoc_text('calibration')[:512], Fisher" if state is not None else "none",
            model=find_smollm2_gguf().name,
            seconds=round(time.time() - t0, 1),
            torch=torch.__version__,
            transformers=transformers.__version__,
            cpu=platform.machine(),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        print(
            f"{row['cache']:24s} ppl {row['ppl']:9.4f}  avg bits {row['avg_bits']:6.3f}  ({row['seconds']} s)",
            flush=True,
        )
        if args.csv:
            new = not args.csv.exists()
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            with args.csv.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
