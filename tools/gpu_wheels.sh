#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its image has torch, transformers, accelerate, numba,
# pyarrow, typer, rich, tqdm, pyyaml, but not zarr and what zarr needs), downloaded here for
# its Python 3.12 into .whl/ (git-ignored locally), for tools/gpu_check.sh to install with
# --no-index. Run it here, before the device call, and carry .whl.
# Usage: bash tools/gpu_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do plat+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
ls -1 .whl
