#!/usr/bin/env bash
# The demo: installs (scripts/setup.sh), then runs the whole pipeline on SmolLM2 with the local executor on this
# machine (no Slurm, no GPU) and prints a short report. Arguments go to `dflashkit demo` (e.g. --run-dir /tmp/d).
set -euo pipefail
cd "$(dirname "$0")/.."
export DFLASHKIT_CACHE=${DFLASHKIT_CACHE:-$PWD/.cache/dflashkit}
bash scripts/setup.sh
# CPU vLLM: one engine process, a small KV cache (the recipe's servers inherit these).
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1
exec "${DFLASHKIT_VENV:-$PWD/.venv}/bin/dflashkit" demo "$@"
