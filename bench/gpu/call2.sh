#!/usr/bin/env bash
# A GPU run's step call (issue 19), right after bench/gpu/call1.sh on the same warm machine (SpecForge is in
# /tmp/peers; on a fresh machine carry .gpu-carry/a again): the SmolLM2 recipe's step (bench/smollm2_step.py, 300
# steps: its steadiness, torch.compile's recompilations by step, a profile of 3 more steps), then bench/gpu_suite.sh's
# qwen3-8b rows (our default step and 2 of its steps profiled, SpecForge's step) and the GPU step tests (the default
# step against the plain fp32 reference, flex against dense attention). All synthetic inputs: no GGUF needed.
set -uo pipefail
: "${OUT:?}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[[ -d /tmp/peers/specforge ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/peers .gpu-carry/a/specforge-*.whl
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/device.txt"
timeout "${S2_LIMIT:-220}" python bench/smollm2_step.py --work /tmp/s2 --steps 300 --warmup-steps 30 \
    --profile-steps 3 --log-recompiles > "$OUT/s2-step.jsonl" 2> "$OUT/s2-step.err"
echo "s2 rc=$?"; tail -n 2 "$OUT/s2-step.jsonl" | cut -c1-600
cp /tmp/s2/train-after/profile/rank0.txt "$OUT/s2-profile.txt" 2> /dev/null
rm -rf /tmp/s2
OUT=$OUT/suite BUDGET=${SUITE_BUDGET:-300} ROWS='^(specforge-)?q8b-mb1$' bash bench/gpu_suite.sh > /dev/null 2>&1
find "$OUT/suite" -name '*.json.gz' -size +15M -delete  # a trace too large to come back
grep '^{' "$OUT/suite/gpu_suite.log" | cut -c1-400; tail -n 3 "$OUT/suite/gpu_tests.log"
