#!/usr/bin/env bash
# watch.sh SECONDS: bench/gpu/launch.sh's run, every 30 s until it is done or SECONDS have passed (the GPU, the last
# stamps, each training's last logged step); then every file the run has put in its OUT so far into this call's $OUT.
: "${OUT:?}"
end=$(( $(date +%s) + ${1:-540} ))
while (( $(date +%s) < end )); do
    echo "== $(date +%T) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
    tail -n 3 /tmp/c/logs/timings.txt 2> /dev/null
    for f in /tmp/c/runs/*/train.log; do
        [[ -f $f ]] && echo "$(basename "$(dirname "$f")"): $(grep -o 'step [0-9]* |.*' "$f" | tail -n 1 | cut -c1-140)"
    done
    grep -q " done$" /tmp/c/logs/timings.txt 2> /dev/null && break
    sleep 30
done
tail -n 20 /tmp/c.log; cat /tmp/c/logs/timings.txt 2> /dev/null
cp /tmp/out/* /tmp/g/train-extra.txt "$OUT/" 2> /dev/null; ls -la "$OUT"
