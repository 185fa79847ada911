#!/usr/bin/env bash
# Several training recipes side by side on one dump, one GPU each, scored on the same held-out records and MT-Bench
# prompts (issue 6: which lever moves tau). Run bench/quality_run.sh with STAGES="gen dump" first, then:
#
#   W=/tmp/q PROMPTS=prompts.jsonl GPUS="0 1 2" VARIANTS="ce loss.kd_weight=0;kd;deep model.num_layers=5" bash bench/train_variants.sh
#
# VARIANTS: ";"-separated "NAME [dotted overrides...]", one per card in GPUS (same count). COMMON adds overrides to all
# of them. Each trains configs/train/smollm2-quality.yaml into $W/variants/NAME, is exported to NAME/draft and
# evaluated by our loop on MT-Bench turn 1 (EVAL_ARGS, default 5 prompts per category). The table at the end gives
# each variant's last held-out score (heldout.jsonl) and its MT-Bench tau; it is also written to $W/variants/table.txt.
set -euo pipefail
: "${W:?}" "${GPUS:?}" "${VARIANTS:?}"
read -r -a gpus <<<"$GPUS"
read -r -a common <<<"${COMMON:-}"
read -r -a eval_args <<<"${EVAL_ARGS:---per-category 5}"
IFS=';' read -r -a variants <<<"$VARIANTS"
(( ${#variants[@]} == ${#gpus[@]} )) || { echo "train_variants: ${#variants[@]} variants for ${#gpus[@]} GPUs" >&2; exit 2; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$W/variants"
stamp() { echo "$(date +%s) $*" | tee -a "$W/timings.txt"; }
mtbench=$(dirname "${PROMPTS:?}")/mtbench.jsonl

stamp variants-start
pids=()
for i in "${!variants[@]}"; do
    read -r -a spec <<<"${variants[$i]}"
    name=${spec[0]} dir=$W/variants/${spec[0]}
    mkdir -p "$dir"
    (
        export CUDA_VISIBLE_DEVICES=${gpus[$i]}
        python train_dflash.py --config configs/train/smollm2-quality.yaml target_model="$W/smollm2" \
            output_dir="$dir/train" "data.dump_dirs=[$W/dump]" "${common[@]}" "${spec[@]:1}" > "$dir/train.log" 2>&1
        python -m dflashkit.cli export --checkpoint "$dir/train" --target "$W/smollm2" --out "$dir/draft" \
            --overwrite > "$dir/export.log" 2>&1
        python -m dflashkit.cli eval --draft "$dir/draft" --target "$W/smollm2" --out "$dir/eval" --mtbench "$mtbench" \
            --max-new-tokens 256 --dtype float32 --skip-lossless --train-log "$dir/train/metrics.jsonl" \
            "${eval_args[@]}" > "$dir/eval.log" 2>&1
    ) &
    pids+=($!)
    echo "variant $name on GPU ${gpus[$i]}: ${spec[*]:1}"
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
stamp variants-end
python - "$W/variants" <<'EOF' | tee "$W/variants/table.txt"
import json, pathlib, sys
print(f"{'variant':<12} {'steps':>6} {'heldout loss':>12} {'heldout tau':>11} {'heldout acc1':>12} {'MT-Bench tau':>12}")
for d in sorted(p for p in pathlib.Path(sys.argv[1]).iterdir() if p.is_dir()):
    rows = (d / "train/heldout.jsonl").read_text().splitlines() if (d / "train/heldout.jsonl").exists() else []
    last = json.loads(rows[-1]) if rows else {}
    report = d / "eval/report.json"
    tau = json.loads(report.read_text())["ours"]["overall"]["tau"] if report.exists() else float("nan")
    print(f"{d.name:<12} {last.get('step', 0):>6} {last.get('loss', float('nan')):>12.3f} "
          f"{last.get('tau', float('nan')):>11.3f} {last.get('acc_per_pos', [float('nan')])[0]:>12.3f} {tau:>12.3f}")
EOF
exit $rc
