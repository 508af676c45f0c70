#!/usr/bin/env bash
# Multi-GPU decode-step sweep on one node (benchmarks/multigpu_decode.py), run on the GPU machine from a clean tree:
#   bash scripts/measure_multigpu.sh <model> <seconds per run> <GPU counts, e.g. "4 2 1"> [parallel modes]
# Each (GPU count, parallelism) is its own torchrun under a hard timeout (a hung collective cannot eat the
# lease); CSVs land in $OUT/mg/<model>_<parallel><N>/, packed into $OUT/mg_<model>.tgz at the end.
set -uo pipefail
model=$1 budget=$2 counts=$3 modes=${4:-"tp cp"}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/packages/kvq-core/src:$PWD/packages/kvq-kernels/src:$PWD/packages/kvq-sim/src
for n in $counts; do
  for p in $modes; do
    [ "$n" = 1 ] && [ "$p" = cp ] && continue
    dir=$OUT/mg/${model}_${p}${n}
    mkdir -p "$dir"
    echo "== $model $p x$n (budget ${budget}s)"
    timeout $((budget + 150)) torchrun --standalone --nproc_per_node "$n" benchmarks/multigpu_decode.py \
      --model "$model" --parallel "$p" --budget-s "$budget" --rep-s 0.5 --out "$dir" >"$dir/log.txt" 2>&1
    echo "rc=$? $(grep -c ',ok,' "$dir"/*.csv 2>/dev/null) ok rows"; tail -4 "$dir/log.txt"
  done
done
tar czf "$OUT/mg_${model}.tgz" -C "$OUT" mg
