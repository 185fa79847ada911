#!/usr/bin/env bash
# One generate shard (one Slurm array task, or one local run): start the inference server(s), wait until healthy,
# run server_generate.py on this shard, stop the servers. Exits with the shard's status.
#
# Required: MODEL, INPUT, OUTPUT_DIR.
# Server:   API_KEY (default: a fresh random key), BACKEND=vllm|sglang (vllm), SERVED_MODEL_NAME (=MODEL), TP_SIZE (1), SERVERS_PER_NODE (1),
#           SERVER_STARTUP_TIMEOUT seconds (1800), PORT_BASE (20000), VLLM_SERVE_EXTRA_ARGS, SGLANG_SERVE_EXTRA_ARGS
#           (split by shell word rules, never evaluated), LOG_DIR (OUTPUT_DIR/logs), PYTHON (python3).
# Shard:    NUM_SHARDS, SHARD_ID (default: from the Slurm array; see docs/FORMATS.md).
# Generate: THINKING_MODES, THINKING_MODE_KEY, THINKING_MODE_MAP, CHAT_TEMPLATE_KWARGS, THINK_OPEN_TAG,
#           THINK_CLOSE_TAG, OUTPUT_FORMAT, ON_LENGTH, TEMPERATURE, TOP_P, MAX_TOKENS, SEED, CONCURRENCY,
#           MAX_CONVERSATIONS, SYSTEM_PROMPT, REQUEST_TIMEOUT, MAX_RETRIES. Arguments after `--` go to
#           server_generate.py as they are.
set -euo pipefail

die() { echo "worker.sh: $*" >&2; exit 1; }

# sbatch runs a copy of this script from its spool dir, so find the checkout: next to the script, else DFLASHKIT_ROOT,
# else the submit dir.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for dir in "$HERE" "${DFLASHKIT_ROOT:-}" "${SLURM_SUBMIT_DIR:-}"; do
  [[ -n "$dir" && -f "$dir/server_generate.py" ]] && { HERE=$dir; break; }
done
[[ -f "$HERE/server_generate.py" ]] || die "cannot find server_generate.py: set DFLASHKIT_ROOT to the dflashkit checkout"
PYTHON=${PYTHON:-python3}
BACKEND=${BACKEND:-vllm}
: "${MODEL:?worker.sh: set MODEL}" "${INPUT:?worker.sh: set INPUT}" "${OUTPUT_DIR:?worker.sh: set OUTPUT_DIR}"
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-$MODEL}
TP_SIZE=${TP_SIZE:-1}
SERVERS_PER_NODE=${SERVERS_PER_NODE:-1}
SERVER_STARTUP_TIMEOUT=${SERVER_STARTUP_TIMEOUT:-1800}
PORT_BASE=${PORT_BASE:-20000}
LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/logs}
TASK_TAG=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}_${SLURM_ARRAY_TASK_ID:-${SHARD_ID:-0}}

case "$BACKEND" in
  vllm) EXTRA_ARGS=${VLLM_SERVE_EXTRA_ARGS:-} ;;
  sglang) EXTRA_ARGS=${SGLANG_SERVE_EXTRA_ARGS:-} ;;
  *) die "BACKEND must be vllm or sglang, not '$BACKEND'" ;;
