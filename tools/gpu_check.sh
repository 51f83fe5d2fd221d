#!/usr/bin/env bash
# The whole GPU check, for a session that has a GPU lent for a few minutes (< 8 min in all):
#   1. build the extension with its CUDA kernels (GRASS_LLM_KERNELS=extension: no fallback)
#   2. tests/test_kernels.py on CPU and CUDA: both kernels against the pure-torch reference,
#      float64/float32/bf16/fp16, odd sizes, T = 1, bitwise reproducibility
#   3. tools/bench_kernels.py on CUDA (bf16 and fp32 inputs): fused vs reference vs LoGra
#   4. tools/bench_capture.py on a random-init Llama-3.1-8B-shaped model (first 4 of its 32
#      layers, bf16): tokens/s of FactGraSS (fused, then reference), LoGra, a training step
#      and the no-weight-gradient floor
# Everything goes to $OUT/gpu_check.md (default out/gpu_check/); each step has its own time
# limit (600 s in all, so one device call with timeout_s=600 returns the report even if the last
# step is cut), and a failed step does not stop the later ones. Usage: bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GRASS_LLM_KERNEL_CACHE=${GRASS_LLM_KERNEL_CACHE:-/tmp/grass_llm_kernels}
export MAX_JOBS=${MAX_JOBS:-16}
failed=()

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log under a heading
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo -e "\n## $name\n\n\`\`\`" >> "$REPORT"
  timeout "$limit" "$@" >> "$REPORT" 2>&1
  rc=$?
  echo -e "\`\`\`\n\n($name: exit $rc, $(( $(date +%s) - start )) s)" >> "$REPORT"
  (( rc == 0 )) || failed+=("$name")
  echo "$name: exit $rc, $(( $(date +%s) - start )) s"
}

{
  echo "# grass_llm GPU check, $(date -u +%FT%TZ)"
  echo
  echo '```'
  nvidia-smi -L 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0))" 2>&1
  nvcc --version 2>&1 | tail -1
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo '```'
} > "$REPORT"

step "build (CUDA + CPU extension)" 240 env GRASS_LLM_KERNELS=extension \
  "$PY" -m grass_llm.kernels build
step "kernel tests vs reference" 100 env GRASS_LLM_KERNELS=extension \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
step "bench_kernels (bf16 inputs)" 50 "$PY" tools/bench_kernels.py --device cuda \
  --dtype bfloat16 --repeats 20
step "bench_kernels (fp32 inputs)" 50 "$PY" tools/bench_kernels.py --device cuda \
  --dtype float32 --repeats 20
step "bench_capture, Llama-3.1-8B shapes, 4 layers, fused kernels" 80 \
  "$PY" tools/bench_capture.py --model llama3-8b --num-layers 4 --device cuda \
  --dtype bfloat16 --docs 64 --seq 1024 --batch 8 --repeats 3 --skip-materialized --scaling none
step "bench_capture, same, pure-torch reference" 80 env GRASS_LLM_KERNELS=reference \
  "$PY" tools/bench_capture.py --model llama3-8b --num-layers 4 --device cuda \
  --dtype bfloat16 --docs 64 --seq 1024 --batch 8 --repeats 3 --skip-materialized --scaling none

if (( ${#failed[@]} )); then
  echo -e "\nFAILED: ${failed[*]}" | tee -a "$REPORT"
  exit 1
fi
echo -e "\nall steps passed" | tee -a "$REPORT"
