#!/usr/bin/env bash
# The SmolLM2 quality run on a GPU machine without vLLM (issue 6): greedy answers to ShareGPT prompts, HF dump,
# training, export, and our acceptance eval on MT-Bench turn 1 and held-out prompts. Each stage is the real entry point;
# generation stands in for server_generate.py with transformers (bench/train_smollm2_data.py).
#
#   W=/tmp/q GGUF=/tmp/q/smollm2.gguf TOK=DIR PROMPTS=prompts.jsonl N=16000 GPUS="0" bash bench/quality_run.sh
#
# GPUS: the cards to spread generation, dump and eval over; training runs data-parallel (torchrun) on all of them.
# STAGES picks stages (default: "gen dump train eval"); TRAIN_ARGS adds dotted overrides; EVAL_ARGS adds eval flags.
# GEN=engine answers with the GPU data engine (python -m dflashkit.generate.engine: bf16, multi-turn prompt records
# answered turn by turn, GEN_SLOTS slots, default 1024) instead of HF generate (float32, first turns); the eval's
# target then runs in the answers' dtype (EVAL_DTYPE, default bfloat16 with the engine, float32 without).
# RUN (default $W) is the folder of this run's training, draft, eval and timings; the answers, the dump and the
# converted model stay in $W, so several runs can train on one dump (bench/train_variants.sh).
# The eval runs one process per card on a slice of MT-Bench (plus one on the held-out prompts) and merges them into
# $W/eval/merged.json (bench/merge_eval_reports.py). Timings go to $W/timings.txt.
set -euo pipefail
: "${W:?}" "${GGUF:?}" "${TOK:?}" "${PROMPTS:?}" "${N:?}"
GPUS=${GPUS:-0}; STAGES=${STAGES:-gen dump train eval}; DUMPS_PER_GPU=${DUMPS_PER_GPU:-4}; RUN=${RUN:-$W}
GEN=${GEN:-hf}; EVAL_DTYPE=${EVAL_DTYPE:-$([[ $GEN == engine ]] && echo bfloat16 || echo float32)}
read -r -a gpus <<<"$GPUS"
read -r -a train_args <<<"${TRAIN_ARGS:-}"
read -r -a eval_args <<<"${EVAL_ARGS:-}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Fail in the first second, not after the machine's warm-up: the GGUF conversion needs the gguf package, which GPU
# images often lack (carry its wheel and put it on PYTHONPATH).
python -c 'import gguf' 2> /dev/null || { echo "quality_run: python has no gguf package (pip install gguf)" >&2; exit 2; }
mkdir -p "$W" "$RUN"
stamp() { echo "$(date +%s) $*" | tee -a "$RUN/timings.txt"; }
on_gpu() { local g=$1; shift; CUDA_VISIBLE_DEVICES=$g "$@"; }
run_all() {  # wait for every background job; fail if any failed
    local rc=0 pid; for pid in "$@"; do wait "$pid" || rc=1; done; return $rc
}

python bench/train_smollm2_data.py --gguf "$GGUF" --tokenizer-dir "$TOK" --prompts "$PROMPTS" --model-out "$W/smollm2"

if [[ " $STAGES " == *" gen "* ]]; then
    stamp gen-start; pids=()
    for i in "${!gpus[@]}"; do
        if [[ $GEN == engine ]]; then
            on_gpu "${gpus[$i]}" python -m dflashkit.generate.engine --model "$W/smollm2" --input "$PROMPTS" \
                --max-conversations "$N" --output-dir "$W/gen" --shard-id "$i" --num-shards "${#gpus[@]}" \
                --dtype bfloat16 --chat-template configs/templates/smollm2-thinking.jinja --thinking-modes adaptive \
                --max-tokens 256 --slots "${GEN_SLOTS:-1024}" > "$W/gen-$i.log" 2>&1 &
            pids+=($!); continue
        fi
        on_gpu "${gpus[$i]}" python bench/train_smollm2_data.py --gguf "$GGUF" --tokenizer-dir "$TOK" \
            --prompts "$PROMPTS" --num-prompts "$N" --model-out "$W/smollm2" --out "$W/gen/part-$i.jsonl" \
            --shard-id "$i" --num-shards "${#gpus[@]}" --batch-size "${GEN_BATCH:-512}" > "$W/gen-$i.log" 2>&1 &
        pids+=($!)
    done
    run_all "${pids[@]}"; stamp gen-end "$(cat "$W"/gen/part-*.jsonl "$W"/gen/shard-*[0-9].jsonl 2> /dev/null | wc -l) answers"
fi

if [[ " $STAGES " == *" dump "* ]]; then
    stamp dump-start; pids=(); shards=$(( ${#gpus[@]} * DUMPS_PER_GPU ))
    for ((s = 0; s < shards; s++)); do
        on_gpu "${gpus[$((s % ${#gpus[@]}))]}" python compute_hidden_states_hf.py --model "$W/smollm2" \
            --input "$W/gen" --output-dir "$W/dump" --chat-template smollm2-thinking-train --num-draft-layers 5 \
            --dtype bfloat16 --max-seq-len 2048 --num-shards "$shards" --shard-id "$s" --no-progress \
            > "$W/dump-$s.log" 2>&1 &
        pids+=($!)
    done
    run_all "${pids[@]}"; stamp dump-end "$(du -sh "$W/dump" | cut -f1)"
fi

if [[ " $STAGES " == *" train "* ]]; then
    stamp train-start
    on_gpu "$(IFS=,; echo "${gpus[*]}")" python -m torch.distributed.run --standalone --nproc-per-node "${#gpus[@]}" \
        train_dflash.py --config configs/train/smollm2-quality.yaml target_model="$W/smollm2" output_dir="$RUN/train" \
        "data.dump_dirs=[$W/dump]" "${train_args[@]}" > "$RUN/train.log" 2>&1
    stamp train-end
fi

if [[ " $STAGES " == *" eval "* ]]; then
    stamp eval-start
    python -m dflashkit.cli export --checkpoint "$RUN/train" --target "$W/smollm2" --out "$RUN/draft" --overwrite \
        > "$RUN/export.log" 2>&1
    flags=(--max-new-tokens 256 --dtype "$EVAL_DTYPE" --skip-lossless "${eval_args[@]}")
    RUN=$RUN DRAFT=$RUN/draft TARGET=$W/smollm2 MTBENCH="$(dirname "$PROMPTS")/mtbench.jsonl" CARDS="$GPUS" \
        bash bench/eval_slices.sh "${flags[@]}" &  # one slice per card
    pids=($!)
    on_gpu "${gpus[0]}" python -m dflashkit.cli eval --draft "$RUN/draft" --target "$W/smollm2" --out "$RUN/eval/heldout" \
        --heldout "$PROMPTS" --heldout-skip "$N" --train-log "$RUN/train/metrics.jsonl" "${flags[@]}" \
        > "$RUN/eval-heldout.log" 2>&1 &
    pids+=($!)
    run_all "${pids[@]}"
    python bench/merge_eval_reports.py "$RUN/eval/merged.json" "$RUN"/eval/*/report.json | tee "$RUN/eval/merged.txt"
    stamp eval-end
fi