esac
[[ "$SERVERS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "SERVERS_PER_NODE must be a positive integer"
[[ "$TP_SIZE" =~ ^[1-9][0-9]*$ ]] || die "TP_SIZE must be a positive integer"
# Checked before any $((...)): bash arithmetic evaluates a variable's text, so 'a[$(cmd)]' would run cmd.
TASK_NUM=${SLURM_ARRAY_TASK_ID:-${SHARD_ID:-0}}
[[ "$TASK_NUM" =~ ^[0-9]+$ ]] || die "SHARD_ID / SLURM_ARRAY_TASK_ID must be a non-negative integer"
[[ "$PORT_BASE" =~ ^[0-9]+$ ]] || die "PORT_BASE must be a non-negative integer"
# A model given as a path must be there (anything else may be a hub id): said here in one line, not after the server
# has started and printed a traceback that calls the path a malformed repo id.
[[ "$MODEL" != [/.~]* || -e "${MODEL/#\~/$HOME}" ]] || die "MODEL $MODEL: no such file or directory"
mkdir -p "$LOG_DIR" "$OUTPUT_DIR"

# The per-job key: API_KEY if the caller set one, else made here; handed to servers and client through their
# environments only, never printed.
API_KEY=${API_KEY:-$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')}
KEY_VAR=$("$PYTHON" -m dflashkit.serve key-env --backend "$BACKEND")

# GPUs for server i: slice i of the visible devices, TP_SIZE each.
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a DEVICES <<<"$CUDA_VISIBLE_DEVICES"
else
  DEVICES=()
  for ((d = 0; d < SERVERS_PER_NODE * TP_SIZE; d++)); do DEVICES+=("$d"); done
fi
if ((SERVERS_PER_NODE > 1 && ${#DEVICES[@]} < SERVERS_PER_NODE * TP_SIZE)); then
  die "SERVERS_PER_NODE=$SERVERS_PER_NODE x TP_SIZE=$TP_SIZE needs $((SERVERS_PER_NODE * TP_SIZE)) GPUs, have ${#DEVICES[@]}"
fi

GEN_ARGS=(--input "$INPUT" --output-dir "$OUTPUT_DIR" --model "$SERVED_MODEL_NAME")
add() { [[ -n "${2:-}" ]] && GEN_ARGS+=("$1" "$2"); return 0; }
add --num-shards "${NUM_SHARDS:-}"
add --shard-id "${SHARD_ID:-}"
add --thinking-modes "${THINKING_MODES:-}"
add --thinking-mode-key "${THINKING_MODE_KEY:-}"
add --thinking-mode-map "${THINKING_MODE_MAP:-}"
add --chat-template-kwargs "${CHAT_TEMPLATE_KWARGS:-}"
add --output-format "${OUTPUT_FORMAT:-}"
add --on-length "${ON_LENGTH:-}"
add --temperature "${TEMPERATURE:-}"
add --top-p "${TOP_P:-}"
add --max-tokens "${MAX_TOKENS:-}"
add --seed "${SEED:-}"
add --concurrency "${CONCURRENCY:-}"
add --max-conversations "${MAX_CONVERSATIONS:-}"
add --system-prompt "${SYSTEM_PROMPT:-}"
add --request-timeout "${REQUEST_TIMEOUT:-}"
add --max-retries "${MAX_RETRIES:-}"
if [[ -n "${THINK_OPEN_TAG:-}${THINK_CLOSE_TAG:-}" ]]; then
  GEN_ARGS+=(--think-tags "${THINK_OPEN_TAG:-<think>}" "${THINK_CLOSE_TAG:-</think>}")
fi
[[ "${1:-}" == "--" ]] && shift
GEN_ARGS+=("$@")

# A finished shard (a requeued or resubmitted task) must not pay for a server start, nor may client arguments the
# client refuses (exit 2, e.g. an unknown THINKING_MODES name): both are settled here, before any server starts.
checked=0
"$PYTHON" "$HERE/server_generate.py" "${GEN_ARGS[@]}" --check-done || checked=$?
case "$checked" in
  0) echo "worker.sh: shard already done; nothing to do" >&2; exit 0 ;;
  1) ;;  # not done yet
  *) echo "worker.sh: server_generate.py refused its arguments (above); no server started" >&2; exit "$checked" ;;
esac


SERVER_PIDS=()
SERVER_LOGS=()
URLS=()
GEN_PID=""

stop_all() {
  local pid
  [[ -n "$GEN_PID" ]] && kill -TERM "$GEN_PID" 2>/dev/null || true
  for pid in "${SERVER_PIDS[@]}"; do
    # Each server leads its own process group (setsid): signal the group so engine subprocesses go too.
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in "${SERVER_PIDS[@]}"; do
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  SERVER_PIDS=()
}
trap 'stop_all' EXIT
trap 'echo "worker.sh: interrupted, stopping servers" >&2; exit 143' TERM
trap 'echo "worker.sh: interrupted, stopping servers" >&2; exit 130' INT

for ((i = 0; i < SERVERS_PER_NODE; i++)); do
  PORT=$("$PYTHON" -m dflashkit.serve free-port --preferred $((PORT_BASE + (TASK_NUM * SERVERS_PER_NODE + i) % 20000)))
  mapfile -d '' -t CMD < <("$PYTHON" -m dflashkit.serve command --backend "$BACKEND" --model "$MODEL" \
    --served-model-name "$SERVED_MODEL_NAME" --port "$PORT" --tp "$TP_SIZE" --extra-args="$EXTRA_ARGS") \
    || die "could not build the server command"
  ((${#CMD[@]} > 0)) || die "could not build the server command"
  LOG="$LOG_DIR/server-${TASK_TAG}-${i}.log"
  GPUS=$(IFS=,; echo "${DEVICES[*]:i*TP_SIZE:TP_SIZE}")
  echo "worker.sh: starting $BACKEND server $i on 127.0.0.1:$PORT (GPUs ${GPUS:-none}); log $LOG" >&2
  env_args=("$KEY_VAR=$API_KEY")
  ((SERVERS_PER_NODE > 1)) && env_args+=("CUDA_VISIBLE_DEVICES=$GPUS")
  # `export` in a subshell, not `env VAR=...`: the key must not appear in any process's argv.
  ( export "${env_args[@]}"; exec setsid "${CMD[@]}" ) >"$LOG" 2>&1 </dev/null &
  SERVER_PIDS+=($!)
  SERVER_LOGS+=("$LOG")
  URLS+=("http://127.0.0.1:$PORT")
done

for ((i = 0; i < SERVERS_PER_NODE; i++)); do
  # In the background, so that `wait` (which a signal interrupts) lets the TERM/INT traps run at once.
  "$PYTHON" -m dflashkit.serve wait --url "${URLS[i]}" --pid "${SERVER_PIDS[i]}" \
    --timeout "$SERVER_STARTUP_TIMEOUT" --log "${SERVER_LOGS[i]}" &
  wait $! || die "server $i did not come up"
  echo "worker.sh: server $i healthy at ${URLS[i]}" >&2
  GEN_ARGS+=(--base-url "${URLS[i]}/v1")
done

( export OPENAI_API_KEY="$API_KEY"; exec "$PYTHON" "$HERE/server_generate.py" "${GEN_ARGS[@]}" ) &
GEN_PID=$!

# Watch both sides: the shard's status when the client ends, or a fast failure when a server dies under it.
while kill -0 "$GEN_PID" 2>/dev/null; do
  for i in "${!SERVER_PIDS[@]}"; do
    if ! kill -0 "${SERVER_PIDS[i]}" 2>/dev/null; then
      echo "worker.sh: server $i (pid ${SERVER_PIDS[i]}) died while generating; log tail:" >&2
      "$PYTHON" -c 'import sys; from dflashkit.serve import log_tail; print(log_tail(sys.argv[1]))' \
        "${SERVER_LOGS[i]}" >&2
      kill -TERM "$GEN_PID" 2>/dev/null || true
      wait "$GEN_PID" 2>/dev/null || true
      GEN_PID=""
      exit 1
    fi
  done
  sleep 1
done
status=0
wait "$GEN_PID" || status=$?
GEN_PID=""
echo "worker.sh: server_generate.py exited with status $status" >&2
exit "$status"
