#!/usr/bin/env bash
# Several training recipes side by side on one dump, one GPU each, scored on the same held-out records and prompts
# (issue 6: which lever moves tau). Run bench/quality_run.sh with STAGES="gen dump" first, then, with the same
# W GGUF TOK PROMPTS N:
#
#   VARIANTS="ce loss.kd_weight=0;kd;deep model.num_layers=5" GPUS="0 1 2" bash bench/train_variants.sh
#
# DSpark beside DFlash on the same dump, both drafting 15 tokens per step (a DSpark block of B slots drafts B, a
# DFlash one B-1), all 80 MT-Bench turn-1 prompts:
#
#   VARIANTS="dflash model.kind=dflash;dspark model.kind=dspark model.block_size=15" GPUS="0 1" \
#       EVAL_ARGS="--per-category 10" bash bench/train_variants.sh
#
# VARIANTS: ";"-separated "NAME [dotted overrides...]", one per card in GPUS (same count). COMMON adds overrides to all
# of them. Each variant is bench/quality_run.sh's train and eval stages on its card, with RUN=$W/variants/NAME:
# trained, exported, evaluated by our loop on MT-Bench turn 1 and on held-out prompts (EVAL_ARGS, default 5 prompts
# per category). The table at the end gives each variant's last held-out score (the trainer's heldout.jsonl) and its
# MT-Bench tau, with the draft kind and the median training step time; it is also written to $W/variants/table.txt.
set -euo pipefail
: "${W:?}" "${GPUS:?}" "${VARIANTS:?}"
read -r -a gpus <<<"$GPUS"
IFS=';' read -r -a variants <<<"$VARIANTS"
(( ${#variants[@]} == ${#gpus[@]} )) || { echo "train_variants: ${#variants[@]} variants for ${#gpus[@]} GPUs" >&2; exit 2; }
mkdir -p "$W/variants"

pids=()
for i in "${!variants[@]}"; do
    read -r -a spec <<<"${variants[$i]}"
    run=$W/variants/${spec[0]}
    RUN=$run GPUS=${gpus[$i]} STAGES="train eval" TRAIN_ARGS="${COMMON:-} ${spec[*]:1}" \
        EVAL_ARGS="${EVAL_ARGS:---per-category 5}" bash bench/quality_run.sh > "$run.log" 2>&1 &
    pids+=($!)
    echo "variant ${spec[0]} on GPU ${gpus[$i]}: ${spec[*]:1} (log: $run.log)"
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
python - "$W/variants" <<'EOF' | tee "$W/variants/table.txt"
import json, pathlib, sys
import statistics
from dflashkit.model import kind_of_config
print(f"{'variant':<12} {'kind':<7} {'steps':>6} {'step s':>7} {'heldout loss':>12} {'heldout tau':>11} "
      f"{'heldout acc1':>12} {'MT-Bench tau':>12}")
for d in sorted(p for p in pathlib.Path(sys.argv[1]).iterdir() if p.is_dir()):
    rows = (d / "train/heldout.jsonl").read_text().splitlines() if (d / "train/heldout.jsonl").exists() else []
    last = json.loads(rows[-1]) if rows else {}
    steps = [json.loads(r) for r in (d / "train/metrics.jsonl").read_text().splitlines()] \
        if (d / "train/metrics.jsonl").exists() else []
    step_s = statistics.median(r["step_time_s"] for r in steps[len(steps) // 10:]) if steps else float("nan")
    draft = d / "draft/config.json"
    kind = kind_of_config(json.loads(draft.read_text())).name if draft.exists() else "?"
    merged = d / "eval/merged.json"
    tau = json.loads(merged.read_text())["overall"]["tau"] if merged.exists() else float("nan")
    print(f"{d.name:<12} {kind:<7} {last.get('step', 0):>6} {step_s:>7.3f} {last.get('loss', float('nan')):>12.3f} "
          f"{last.get('tau', float('nan')):>11.3f} {last.get('acc_per_pos', [float('nan')])[0]:>12.3f} {tau:>12.3f}")
EOF
exit $rc
