#!/usr/bin/env bash
# Compile every CUDA source in csrc/ with nvcc, and the bindings with the CUDA declarations
# switched on, without a GPU: a kernel that does not build cannot land (CI runs this). The flags
# are exactly the JIT build's (`python -m grass_llm.kernels flags`: torch's own nvcc flags, ours,
# and the GPU targets, which without a GPU are SASS for sm_80 and sm_90 plus PTX for compute_90).
# Needs nvcc and an installed torch (its headers). Usage: bash tools/check_cuda_build.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
NVCC=${NVCC:-nvcc}
CXX=${CXX:-c++}
command -v "$NVCC" >/dev/null || { echo "check_cuda_build: nvcc not found" >&2; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mapfile -t NVCC_FLAGS < <("$PY" -m grass_llm.kernels flags nvcc)
mapfile -t CXX_FLAGS < <("$PY" -m grass_llm.kernels flags cxx)
(( ${#NVCC_FLAGS[@]} && ${#CXX_FLAGS[@]} )) || { echo "check_cuda_build: no flags" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# A CPU build of torch ships c10's CUDA headers but not the one CMake generates for CUDA
# builds; it only declares how c10_cuda was linked, which a compile-only check does not need.
mkdir -p "$WORK/include/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
  > "$WORK/include/c10/cuda/impl/cuda_cmake_macros.h"
targets=$(printf '%s\n' "${NVCC_FLAGS[@]}" | sed -n 's/^-gencode=arch=compute_[0-9]*,code=//p' \
  | paste -sd, -)

compile_one() {  # compile one source; print a one-line verdict
  local src=$1 log="$WORK/$(basename "$1").log" start what
  start=$(date +%s)
  if [[ $src == *.cu ]]; then
    what=$targets
    set -- "$NVCC" -I"$WORK/include" "${NVCC_FLAGS[@]}" -c "$src" -o "$WORK/$(basename "$src").o"
  else
    what="host compiler, CUDA declarations on"
    set -- "$CXX" -I"$WORK/include" "${CXX_FLAGS[@]}" -c "$src" -o "$WORK/$(basename "$src").o"
  fi
  if "$@" 2> "$log"; then
    echo "ok    $src  ($what; $(( $(date +%s) - start )) s)"
  else
    echo "FAIL  $src" >&2
    echo "      $*" >&2
    cat "$log" >&2
    return 1
  fi
}

# two at a time: CI machines have 2 cores
status=0
pids=()
for src in csrc/cuda/*.cu csrc/bindings.cpp; do
  compile_one "$src" & pids+=($!)
  if (( ${#pids[@]} == 2 )); then wait "${pids[0]}" || status=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
