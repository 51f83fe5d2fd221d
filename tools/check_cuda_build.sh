#!/usr/bin/env bash
# Compile every CUDA source in csrc/ with nvcc for sm_80 and sm_90, without a GPU: a kernel
# that does not build cannot land (CI runs this). Needs nvcc and an installed torch (its
# headers). Usage: bash tools/check_cuda_build.sh [python]
set -euo pipefail
PY=${1:-.venv/bin/python}
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "check_cuda_build: nvcc not found" >&2; exit 1; }
TORCH=$("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__))")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# A CPU build of torch ships c10's CUDA headers but not the one CMake generates for CUDA
# builds; it only declares how c10_cuda was linked, which a compile-only check does not need.
mkdir -p "$WORK/include/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
  > "$WORK/include/c10/cuda/impl/cuda_cmake_macros.h"
compile_one() {  # compile one .cu for both architectures; print a one-line verdict
  local cu=$1 log="$WORK/$(basename "$1").log" start
  start=$(date +%s)
  if "$NVCC" -std=c++20 -O3 -c "$cu" -o "$WORK/$(basename "$cu").o" \
      -DGRASS_WITH_CUDA -I"$WORK/include" -I"$TORCH/include" \
      -I"$TORCH/include/torch/csrc/api/include" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xcudafe --diag_suppress=3306 -w 2> "$log"; then
    echo "ok    $cu  (sm_80, sm_90; $(( $(date +%s) - start )) s)"
  else
    echo "FAIL  $cu" >&2
    cat "$log" >&2
    return 1
  fi
}
# two at a time: CI machines have 2 cores
pids=()
for cu in csrc/cuda/*.cu; do
  compile_one "$cu" & pids+=($!)
  if (( ${#pids[@]} == 2 )); then wait "${pids[0]}" || status=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit ${status:-0}
