#!/usr/bin/env bash
# Issue 7's training-speed table in one device call (2 or 4 x H100 80 GB, <= 9 minutes), or on one GPU issue 19's
# (ours vs SpecForge, the SmolLM2 recipe before and after):
#
#     bash bench/gpu_suite.sh            # GPU=0 runs the single-GPU rows on card 0 (default: card 1)
#     PEERS_SITE=/tmp/peers bash bench/gpu_suite.sh   # one GPU; specforge installed in /tmp/peers (bench/peers/)
#
# On a 4-GPU machine the scaling rows (1 -> 2 -> 4 GPUs, DDP and FSDP2) come first; on 2 GPUs the suite is the
# original one (single-GPU MFU rows, minimax-m3 FSDP2, DDP 1 -> 2). On one GPU: qwen3-8b default, SpecForge and
# plain steps; the SmolLM2 quality recipe end to end now and, with an older checkout in BEFORE (default .before),
# then; minimax-m3 at micro-batch 4; then the GPU tests; then the tables (bench/suite_table.py).
#
# Every row is one bench/train_step.py run (dflashkit/train/flops.py says what the MFU counts). Each prints the
# command it ran, then one JSON line {"row": NAME, ...}: the benchmark's own row, or its OOM row, or a
# timeout/failure/skipped row; nothing stops the suite. Rows run most important first and each has a time limit; a row
# that would end past BUDGET seconds is skipped. The GPU tests (fast vs plain loss curves, flex vs dense) run in the
# background on the other card during the single-GPU rows. Everything goes to $OUT/gpu_suite.log (stderr of each
# row to $OUT/<row>.stderr).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dflashkit-gpu-suite}
mkdir -p "$OUT"
LOG=$OUT/gpu_suite.log
NGPU=${NGPU:-$(nvidia-smi -L 2> /dev/null | grep -c "^GPU" || true)}  # set: a CPU dry run of one branch
GPU=${GPU:-$(( NGPU > 1 ? 1 : 0 ))}  # GPU 0 may be shared with another job
OTHER=$(( GPU == NGPU - 1 ? 0 : NGPU - 1 ))  # the GPU tests' card during the single-GPU rows
BUDGET=${BUDGET:-510}
ROWS=${ROWS:-.}  # a regex: only rows whose name matches run (e.g. ROWS='m3-' for a rerun)
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/dflashkit-inductor}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # dflashkit from this checkout, installed or not
# Fewer fragmentation OOMs near the memory limit (the minimax-m3 rows); allocated-memory peaks are unaffected.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
STEPS=(--warmup 2 --steps 4)
# Appended to every row (later flags win): a CPU dry run of the suite's plumbing, e.g.
# SUITE_EXTRA="--preset smollm2 --seq 128 --anchors 8 --vocab-size 512 --num-layers 1" bash bench/gpu_suite.sh
read -r -a EXTRA <<< "${SUITE_EXTRA:-}"

log() { echo "$*" | tee -a "$LOG"; }

LAST_OK=0
row() {  # row NAME LIMIT_S CUDA_VISIBLE_DEVICES COMMAND...
    local name=$1 limit=$2 devices=$3
    shift 3
    LAST_OK=0
    [[ $name =~ $ROWS ]] || return 0
    if (( SECONDS + limit > BUDGET )); then
        log "{\"row\": \"$name\", \"skipped\": \"suite budget ($SECONDS s used of $BUDGET)\"}"
        return
    fi
    log "# $name (limit ${limit}s, at ${SECONDS}s): CUDA_VISIBLE_DEVICES=$devices $*"
    local out rc json
    out=$(CUDA_VISIBLE_DEVICES=$devices timeout -k 10 "$limit" "$@" 2> "$OUT/$name.stderr")
    rc=$?
    json=$(grep '^{' <<< "$out" | tail -1)
    if [[ -n $json ]]; then
        log "{\"row\": \"$name\", \"rc\": $rc, ${json#\{}"
        [[ $json == *step_time_s* ]] && LAST_OK=1
    elif (( rc == 124 || rc == 137 )); then
        log "{\"row\": \"$name\", \"timeout_s\": $limit}"
    else
        log "{\"row\": \"$name\", \"failed\": $rc, \"stderr_tail\": \"$(tail -c 600 "$OUT/$name.stderr" | tr '\n\t' '  ' | sed 's/\\/\\\\/g; s/"/\\"/g')\"}"
    fi
}

