#!/usr/bin/env bash
# One GPU run of the data engine (issue 17) within a deadline: convert the GGUF target, check the engine against
# transformers (bench/engine_check.py), answer the multi-turn ShareGPT prompt set, then synthesize prompts with the
# target and answer them, each stage killed at its share of the time left. Compact answers come out in $OUT
# (python -m dflashkit.generate.answers pack; a stage cut by its deadline keeps the answers it finished).
#
#   W=/tmp/w GGUF=smollm2.gguf TOK=DIR PROMPTS=sharegpt-multiturn.jsonl N=15024 OUT=DIR DEADLINE=$(( $(date +%s) + 540 )) \
#       bash bench/engine_run.sh
#
# N: the training records of PROMPTS (the held-out ones after them are not answered). SYNTH: prompts to synthesize
# (default 200000; the stage ends at its deadline with what it has; 0 skips synthesis), SYNTH_SEED its seed (1: the
# kept prompts' run; a later run takes another), SYNTH_EXCLUDE more prompt sets to keep new prompts apart from (the
# kept synthesized ones; PROMPTS always), SYNTH_OPENERS the openings of the synthesized user turns (default
# configs/synth/openers.txt; "" lets the model write the whole turn, as the kept sets of 2026-11/12-01/12-02 did).
# CHECK=0 skips the check.
# SLOTS, MAX_TOKENS, DTYPE. MODEL: an already converted target (then GGUF and TOK are not needed, nor converted).
# A folder W/gen-sharegpt holding answers already (unpacked, without its done-marker) is answered only for the rest.
set -uo pipefail
: "${W:?}" "${PROMPTS:?}" "${N:?}" "${OUT:?}" "${DEADLINE:?}"
model=${MODEL:-$W/smollm2}
SYNTH=${SYNTH:-200000}; SLOTS=${SLOTS:-512}; MAX_TOKENS=${MAX_TOKENS:-256}; DTYPE=${DTYPE:-bfloat16}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
left() { echo $(( DEADLINE - $(date +%s) - $1 )); }  # seconds to the deadline, less $1 kept for what follows
stamp() { echo "$(date +%s) $*" | tee -a "$W/logs/timings.txt"; }
engine=(python -m dflashkit.generate.engine --model "$model" --model-name smollm2-q4_1 --dtype "$DTYPE"
        --chat-template configs/templates/smollm2-thinking.jinja --thinking-modes adaptive
        --max-tokens "$MAX_TOKENS" --slots "$SLOTS")
pack() {  # pack NAME DIR: the shard's compact answers (in pieces under 15 MiB), its done-marker to the logs
    local out="$OUT/answers-$1.jsonl.xz"
    python -m dflashkit.generate.answers pack "$2/shard-00000-of-00001.jsonl" "$out"
    if [[ -f $out ]] && (( $(stat -c %s "$out") > 15 * 1024 * 1024 )); then split -b 15M -d "$out" "$out.part-" && rm "$out"; fi
    cp "$2/shard-00000-of-00001.done.json" "$W/logs/done-$1.json" 2> /dev/null
    bundle
}
bundle() { tar -cJf "$OUT/logs.tar.xz" -C "$W" logs; }  # logs, timings and markers as one file
mkdir -p "$W/logs" "$OUT"

if [[ -z ${MODEL:-} ]]; then
    stamp convert
    python bench/train_smollm2_data.py --gguf "${GGUF:?}" --tokenizer-dir "${TOK:?}" --prompts "$PROMPTS" \
        --model-out "$model" || exit 1
fi
if [[ ${CHECK:-1} != 0 ]]; then
    stamp check; timeout "$(left 300)" python bench/engine_check.py --model "$model" --prompts "$PROMPTS" \
        --out "$W/logs/check.json" 2>&1 | tee "$W/logs/check.log"; bundle
fi
stamp sharegpt; timeout "$(left "${AFTER_SHAREGPT:-200}")" "${engine[@]}" --input "$PROMPTS" --max-conversations "$N" \
    --output-dir "$W/gen-sharegpt" > "$W/logs/gen-sharegpt.log" 2>&1
stamp sharegpt-end "$(wc -l < "$W/gen-sharegpt/shard-00000-of-00001.jsonl") conversations"
pack sharegpt "$W/gen-sharegpt"
if (( SYNTH > 0 )); then
    rest=$(left 60)
    read -r -a exclude <<<"${SYNTH_EXCLUDE:-}"
    openers=(); [[ -n "${SYNTH_OPENERS-configs/synth/openers.txt}" ]] && \
        openers=(--synth-openers "${SYNTH_OPENERS-configs/synth/openers.txt}")
    stamp synth; timeout $(( rest * 3 / 10 )) "${engine[@]}" --synthesize "$SYNTH" --synth-exclude "$PROMPTS" "${exclude[@]}" \
        --seed "${SYNTH_SEED:-1}" "${openers[@]}" --output-dir "$W/synth" > "$W/logs/synth.log" 2>&1
    python -c 'import sys; from dflashkit.io import repair_jsonl_tail; repair_jsonl_tail(sys.argv[1])' \
        "$W/synth/prompts/shard-00000-of-00001.jsonl"
    stamp synth-end "$(wc -l < "$W/synth/prompts/shard-00000-of-00001.jsonl") prompts"
    xz -T0 -k -c "$W/synth/prompts/shard-00000-of-00001.jsonl" > "$OUT/synth-prompts.jsonl.xz"
    cp "$W/synth/shard-00000-of-00001.done.json" "$W/logs/done-synth-prompts.json" 2> /dev/null; bundle
    stamp gen-synth; timeout "$(left 30)" "${engine[@]}" --input "$W/synth/prompts" --output-dir "$W/gen-synth" \
        > "$W/logs/gen-synth.log" 2>&1
    stamp gen-synth-end "$(wc -l < "$W/gen-synth/shard-00000-of-00001.jsonl") conversations"
    pack synth "$W/gen-synth"
fi
ls -la "$OUT"
