#!/usr/bin/env bash
# One GPU run within a deadline: the tau-vs-data curve (issue 17), DSpark beside DFlash at the largest size
# (issue 18) and a draft from bf16 dumps beside one from fp8 dumps of the same records (issue 16), all on one card at
# once, beside recipe variants at the smallest size (issue 17's recipe search); then, alone on the card, the step
# rows (BENCH: the qwen3-8b online cost and the SmolLM2 online-vs-offline speed of issue 16, the minimax-m3 step row
# of issue 19) and, in the time left, the data engine on the ShareGPT conversations not answered yet.
#
#   W=/tmp/c GGUF=smollm2.gguf TOK=DIR MULTITURN=sharegpt-multiturn.jsonl MTBENCH=mtbench.jsonl OUT=DIR \
#       DEADLINE=$(( $(date +%s) + 1320 )) bash bench/curve_run.sh
#
# Data: the kept answers of bench/data (MULTITURN: the prompt file bench/data/README.md names) split by
# bench/curve_data.py into nested training sets of SIZES records and one held-out set of 256. Every run is
# configs/train/smollm2-quality.yaml with EPOCHS epochs, trained online (data.source=online), scored at each
# checkpoint on the held-out set (the trainer's served tau, heldout.jsonl), then exported and evaluated by our loop
# on the MT-Bench turn-1 prompts (MTBENCH, 256 tokens, bf16 target: the answers' dtype) in SLICES processes.
# FP8_RECORDS records are dumped in bf16 and in fp8 and trained offline for FP8_EPOCHS epochs each (FP8_HELDOUT of
# them held out, 128); PAIR lists the dtypes of that pair (default "bfloat16 float8_e4m3fn"; the peer needs bfloat16).
# A training still running EVAL_RESERVE seconds before the deadline is stopped and its last checkpoint evaluated.
# MTBENCH_EVAL=0 scores the sizes on the held-out set only (no export, no MT-Bench eval, no draft back): a recipe
# comparison at one size, SIZES and VARIANTS side by side.
# PEERS_SITE (a folder with specforge 0.2.0 installed, --no-deps) adds the peer row: SpecForge's trainer on the bf16
# dump for our run's steps (bench/peers/specforge_train.py), evaluated as ours. TRAIN_EXTRA adds dotted overrides to
# every run; EVAL_TOKENS (256) and HELDOUT (256) shrink a CPU check. DSPARK=0 leaves out the DSpark run.
# VARIANTS: ";"-separated "NAME [dotted overrides...]" runs at the smallest size beside its base run (dflash-SIZE),
# scored on the held-out set only (heldout.jsonl; no export or MT-Bench eval).
# BENCH: the step rows to run alone after the curve, in order, each while time is left: ovo (bench/online_vs_offline.py
# --parts smollm2 on OVO_PROMPTS: offline and online as the recipe trains, both with data.group_by_length 16, and
# online with its forward as CUDA graphs), qwen3 (its qwen3 part), m3 (bench/train_step.py minimax-m3 at
# micro-batch 4, without and with checkpointing), q8b (bench/gpu_suite.sh's qwen3-8b rows: our default step, then 2
# steps of it profiled, and SpecForge's from /tmp/peers; then the GPU step tests), s2 (bench/smollm2_step.py, 300
# steps: the recipe's steadiness, its recompilations by step and a profile of 3 more steps); empty skips them. ovo
# profiles 3 steps after its timed ones (--profile-steps): each mode's table in logs/ovo-profile-MODE.txt, the online steps' Chrome trace as
# $OUT/ovo-online-trace.json.gz. GEN=1 then runs bench/engine_run.sh's ShareGPT stage on the MULTITURN
# conversations the kept answers lack, until the deadline, and packs every ShareGPT answer into
# $OUT/answers-sharegpt.jsonl.xz (GEN_CONVERSATIONS: the first 15,024 of MULTITURN; GEN_SLOTS: 512).
# GEN_FIRST=S (at least 300) runs the data engine for S seconds before the curve instead: those conversations, then
# GEN_SYNTH prompts (200,000; cut at the deadline) synthesized with seed GEN_SEED (default: one more than the kept
# synthesized sets, the first of which used seed 1) apart from the kept ones, and
# their answers, all packed into $OUT to be kept; the curve's sets take the new records after the kept ones (its
# held-out set and the sizes that fit in the kept records stay as before; SIZES "... all" trains on everything).
# SIZES= (empty) runs no curve: the data engine (GEN_FIRST) and the BENCH rows only.
# What comes back ($OUT): results.tar.xz (logs, metrics, held-out scores, eval reports, timings, errors) and the largest
# DFlash draft as draft.tar.xz.part-NN (15 MiB pieces: cat them, then tar -xJf).
set -uo pipefail
: "${W:?}" "${GGUF:?}" "${TOK:?}" "${MULTITURN:?}" "${MTBENCH:?}" "${OUT:?}" "${DEADLINE:?}"
SIZES=${SIZES-5480 10961 all}; EPOCHS=${EPOCHS:-3}; FP8_RECORDS=${FP8_RECORDS:-2000}; FP8_EPOCHS=${FP8_EPOCHS:-6}
SLICES=${SLICES:-5}; EVAL_RESERVE=${EVAL_RESERVE:-300}; EVAL_TOKENS=${EVAL_TOKENS:-256}
read -r -a extra <<<"${TRAIN_EXTRA:-}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
left() { echo $(( DEADLINE - $(date +%s) - $1 )); }  # seconds to the deadline, less $1 kept for what follows
limit() { local s; s=$(left "$1"); echo $(( s > 1 ? s : 1 )); }  # the same as a timeout (at least 1 s)
stamp() { echo "$(date +%s) $*" | tee -a "$W/logs/timings.txt"; }
mkdir -p "$W/logs" "$W/runs" "$OUT"