one() { row "$1" "$2" "$GPU" $PY bench/train_step.py "${STEPS[@]}" "${@:3}" "${EXTRA[@]}"; }
multi() {  # multi NGPUS NAME LIMIT ARGS...: torchrun over the first NGPUS cards
    local n=$1; shift
    row "$1" "$2" "$(seq -s, 0 $((n - 1)))" $PY -m torch.distributed.run --nproc-per-node "$n" bench/train_step.py \
        "${STEPS[@]}" "${@:3}" "${EXTRA[@]}"
}
two() { multi 2 "$@"; }
four() { multi 4 "$@"; }

log "# gpu_suite $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); single-GPU rows on card $GPU"
nvidia-smi --query-gpu=index,name,memory.used,utilization.gpu --format=csv,noheader 2>&1 | sed 's/^/# /' | tee -a "$LOG"
$PY -c 'import torch, transformers; print("# torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$LOG"
$PY -c 'import pytest' 2> /dev/null || log "# pytest is not installed: the GPU tests will fail to start"
log "# PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"

if (( NGPU == 1 )); then
    W=(--warmup 3 --steps 10)  # issue 19: median of 10 after 3 warm-up steps
    # then 2 steps profiled (not in its figures): where the default step's time goes
    one q8b-mb1 100 --preset qwen3-8b --micro-batch 1 "${W[@]}" --profile-dir "$OUT/q8b-mb1-profile"
    # SpecForge in its own site: our rows never import it.
    row specforge-q8b-mb1 90 "$GPU" env PYTHONPATH="${PEERS_SITE:-/tmp/peers}:$PWD" $PY bench/peers/specforge_step.py \
        --preset qwen3-8b --micro-batch 1 "${W[@]}" "${EXTRA[@]}"
    one q8b-mb1-plain 60 --preset qwen3-8b --micro-batch 1 --step plain "${W[@]}"
    WORK=${WORK:-/tmp/dflashkit-smollm2}  # the synthetic dump (~1.6 GB): not under OUT
    row smollm2-after 120 "$GPU" $PY bench/smollm2_step.py --work "$WORK" --name after
    BEFORE=${BEFORE:-.before}
    if [[ -f $BEFORE/train_dflash.py ]]; then  # it logs every step: read per 10 steps
        row smollm2-before 90 "$GPU" $PY bench/smollm2_step.py --work "$WORK" --name before \
            --trainer "$BEFORE" --log-every 1 --interval 10
    else
        log "{\"row\": \"smollm2-before\", \"skipped\": \"no older checkout in $BEFORE\"}"
    fi
    one m3-mb4-ac 100 --preset minimax-m3 --micro-batch 4 --activation-checkpointing "${W[@]}"
    # The host-side changes alone: today's code, the plain step (eager).
    row smollm2-plain 80 "$GPU" $PY bench/smollm2_step.py --work "$WORK" --name plain --set step=plain
    log "# gpu tests at ${SECONDS}s"
    CUDA_VISIBLE_DEVICES=$GPU timeout -k 10 200 $PY -m pytest -q -m gpu tests/gpu/test_train_step_match.py \
        tests/gpu/test_train_flex.py > "$OUT/gpu_tests.log" 2>&1
    log "# gpu tests: rc $? $(tail -3 "$OUT/gpu_tests.log" | tr '\n' ' ')"
    $PY bench/suite_table.py "$LOG" | tee -a "$OUT/tables.md"
    log "# done in ${SECONDS}s"
    exit 0
fi

