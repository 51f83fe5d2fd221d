#!/usr/bin/env bash
# The GPU check: one run for a session that has a GPU lent for a few minutes. Steps, in order of
# importance (each with its own time limit, all within GPU_CHECK_BUDGET seconds, default 450,
# so that a run plus the machine's start fits 8 minutes of a 15-minute device budget):
#   1. environment: GPU, driver, torch, nvcc, compute-sanitizer
#   2. build the extension with its CUDA kernels (GRASS_LLM_KERNELS=extension: no fallback)
#   3. tests/test_kernels.py + tests/test_kernels_build.py on CPU and CUDA: every kernel against
#      the reference at the production tiling (k_in 130, k_out 67), bf16/fp16 exact on the
#      upcast values, mixed dtypes, grids past their limits (B > 65,535, > 2^20 token rows),
#      every per-token block shape, a tiny-model capture on GPU equal to CPU
#   4. compute-sanitizer memcheck, 5. racecheck, on the CUDA tests of every kernel
#   6. tools/bench_kernels.py --vs-matmul: CUDA events over 100 back-to-back calls next to the
#      layer's own x @ W^T, Llama-3.1-8B's q, k/v, down shapes, B = 8, T = 1024 (per token 256)
#   7. tools/bench_capture.py on 8 Llama-3.1-8B layers (bf16), fused kernels, 8. the reference
# and, between 3 and 4: the distributed path on NCCL (tests/test_gpu_dist.py: a one-rank FSDP2
# and TP mesh, the weights' broadcast, the Fisher's reduce to owner ranks and the scoring's
# gather, under the strict collectives, equal to a CPU store), the influence tests on CUDA,
# and at the end bench_fisher / bench_query on CUDA. The machine lacks zarr: run
# `bash tools/gpu_wheels.sh` here first and carry .whl (they are installed into /tmp/site).
# A failed or timed-out step is recorded and the rest still run. The summary is one markdown
# table in $OUT/gpu_check.md (default out/gpu_check/), followed by each step's output; the full
# log is $OUT/gpu_check.log. --cpu-dry-run runs every step that needs no GPU on the CPU (small
# sizes; the sanitizer steps are skipped) to check the script itself.
# Usage: bash tools/gpu_check.sh [--cpu-dry-run]
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash tools/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-out/gpu_check}
PY=${PY:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.md"
LOG="$OUT/gpu_check.log"
STEPS=$(mktemp -d)
trap 'rm -rf "$STEPS"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GRASS_LLM_KERNEL_CACHE=${GRASS_LLM_KERNEL_CACHE:-/tmp/grass_llm_kernels}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
T0=$(date +%s)
NO_SANITIZER="Device not supported"  # compute-sanitizer on a GPU it cannot attach to
ROWS=()
N=0
FAILED=0
: > "$LOG"

note_of() {  # a one-line note from a step's output: pytest's summary, else its last line
  local f=$1 line
  line=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|[0-9]+ (passed|failed|skipped|error)' "$f" \
    | tail -1)
  [[ -n $line ]] || line=$(grep -v '^[[:space:]]*$' "$f" | tail -1)
  [[ $line == "|"* ]] && line="table below"
  [[ -n $line ]] || line="(no output)"
  echo "${line:0:160}" | sed 's/^[= ]*//; s/[= ]*$//'
}

step() {  # step NAME LIMIT_S COMMAND...: run within the limit and the budget, record a row
  local name=$1 limit=$2 start rc secs left result out
  shift 2
  N=$((N + 1))
  out="$STEPS/$N.txt"
  left=$((BUDGET - ($(date +%s) - T0)))
  if ((left < 15)); then
    ROWS+=("| $N | $name | skipped | - | $limit | out of time (budget ${BUDGET} s) |")
    return
  fi
  ((limit > left)) && limit=$left
  start=$(date +%s)
  echo "===== $N. $name (limit $limit s)" | tee -a "$LOG"
  timeout --kill-after=15 "$limit" "$@" > "$out" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  cat "$out" >> "$LOG"
  case $rc in
    0) result=pass ;;
    124 | 137) result="**TIMEOUT**"; FAILED=$((FAILED + 1)) ;;
    *) result="**FAIL** (exit $rc)"; FAILED=$((FAILED + 1)) ;;
  esac
  # compute-sanitizer refuses some virtualized GPUs: a tool that cannot attach is not a failure
  if ((rc != 0)) && grep -qE "$NO_SANITIZER" "$out"; then
    result="n/a (the sanitizer cannot attach to this GPU)"
    FAILED=$((FAILED - 1))
  fi
  ROWS+=("| $N | $name | $result | $secs | $limit | $(note_of "$out") |")
  echo "$name: $result, $secs s" | tee -a "$LOG"
}

skip() {  # skip NAME REASON
  N=$((N + 1))
  ROWS+=("| $N | $1 | skipped | - | - | $2 |")
  : > "$STEPS/$N.txt"
}