bundle() {  # everything small that a run wrote, as one file in $OUT (runs in parallel bundle: each renames its own)
    local tmp="$OUT/.results-$BASHPID.tmp"
    (cd "$W" && find logs runs -type f \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' -o -name '*.txt' \
        -o -name '*.err' \) -not -path '*/checkpoints/*' -not -name 'mtbench-*.jsonl' -not -name 'generations.jsonl' -size -20M \
        | tar -cJf "$tmp" -T -) && mv "$tmp" "$OUT/results.tar.xz"
}

fit() {  # fit NAME OVERRIDES...: one training run on the card, stopped at its deadline
    local name=$1 run=$W/runs/$1; shift
    mkdir -p "$run"
    stamp "train-start $name"
    timeout "$(limit "$EVAL_RESERVE")" python train_dflash.py --config configs/train/smollm2-quality.yaml \
        target_model="$W/smollm2" output_dir="$run/train" data.num_workers=3 "$@" "${extra[@]}" > "$run/train.log" 2>&1
    stamp "train-end $name rc=$?"
}

train() {  # train NAME OVERRIDES...: fit, then export and eval (MTBENCH_EVAL=0: the held-out scores only)
    local name=$1 run=$W/runs/$1
    fit "$@"
    [[ ${MTBENCH_EVAL:-1} != 0 ]] || { bundle; return 0; }
    python -m dflashkit.cli export --checkpoint "$run/train" --target "$W/smollm2" --out "$run/draft" --overwrite \
        > "$run/export.log" 2>&1 || { stamp "export-failed $name"; return 1; }
    evaluate "$name"
}

evaluate() {  # evaluate NAME: runs/NAME/draft on the MT-Bench prompts in SLICES processes on the card, merged
    local name=$1 run=$W/runs/$1
    RUN=$run DRAFT=$run/draft TARGET=$W/smollm2 MTBENCH=$MTBENCH CARDS="$(printf '0 %.0s' $(seq "$SLICES"))" \
        TIMEOUT=$(limit 30) bash bench/eval_slices.sh --max-new-tokens "$EVAL_TOKENS" --dtype bfloat16 --skip-lossless
    python bench/merge_eval_reports.py "$run/eval/merged.json" "$run"/eval/mtbench-*/report.json \
        > "$run/eval/merged.txt" 2>&1
    stamp "eval-end $name $(grep -o '"tau": [0-9.]*' "$run/eval/merged.json" 2> /dev/null | head -1)"
    bundle
}

dumped() {  # dumped DTYPE: the FP8_RECORDS records dumped by the HF backend, then one offline run on them
    python compute_hidden_states_hf.py --model "$W/smollm2" --input "$W/fp8-records.jsonl" --output-dir "$W/dump-$1" \
        --chat-template smollm2-thinking-train --num-draft-layers 5 --dtype "$1" --max-seq-len 2048 --no-progress \
        > "$W/logs/dump-$1.log" 2>&1 || { stamp "dump-failed $1"; return 1; }
    stamp "dump-end $1 $(du -sb "$W/dump-$1" | cut -f1) bytes"
    train "dump-$1" "data.dump_dirs=[$W/dump-$1]" data.heldout_records="${FP8_HELDOUT:-128}" optim.epochs="$FP8_EPOCHS"
}

peer() {  # SpecForge 0.2's own trainer and defaults on the bf16 dump, for as many steps at the same global batch as
    # our run on it (which holds FP8_HELDOUT records out; SpecForge trains on all), our draft shape; then our eval
    local run=$W/runs/peer-specforge steps
    steps=$(tail -n 1 "$W/runs/dump-bfloat16/train/metrics.jsonl" | python -c 'import json, sys; print(json.load(sys.stdin)["step"])') \
        || { stamp "peer-failed: no steps of ours to match"; return 1; }
    mkdir -p "$run"; stamp "peer-start $steps steps"
    timeout "$(limit "$EVAL_RESERVE")" env PYTHONPATH="$PEERS_SITE:${PYTHONPATH:-}" python bench/peers/specforge_train.py \
        --dump "$W/dump-bfloat16" --out "$run" --target "$W/smollm2" --mask-token-id 16 --steps "$steps" \
        --global-batch 32 --micro-batch "${PEER_MICRO_BATCH:-8}" --num-layers 3 --block-size 16 ${PEER_ARGS:-} \
        > "$run/peer.txt" 2> "$run/peer.log"  # its step lines, then one JSON line
    stamp "peer-end rc=$?"
    [[ -f $run/draft/config.json ]] && evaluate peer-specforge
}

unpack() {  # unpack NAME PROMPTS: bench/data/smollm2-NAME-answers.jsonl.xz into $W/gen-NAME
    python -m dflashkit.generate.answers unpack "bench/data/smollm2-$1-answers.jsonl.xz" --prompts "$2" \
        --output-dir "$W/gen-$1" > /dev/null || { stamp "data-failed $1"; bundle; exit 1; }
}

generate() {  # generate UNTIL SYNTH: bench/engine_run.sh until UNTIL on the MULTITURN conversations the kept answers
    # lack, then (SYNTH > 0) prompts the target synthesizes apart from every kept prompt, and their answers; the
    # answers are packed into $OUT (answers-sharegpt: kept and new; answers-synth, synth-prompts: the new ones)
    stamp "gen $2"
    if [[ ! -d $W/engine/gen-sharegpt ]]; then  # the latest kept ShareGPT shard (each holds the earlier ones), answered
        # only for the rest
        mkdir -p "$W/engine/gen-sharegpt" && cp "$(ls -d "$W"/gen-sharegpt* | tail -1)/shard-00000-of-00001.jsonl" \
            "$W/engine/gen-sharegpt/"
    fi
    # (the assignments expand left to right: everything naming $W precedes W=)
    MODEL=$W/smollm2 SYNTH_EXCLUDE="${kept_prompts[*]}" W=$W/engine PROMPTS=$MULTITURN N=${GEN_CONVERSATIONS:-15024} \
        SLOTS=${GEN_SLOTS:-512} CHECK=0 SYNTH=$2 SYNTH_SEED=${GEN_SEED:-$(( ${#kept_prompts[@]} + 1 ))} DEADLINE=$1 bash bench/engine_run.sh \
        >> "$W/logs/gen.log" 2>&1
    cp "$W/engine/logs/timings.txt" "$W/logs/gen-timings.txt"
    stamp "gen-end $(cat "$W"/engine/gen-*/shard-00000-of-00001.jsonl | wc -l) conversations"
}

stamp convert
python bench/train_smollm2_data.py --gguf "$GGUF" --tokenizer-dir "$TOK" --prompts "$MULTITURN" \
    --model-out "$W/smollm2" > "$W/logs/convert.log" 2>&1 || { stamp convert-failed; bundle; exit 1; }
# The first kept sets (the curve's held-out set is drawn from them), then any kept by later runs
# (bench/data/README.md): sharegpt-RUN answers MULTITURN, synth-RUN its own synthesized prompts.
unpack sharegpt "$MULTITURN"
xz -dc bench/data/smollm2-synth-prompts.jsonl.xz > "$W/synth-prompts.jsonl" && unpack synth "$W/synth-prompts.jsonl"
more=() kept_prompts=("$W/synth-prompts.jsonl")
for f in bench/data/smollm2-sharegpt-*-answers.jsonl.xz bench/data/smollm2-synth-*-answers.jsonl.xz; do
    [[ -e $f ]] || continue
    name=$(basename "$f" -answers.jsonl.xz); name=${name#smollm2-}
    if [[ $name == sharegpt-* ]]; then
        unpack "$name" "$MULTITURN"
    else
        xz -dc "bench/data/smollm2-$name-prompts.jsonl.xz" > "$W/$name-prompts.jsonl" && unpack "$name" "$W/$name-prompts.jsonl"
        kept_prompts+=("$W/$name-prompts.jsonl")
    fi
    more+=("$W/gen-$name")
done
ls -d "$W"/gen-* | while read -r d; do echo "$d: $(wc -l < "$d/shard-00000-of-00001.jsonl") conversations"; done
if (( ${GEN_FIRST:-0} > 0 )); then  # new answers first; the curve takes them after the kept ones (curve_data --more)
    generate $(( $(date +%s) + GEN_FIRST )) "${GEN_SYNTH:-200000}"
    more+=("$W/engine/gen-sharegpt" "$W/engine/gen-synth")
fi
if [[ -z ${SIZES// /} ]]; then  # no curve: the data engine and the step rows only
    stamp "no curve: SIZES is empty"
else
    python bench/curve_data.py --inputs "$W/gen-sharegpt" "$W/gen-synth" --more "${more[@]}" \
        --heldout "${HELDOUT:-256}" --sizes $SIZES --out "$W/curve" | tee "$W/logs/curve-data.txt" || { stamp data-failed; bundle; exit 1; }
    largest=$(ls "$W"/curve/train-*.jsonl | sed 's/.*train-\([0-9]*\)\.jsonl/\1/' | sort -n | tail -1)
    head -n "$FP8_RECORDS" "$W/curve/train-$largest.jsonl" > "$W/fp8-records.jsonl"

    # truncate: the engine answers until a conversation reaches 2,048 tokens, which the training template can pass by
    # a token or two; skipping those (the default) made 3% of the records bad and stopped the first attempt.
    online=(data.source=online data.online.chat_template=smollm2-thinking-train data.online.length_policy=truncate
            data.heldout_records=0
            "data.online.heldout_inputs=[$W/curve/heldout.jsonl]" optim.epochs="$EPOCHS")
    pids=()
    for f in "$W"/curve/train-*.jsonl; do
        n=$(basename "$f" .jsonl); n=${n#train-}
        train "dflash-$n" "${online[@]}" "data.online.inputs=[$f]" & pids+=($!)
    done
    if [[ ${DSPARK:-1} == 1 ]]; then
        train "dspark-$largest" "${online[@]}" "data.online.inputs=[$W/curve/train-$largest.jsonl]" model.kind=dspark \
            model.block_size=15 & pids+=($!)
    fi
    smallest=$(ls "$W"/curve/train-*.jsonl | sed 's/.*train-\([0-9]*\)\.jsonl/\1/' | sort -n | head -1)
    IFS=';' read -r -a variants <<<"${VARIANTS:-}"
    for v in "${variants[@]}"; do
        read -r -a spec <<<"$v"
        (fit "${spec[0]}-$smallest" "${online[@]}" "data.online.inputs=[$W/curve/train-$smallest.jsonl]" \
            "${spec[@]:1}"; bundle) &
        pids+=($!)
    done
    (for dtype in ${PAIR-bfloat16 float8_e4m3fn}; do dumped "$dtype"; done) & pids+=($!)
    if [[ -n ${PEERS_SITE:-} ]]; then  # the peer starts when our run on the bf16 dump has trained
        (until grep -q "train-end dump-bfloat16" "$W/logs/timings.txt" || (( $(left 0) < 0 )); do sleep 10; done
         peer) &
        pids+=($!)
    fi
    wait "${pids[@]}"
    stamp curve-end
    [[ -d $W/runs/dflash-$largest/draft ]] && (cd "$W/runs/dflash-$largest" && tar -cJf "$W/draft.tar.xz" draft) \
        && split -b 15M -d "$W/draft.tar.xz" "$OUT/draft.tar.xz.part-"
    bundle
fi

for part in ${BENCH-ovo qwen3}; do  # alone on the card: timings, each while its time is left
    case $part in
    qwen3)
        (( $(left 0) > 200 )) || continue
        stamp qwen3-online
        timeout "$(limit 0)" python bench/online_vs_offline.py --parts qwen3 --work "$W/qwen3" \
            > "$W/logs/qwen3-online.jsonl" 2> "$W/logs/qwen3-online.err" ;;
    ovo)
        (( $(left 0) > 180 )) || continue
        [[ -n ${OVO_PROMPTS:-} ]] || { stamp "ovo skipped: no OVO_PROMPTS"; continue; }
        stamp ovo-smollm2
        timeout "$(limit 0)" python bench/online_vs_offline.py --parts smollm2 --model "$W/smollm2" \
            --prompts "$OVO_PROMPTS" --work "$W/ovo" --group-by-length 16 --steps 80 --warmup 40 --profile-steps 3 --cuda-graphs \
            > "$W/logs/ovo-smollm2.jsonl" 2> "$W/logs/ovo-smollm2.err"
        for m in "$W"/ovo/*/profile; do  # each mode's profile table; the online step's trace comes back beside
            cp "$m/rank0.txt" "$W/logs/ovo-profile-$(basename "$(dirname "$m")").txt" 2> /dev/null
        done
        cp "$W/ovo/online/profile/rank0.json.gz" "$OUT/ovo-online-trace.json.gz" 2> /dev/null
        rm -rf "$W/ovo/dump" ;;
    s2)  # the SmolLM2 recipe's step on a synthetic dump: its steadiness, with recompilations and a profile
        (( $(left 0) > 150 )) || continue
        stamp s2-step
        timeout "$(limit 0)" python bench/smollm2_step.py --work "$W/s2" --steps 300 --warmup-steps 30 \
            --profile-steps 3 --log-recompiles > "$W/logs/s2-step.jsonl" 2> "$W/logs/s2-step.err"
        cp "$W/s2/train-after/profile/rank0.txt" "$W/logs/s2-profile.txt" 2> /dev/null ;;
    q8b)  # issue 19's qwen3-8b rows, ours by default and SpecForge's (installed in /tmp/peers), then the GPU step tests
        (( $(left 0) > 240 )) || continue
        stamp q8b-step
        OUT=$W/suite BUDGET=$(limit 0) ROWS='^(specforge-)?q8b-mb1$' timeout "$(limit 0)" bash bench/gpu_suite.sh \
            > /dev/null 2>&1
        cp "$W/suite/gpu_suite.log" "$W/logs/q8b-suite.log"; cp "$W/suite/gpu_tests.log" "$W/logs/q8b-gpu-tests.log"
        cp "$W/suite/q8b-mb1-profile/rank0.txt" "$W/logs/q8b-profile.txt" ;;
    m3)
        for flags in "" "--activation-checkpointing"; do
            (( $(left 0) > 60 )) || break
            stamp "m3-step $flags"
            timeout "$(( $(left 0) < 150 ? $(left 0) : 150 ))" python bench/train_step.py --preset minimax-m3 \
                --micro-batch 4 $flags >> "$W/logs/m3-step.jsonl" 2>> "$W/logs/m3-step.err"
        done ;;
    *) stamp "unknown BENCH part $part" ;;
    esac
    stamp "$part-end"
    bundle
done
if [[ ${GEN:-0} == 1 ]] && (( $(left 0) > 90 )); then  # the conversations the kept answers lack (a rerun skips the rest)
    AFTER_SHAREGPT=30 generate "$DEADLINE" 0
fi
stamp done
bundle