# GPU tests on the other card meanwhile (correctness; their timing does not matter).
(CUDA_VISIBLE_DEVICES=$OTHER timeout -k 10 240 $PY -m pytest -q -m gpu tests/gpu/test_train_step_match.py \
    tests/gpu/test_train_flex.py > "$OUT/gpu_tests.log" 2>&1; echo "rc $?" >> "$OUT/gpu_tests.log") &
TESTS=$!

if (( NGPU >= 4 )); then
    # Scaling efficiency = tokens_per_s_total(N GPUs) / (N x tokens_per_s_per_gpu(1 GPU)), qwen3-8b micro-batch 1.
    one q8b-mb1 150 --preset qwen3-8b --micro-batch 1
    two q8b-ddp2-mb1 100 --preset qwen3-8b --micro-batch 1 --parallel ddp
    log "# waiting for the GPU tests (pid $TESTS) before the 4-GPU rows"
    wait $TESTS
    log "# gpu tests: $(tail -3 "$OUT/gpu_tests.log" | tr '\n' ' ')"
    four q8b-ddp4-mb1 100 --preset qwen3-8b --micro-batch 1 --parallel ddp
    four q8b-fsdp4-mb1 90 --preset qwen3-8b --micro-batch 1 --parallel fsdp
    two q8b-fsdp2-mb1 90 --preset qwen3-8b --micro-batch 1 --parallel fsdp
    four m3-fsdp4-mb4-ac 150 --preset minimax-m3 --micro-batch 4 --parallel fsdp --activation-checkpointing
    log "# done in ${SECONDS}s"
    exit 0
fi

# 1. qwen3-8b MFU on one GPU: the default (fast) step and the plain one.
one q8b-mb1 150 --preset qwen3-8b --micro-batch 1 --sync-debug
one q8b-mb1-plain 100 --preset qwen3-8b --micro-batch 1 --step plain

log "# waiting for the GPU tests (pid $TESTS) before the 2-GPU rows"
wait $TESTS
log "# gpu tests: $(tail -3 "$OUT/gpu_tests.log" | tr '\n' ' ')"

# 2. minimax-m3 at seq 8192, micro-batch 4 per GPU, FSDP2 on 2 GPUs (activation checkpointing: without it the
#    five layers' activations alone need ~45 GiB at micro-batch 4).
two m3-fsdp2-mb4-ac 150 --preset minimax-m3 --micro-batch 4 --parallel fsdp --activation-checkpointing
if (( ! LAST_OK )); then
    two m3-fsdp2-mb4-ac-plain 120 --preset minimax-m3 --micro-batch 4 --parallel fsdp --activation-checkpointing \
        --step plain
fi

# 3. Scaling 1 -> 2 GPUs (DDP), qwen3-8b micro-batch 1: tokens_per_s_total here / (2 x tokens_per_s_per_gpu of
#    q8b-mb1).
two q8b-ddp2-mb1 100 --preset qwen3-8b --micro-batch 1 --parallel ddp

# 4. Bigger micro-batches, what fits on one GPU for minimax-m3, and the rest as time allows.
one q8b-mb2 80 --preset qwen3-8b --micro-batch 2
one q8b-mb4 80 --preset qwen3-8b --micro-batch 4
one m3-mb4-ac 100 --preset minimax-m3 --micro-batch 4 --activation-checkpointing
one m3-mb1 90 --preset minimax-m3 --micro-batch 1
one q8b-mb4-ac 80 --preset qwen3-8b --micro-batch 4 --activation-checkpointing
two q8b-fsdp2-mb1 90 --preset qwen3-8b --micro-batch 1 --parallel fsdp
two q8b-ddp2-mb1-plain 80 --preset qwen3-8b --micro-batch 1 --parallel ddp --step plain
# The shape the trainer would build from M3's own config.json (64/4 heads, its 3072-wide expert MLP) if the recipe
# sets no model.* dims.
two m3-configjson-fsdp2-mb4-ac 120 --preset minimax-m3 --micro-batch 4 --parallel fsdp \
    --activation-checkpointing --num-attention-heads 64 --intermediate-size 3072

log "# done in ${SECONDS}s"
