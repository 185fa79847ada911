#!/usr/bin/env bash
# Runs the whole test suite on this machine: installs (scripts/setup.sh), starts the services the integration tests
# use (a real Slurm cluster when run as root; one vLLM CPU server), runs pytest, stops the server.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${DFLASHKIT_VENV:-$REPO/.venv}
export DFLASHKIT_CACHE=${DFLASHKIT_CACHE:-$REPO/.cache/dflashkit}
bash scripts/setup.sh

# One vLLM server for the whole session, booting while Slurm starts (the test fixtures reuse it).
if [[ -z "${DFLASHKIT_TEST_VLLM_URL:-}" ]]; then
  PORT=$("$VENV/bin/python" -m dflashkit.serve free-port)
  export DFLASHKIT_TEST_VLLM_KEY
  DFLASHKIT_TEST_VLLM_KEY=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')
  export DFLASHKIT_TEST_VLLM_URL="http://127.0.0.1:$PORT"
  mapfile -d '' -t CMD < <("$VENV/bin/python" -m dflashkit.serve command --backend vllm \
    --model "$DFLASHKIT_CACHE/models/SmolLM2-135M-Instruct" --served-model-name smollm2 --port "$PORT" \
    --extra-args "--dtype float32 --enforce-eager --distributed-executor-backend uni --max-model-len 4096 \
--chat-template '$REPO/configs/templates/smollm2-thinking.jinja'")
  mkdir -p "$REPO/.cache/logs"
  ( export VLLM_API_KEY=$DFLASHKIT_TEST_VLLM_KEY VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1
    exec setsid "${CMD[@]}" ) >"$REPO/.cache/logs/test-vllm-server.log" 2>&1 </dev/null &
  SERVER_PID=$!
  trap 'kill -TERM -- -$SERVER_PID 2>/dev/null || true' EXIT
fi

if [[ $(id -u) == 0 && -f .ci/slurm/setup.sh ]]; then
  bash .ci/slurm/setup.sh
else
  echo "test.sh: not root: the Slurm tests will be skipped (they need a local cluster from .ci/slurm/setup.sh)" >&2
fi

if [[ -n "${SERVER_PID:-}" ]]; then
  "$VENV/bin/python" -m dflashkit.serve wait --url "$DFLASHKIT_TEST_VLLM_URL" --pid "$SERVER_PID" --timeout 600 \
    --log "$REPO/.cache/logs/test-vllm-server.log"
fi

status=0
"$VENV/bin/python" -m pytest "${@:-tests}" || status=$?
# pytest's 5 means "no tests collected": that is a failure of the suite, not a pass.
exit "$status"
