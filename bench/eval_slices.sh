#!/usr/bin/env bash
# Our loop on the MT-Bench turn-1 prompts in parallel slices: one `dflashkit eval` process per entry of CARDS (a card
# may repeat, so several processes share it), slice i holding the prompt lines k with k mod n = i, so every slice has
# every category. Reports go to $RUN/eval/mtbench-$i/report.json (merge them, with any other report, by
# bench/merge_eval_reports.py), logs to $RUN/eval-mtbench-$i.log. The arguments go to every eval; TIMEOUT (seconds)
# stops each process. Exits non-zero if any slice failed.
#
#   RUN=DIR DRAFT=DIR TARGET=DIR MTBENCH=mtbench.jsonl CARDS="0 1" bash bench/eval_slices.sh --max-new-tokens 256 ...
set -uo pipefail
: "${RUN:?}" "${DRAFT:?}" "${TARGET:?}" "${MTBENCH:?}" "${CARDS:?}"
read -r -a cards <<<"$CARDS"
mkdir -p "$RUN"
pids=()
for i in "${!cards[@]}"; do
    awk -v n="${#cards[@]}" -v i="$i" '(NR - 1) % n == i' "$MTBENCH" > "$RUN/mtbench-$i.jsonl"
    CUDA_VISIBLE_DEVICES=${cards[$i]} ${TIMEOUT:+timeout $TIMEOUT} python -m dflashkit.cli eval --draft "$DRAFT" \
        --target "$TARGET" --out "$RUN/eval/mtbench-$i" --mtbench "$RUN/mtbench-$i.jsonl" "$@" \
        > "$RUN/eval-mtbench-$i.log" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
