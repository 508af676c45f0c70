"""Deprecated: use the `kvq-eval` command (kvq_core.cli_eval); this wrapper maps the old arguments onto it.

    python scripts/eval_perplexity.py --protocol decode --start 512 --caches full quanto-4 fp8 hqq-2 quanto-2
    == kvq-eval --protocol decode --start 512 full quanto:4 fp8 hqq:2 quanto:2

Old defaults are kept (--start 0, --chunk 1). The cache-free `forward` protocol is
`kvq_core.eval.forward_perplexity` (not a cache comparison, so kvq-eval does not run it).
"""

import argparse
import sys

from kvq_core.cli_eval import main
from kvq_core.hf_peers import PEER_CACHES


def translate(argv: list[str]) -> list[str]:
    """Old eval_perplexity.py arguments -> kvq-eval arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", choices=("decode", "teacher-forced"), default="decode")
    p.add_argument("--caches", nargs="+", default=["full"], choices=list(PEER_CACHES))
    p.add_argument("--text-file")
    p.add_argument("--start", default="0")
    p.add_argument("--chunk", default="1")
    args, rest = p.parse_known_args(argv)
    caches = [name if PEER_CACHES[name][1] is None else name.replace("-", ":") for name in args.caches]
    out = ["--protocol", args.protocol, "--start", args.start, "--chunk", args.chunk, *rest, *caches]
    return out + (["--text", args.text_file] if args.text_file else [])


if __name__ == "__main__":
    sys.exit(main(translate(sys.argv[1:])))
