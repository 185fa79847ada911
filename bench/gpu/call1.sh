#!/usr/bin/env bash
# A GPU run's first call (bench/gpu/carry.sh says how the calls go): the inputs of .gpu-carry/a into /tmp/g; the GPU
# tests of the online target's forward (queued without waiting, CUDA graphs equal to eager); then the online-vs-offline
# row (issue 16) on a random-weight SmolLM2 (its speed does not depend on the weights, so it needs no GGUF): offline,
# online as the recipe trains, and both with the forward as CUDA graphs and in length groups of 4,096 tokens, each
# mode's profile table after (OVO_RECORDS, OVO_STEPS, OVO_WARMUP, OVO_LIMIT shrink it for a short call). What comes
# back is in $OUT; bench/gpu/launch.sh reads the row and the tests' verdict.
set -uo pipefail
: "${OUT:?}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=/tmp/site:$PWD  # dflashkit is not installed there
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# SpecForge in a folder of its own: only curve_run.sh's q8b rows (after launch.sh) put it on their path
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/peers \
    .gpu-carry/a/specforge-*.whl
mkdir -p /tmp/g && cp .gpu-carry/a/mtbench.jsonl /tmp/g/ || exit 1
# launch.sh's half of the GGUF; a short run carries .gpu-carry/a without it (and runs no launch.sh)
cp .gpu-carry/a/gguf.xz.part-00 /tmp/g/ 2> /dev/null || echo "no GGUF part carried"
tar -xJf .gpu-carry/a/tok.tar.xz -C /tmp/g && xz -dc .gpu-carry/a/ovo.jsonl.xz > /tmp/g/ovo.jsonl || exit 1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/device.txt"
python -c 'import torch, transformers; print(torch.__version__, transformers.__version__)' | tee -a "$OUT/device.txt"
timeout 200 python -m pytest -q -p no:cacheprovider tests/gpu/test_online_target_async.py 2>&1 \
    | tee "$OUT/gpu_test.txt" /tmp/g/gpu_test.txt
python - <<'PY'
import shutil

import torch
from transformers import AutoConfig, AutoModelForCausalLM

torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("/tmp/g/tok")).save_pretrained("/tmp/g/rand")
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    shutil.copy(f"/tmp/g/tok/{name}", f"/tmp/g/rand/{name}")
PY
timeout "${OVO_LIMIT:-330}" python bench/online_vs_offline.py --parts smollm2 --model /tmp/g/rand \
    --prompts /tmp/g/ovo.jsonl --work /tmp/ovo --records "${OVO_RECORDS:-640}" --steps "${OVO_STEPS:-80}" \
    --warmup "${OVO_WARMUP:-40}" --log-every 10 --cuda-graphs \
    --forward-costs 4096 --profile-steps 3 > "$OUT/ovo.jsonl" 2> "$OUT/ovo.err"
echo "ovo rc=$?"
cp "$OUT/ovo.jsonl" /tmp/g/ovo-result.jsonl
for m in /tmp/ovo/*/profile; do cp "$m/rank0.txt" "$OUT/profile-$(basename "$(dirname "$m")").txt" 2> /dev/null; done
rm -rf /tmp/ovo/dump
cat "$OUT/ovo.jsonl"; tail -n 5 "$OUT/ovo.err"
