"""Deprecated: use the `kvq-eval` command (kvq_core.cli_eval); this wrapper forwards its arguments unchanged.

python scripts/eval_kvq.py --csv reports/quality/kvq_decode.csv kivi:2 kvquant:3 skvq:k2v1.5 ...
== kvq-eval --protocol decode --csv reports/quality/kvq_decode.csv kivi:2 kvquant:3 skvq:k2v1.5 ...
"""

import sys

from kvq_core.cli_eval import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