env_info() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader || echo "no nvidia-smi: no GPU"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0) \
if torch.cuda.is_available() else 'no GPU visible to torch')"
  command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "no nvcc"
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2 \
    || echo "no compute-sanitizer"
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
}

sanitize() {  # sanitize TOOL: the CUDA tests of every kernel under compute-sanitizer
  compute-sanitizer --tool "$1" --error-exitcode 1 --report-api-errors no \
    --target-processes all "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "cuda and (production or reproducible or no_coordinates or sjlt_and_transpose)"
}

if [[ -d .whl ]] && ! "$PY" -c "import zarr" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

export PY
export -f env_info sanitize  # `timeout` runs commands, not functions: bash -c NAME runs them
TESTS=(tests/test_kernels.py tests/test_kernels_build.py)
CAPTURE=(tools/bench_capture.py --skip-materialized --scaling none)
step "environment" 30 bash -c env_info
step "build: CUDA + CPU extension" 240 env GRASS_LLM_KERNELS=extension \
  "$PY" -m grass_llm.kernels build
if ((DRY)); then
  step "kernel tests (CPU; CUDA tests skip)" 300 env GRASS_LLM_KERNELS=extension \
    "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
  skip "compute-sanitizer memcheck" "--cpu-dry-run: no GPU"
  skip "compute-sanitizer racecheck" "--cpu-dry-run: no GPU"
  step "bench_kernels vs x @ W^T (CPU, shapes / 16)" 120 "$PY" tools/bench_kernels.py \
    --device cpu --vs-matmul --small --calls 3
  step "bench_capture, tiny model (CPU), fused kernels" 120 "$PY" "${CAPTURE[@]}" \
    --model tiny --device cpu --docs 8 --seq 64 --batch 4 --repeats 1
  step "bench_capture, same, pure-torch reference" 120 env GRASS_LLM_KERNELS=reference \
    "$PY" "${CAPTURE[@]}" --model tiny --device cpu --docs 8 --seq 64 --batch 4 --repeats 1
else
  # the emulation tests are CPU checks (CI runs them); the GPU's time goes to the GPU
  step "kernel tests on CPU and CUDA" 150 env GRASS_LLM_KERNELS=extension \
    "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" -k "not emulation"
  step "NCCL: one-rank FSDP2/TP cache, Fisher reduce, query gather = CPU" 150 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_dist.py
  step "influence and loss tests on CUDA (Fisher, scoring, blocked loss)" 120 "$PY" -m pytest \
    -q -p no:cacheprovider tests/test_fisher.py tests/test_scoring.py tests/test_loss.py \
    -k "cuda or float32_tile or gram_precision"
  if command -v compute-sanitizer >/dev/null; then
    step "compute-sanitizer memcheck (CUDA tests)" 90 bash -c "sanitize memcheck"
    step "compute-sanitizer racecheck (CUDA tests)" 90 bash -c "sanitize racecheck"
  else
    skip "compute-sanitizer memcheck" "compute-sanitizer is not installed here"
    skip "compute-sanitizer racecheck" "compute-sanitizer is not installed here"
  fi
  step "bench_kernels vs x @ W^T (bf16, CUDA events)" 60 "$PY" tools/bench_kernels.py \
    --device cuda --dtype bfloat16 --vs-matmul --calls 100
  step "bench_capture, Llama-3.1-8B, 8 layers, bf16, fused kernels" 80 "$PY" "${CAPTURE[@]}" \
    --model llama3-8b --num-layers 8 --device cuda --dtype bfloat16 --docs 16 --seq 1024 \
    --batch 8 --repeats 3
  step "bench_capture, same, pure-torch reference" 80 env GRASS_LLM_KERNELS=reference \
    "$PY" "${CAPTURE[@]}" --model llama3-8b --num-layers 8 --device cuda --dtype bfloat16 \
    --docs 16 --seq 1024 --batch 8 --repeats 3
  step "bench_fisher on CUDA" 120 "$PY" tools/bench_fisher.py --device cuda --rows 16384 --exact
  step "bench_query on CUDA" 180 "$PY" tools/bench_query.py --device cuda --procs 1 \
    --rows 16384 --tokens 4096
fi

{
  echo "# grass_llm GPU check$( ((DRY)) && echo ' (--cpu-dry-run)'), $(date -u +%FT%TZ)"
  echo
  echo "| # | step | result | s | limit s | note |"
  echo "|---:|---|---|---:|---:|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "$FAILED step(s) failed; $(($(date +%s) - T0)) s in all (budget $BUDGET s)."
  for ((i = 1; i <= N; i++)); do
    [[ -s $STEPS/$i.txt ]] || continue
    echo
    echo "## $(printf '%s\n' "${ROWS[$((i - 1))]}" | cut -d'|' -f3 | sed 's/^ *//; s/ *$//')"
    echo
    echo '```'
    tail -n 80 "$STEPS/$i.txt"
    echo '```'
  done
} > "$REPORT"
sed -n '1,/ in all (budget/p' "$REPORT"
echo "report: $REPORT, full log: $LOG"
((FAILED == 0))
