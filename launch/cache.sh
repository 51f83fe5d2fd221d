#!/usr/bin/env bash
# Thin wrapper: launch `grass-llm cache` with one of the accelerate configs in this folder.
#   launch/cache.sh launch/fsdp2-8gpu.yaml configs/llama3-8b.yaml --set data=corpus.jsonl
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 ACCELERATE_CONFIG RUN_CONFIG [grass-llm cache options...]" >&2
  exit 2
fi
launch_config=$1; run_config=$2; shift 2
exec accelerate launch --config_file "$launch_config" -m grass_llm cache --config "$run_config" "$@"
