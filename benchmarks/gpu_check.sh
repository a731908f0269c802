#!/usr/bin/env bash
# The GPU path proved, in one script (under 8 minutes on one H100 or H200): run it where a CUDA card is visible,
# from the repository root with the project's venv: `bash benchmarks/gpu_check.sh`. It prints
#  1. the card, and raw bf16 inference throughput of EfficientNet-Lite0 against fedtl's extraction (target >= 90%);
#  2. the CUDA tests (pytest -m gpu) passing;
#  3. the default federation (digits, 5 sites, 10 rounds, in process) on the GPU and on the CPU: held-out accuracy
#     of both, which should match within the DP noise of one run (the same seed; bf16 features differ slightly).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BASE=$(mktemp -d)
export FEDTL_HOME=$BASE/home
echo "== 1. extraction throughput"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" benchmarks/gpu_extraction.py --images 8192 --batch-size 256
echo "== 2. CUDA tests"
# Only the modules that hold CUDA tests: collecting the others needs packages only CI installs (Ray, HF datasets).
"$PY" -m pytest -q -rs -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py)
echo "== 3. the default federation, GPU then CPU"
for device in cuda cpu; do  # separate homes: feature caches are keyed by backbone, data and preprocessing, not device
  FEDTL_HOME=$BASE/home-$device "$PY" -m fedtl.cli.main simulate --executor inprocess --set device="\"$device\"" \
    --out "$BASE/runs-$device" | grep -E "^(server|epsilon max)" | sed "s/^/$device: /"
done
