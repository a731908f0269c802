#!/usr/bin/env bash
# Run `gpu_check.sh` on a lent GPU machine, which has python3 (3.12) with torch but not fedtl or the wheels that
# `gpu_wheels.sh` fetched into .whl/ here: installs both into a folder of their own (nothing of the machine's
# image is replaced), then runs the check with that python. `pytest -m gpu` collects every test module, so the
# modules whose packages only CI installs (Ray, the bank data) must skip, not fail, on that machine.
#   run(command="bash benchmarks/gpu_device.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-$(mktemp -d -t fedtl-site.XXXXXX)}  # a fresh folder of its own under $TMPDIR, unless SITE names one
PYTHON=${PYTHON:-python3}
ls .whl/*.whl >/dev/null || { echo "no wheels in .whl/: run benchmarks/gpu_wheels.sh here first, and carry .whl" >&2; exit 2; }
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" .
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import torch, flwr, opacus, fedtl.cli.main; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
PY=$PYTHON bash benchmarks/gpu_check.sh
