"""End-to-end decode step of a LLaMA-7B-shaped model with random fp16 weights, over a quantized KV cache.

The step, its caches and its timing are kvq_kernels.decode_step's (also run by `kvq-bench`): per layer RMSNorm,
fused QKV, RoPE, append of the new token into the cache (for packed caches through the product's quantize
kernels, no host sync), decode attention, output projection, SwiGLU MLP; then the final norm and LM head. The
shape is configs/models/llama-7b.yaml (kvq_sim.calibrate.E2E_MODEL, the model kvq-sim's e2e calibration
assumes) and the packed format kvq_sim.calibrate.E2E_KIVI_GROUP / E2E_KIVI_RESIDUAL, read through kvq_sim.
Timed per step with CUDA graph replays (median of `triton.testing.do_bench`); memory from
`torch.cuda.max_memory_allocated` and the cache tensors' bytes. Writes CSV rows with provenance
(kvq_core.provenance); prints a short table last. Points that do not fit the GPU are left out.

    python benchmarks/e2e_decode.py --out $OUT/e2e_decode.csv [--quick]

Attention backends: `sdpa` (torch SDPA flash, fp16 KV, the baseline), and `kvq`: kvq-kernels' fused kernels
over fp16 and KIVI 4/2-bit caches.
"""

from __future__ import annotations

import argparse
import sys

from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.decode_step import (
    FULL_GRID,
    QUICK_GRID,
    Shape,
    plan,
    print_rows,
    rms_norm,
    rope,
    run_points,
    shape_from_config,
    write_rows,
)

__all__ = ["Shape", "main", "model_shape", "rms_norm", "rope"]  # multigpu_decode imports these


def model_shape(name: str) -> Shape:
    """A model of configs/models/ by exact name, read through kvq_sim (as kvq-sim plans it); dense
    full-attention models without biases only. An unknown name is an error listing the valid ones."""
    from kvq_sim.errors import SimInputError
    from kvq_sim.models import load_model

    try:
        m = load_model(name)
    except SimInputError as e:
        raise ValueError(str(e)) from None
    return shape_from_config(name, m)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="batches 1 and 16, contexts 4K and 32K")
    ap.add_argument("--backends", default="sdpa,kvq")
    args = ap.parse_args(argv)
    from kvq_sim.calibrate import E2E_KIVI_GROUP, E2E_KIVI_RESIDUAL, E2E_MODEL

    batches, contexts = QUICK_GRID if args.quick else FULL_GRID
    points = plan(args.backends.split(","), (16, 4, 2), batches, contexts)
    s = model_shape(E2E_MODEL)
    rows = run_points(s, points, E2E_KIVI_GROUP, E2E_KIVI_RESIDUAL, provenance(fields=CSV_FIELDS))
    write_rows(args.out, rows)
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
