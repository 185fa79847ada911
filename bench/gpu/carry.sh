#!/usr/bin/env bash
# The inputs of a GPU run on a machine that cannot download, in two folders that each travel with one call whose
# whole transfer (the tracked tree too) must stay under LIMIT_MIB (64): .gpu-carry/a (the first half of the xz'd
# SmolLM2 GGUF, its tokenizer, the ovo rows' ShareGPT prompts, MT-Bench, SpecForge's wheel) for bench/gpu/call1.sh,
# and .gpu-carry/b (the GGUF's second half, the multi-turn ShareGPT prompt set of bench/data/README.md) for
# bench/gpu/launch.sh; plus .whl, the gguf wheel the conversion needs (the GPU image lacks it). Both folders are
# git-ignored.
#
#   bash scripts/setup.sh && bash bench/gpu/carry.sh
#
# Then, with the device: call 1 carries .gpu-carry/a and .whl and runs `bash bench/gpu/call1.sh` (GPU tests of the
# online forward, the online-vs-offline row on a random-weight SmolLM2); call 2, within 30 s of its end (the machine
# keeps /tmp only while warm), carries .gpu-carry/b and runs `BUDGET=S bash bench/gpu/launch.sh && bash
# bench/gpu/watch.sh 540`; later calls carry nothing and run `bash bench/gpu/watch.sh 540` back to back. A run too
# short for the curve instead follows call 1 with `bash bench/gpu/call2.sh` (issue 19's step rows; carries nothing).
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${DFLASHKIT_CACHE:-$PWD/.cache/dflashkit}
PY=${PYTHON:-.venv/bin/python}
LIMIT=$(( ${LIMIT_MIB:-64} * 1024 * 1024 ))
gguf=$CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf model=$CACHE/models/SmolLM2-135M-Instruct
rm -rf .gpu-carry .whl && mkdir -p .gpu-carry/a .gpu-carry/b .whl /tmp/gpu-carry
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "gguf==$("$PY" -m pip show gguf | sed -n 's/^Version: //p')"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu-carry/a specforge==0.2.0  # the peer's step row
sha256sum "$gguf" | cut -c1-64 > .gpu-carry/b/gguf.sha256
xz -T0 -6 -c "$gguf" > /tmp/gpu-carry/gguf.xz  # Q4_1 blocks shrink by ~8%: just enough for two calls, not three
split -n 2 -d /tmp/gpu-carry/gguf.xz /tmp/gpu-carry/gguf.xz.part-
mv /tmp/gpu-carry/gguf.xz.part-00 .gpu-carry/a/ && mv /tmp/gpu-carry/gguf.xz.part-01 .gpu-carry/b/
tar -cJf .gpu-carry/a/tok.tar.xz --transform 's,^,tok/,' -C "$model" \
    tokenizer.json tokenizer_config.json chat_template.jinja config.json generation_config.json
head -n 2200 "$CACHE/prompts/sharegpt.jsonl" | xz -9e -T0 > .gpu-carry/a/ovo.jsonl.xz  # >= 1,280 replied
cp "$CACHE/prompts/mtbench.jsonl" .gpu-carry/a/
"$PY" bench/train_smollm2_data.py --prompts "$CACHE/prompts/sharegpt.jsonl" --multi-turn \
    --write-prompts /tmp/gpu-carry/multiturn.jsonl > /dev/null
xz -9e -T0 -c /tmp/gpu-carry/multiturn.jsonl > .gpu-carry/b/multiturn.jsonl.xz
rm -rf /tmp/gpu-carry
tree=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)
for call in "a .whl" "b"; do
    read -r -a dirs <<<"$call"; dirs[0]=.gpu-carry/${dirs[0]}
    total=$(( tree + $(du -cb "${dirs[@]}" | tail -n 1 | cut -f1) ))
    echo "${dirs[*]}: $(( total / 1024 / 1024 )) MiB with the tracked tree (limit $(( LIMIT / 1024 / 1024 )))"
    (( total < LIMIT )) || { echo "too large for one call: shrink the tree or split the GGUF in three" >&2; exit 1; }
done
