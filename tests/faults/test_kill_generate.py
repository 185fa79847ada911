"""SIGKILL of the generate client at seeded random points (against the session's real vLLM server), sometimes with a
torn half line left at the end of the shard file as a node crash would leave it. After each kill the shard has no
done-marker, or (killed on its way out) a marker and every conversation; after the final rerun every conversation is
present exactly once and the marker's counts reconcile."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from faultlib import SEED, report, rounds

from dflashkit.io import iter_jsonl

REPO = Path(__file__).resolve().parents[2]
SHARD = "shard-00000-of-00001"
N = 12
# Short replies: a round's cost is the CPU server's decode steps, and what is checked (ids, counts, markers, whole
# lines) does not depend on a reply's length. Kill points are set by conversations on disk, not by tokens.
MAX_TOKENS = "6"


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_kill_generate_at_random_points(vllm_server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"k{i}", "messages": [
        {"role": "user", "content": f"Write one short sentence about the number {i}."}]}) + "\n" for i in range(N)))
    env = {**os.environ, "OPENAI_API_KEY": vllm_server.api_key}
    faults = torn = checked = lost = duplicated = killed_after_marker = 0
    for r in range(rounds("generate")):
        rng = random.Random(SEED * 1_000_003 + r)
        out = tmp_path / f"round{r}"
        cmd = [sys.executable, str(REPO / "server_generate.py"), "--input", str(inp), "--output-dir", str(out),
               "--model", vllm_server.model, "--base-url", f"{vllm_server.url}/v1", "--max-tokens", MAX_TOKENS,
               "--temperature", "0", "--concurrency", "3", "--no-progress"]
        shard, marker = out / f"{SHARD}.jsonl", out / f"{SHARD}.done.json"
        for _ in range(rng.randint(1, 3)):
            target = rng.randint(0, N - 1)  # kill once this many conversations are on disk (0: during startup)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while lines(shard) < target and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.4))
            if proc.poll() is not None:
                break  # it finished first: nothing to inject this time
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            faults += 1
            if marker.exists():  # killed after writing its marker (on its way out): then the shard must be whole
                assert sorted(obj["id"] for _, obj in iter_jsonl(shard)) == sorted(f"k{i}" for i in range(N))
                killed_after_marker += 1
                break
            if rng.random() < 0.5 and shard.exists():
                with open(shard, "a") as f:  # what a crash in the middle of a line leaves
                    f.write('{"id": "k0", "messages": [{"role": "user", "content": "Wri')
                torn += 1
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        ids = [obj["id"] for _, obj in iter_jsonl(shard)]
        counts = json.loads(marker.read_text())["counts"]
        assert counts == {"input": N, "written": N, "skipped": 0, "errors": 0}
        checked += len(ids)
        lost += N - len(set(ids))
        duplicated += len(ids) - len(set(ids))
        assert sorted(ids) == sorted(f"k{i}" for i in range(N)), "every conversation exactly once"
        assert shard.read_bytes().endswith(b"\n")
    report("kill_generate", rounds=rounds("generate"),
           faults_injected=faults, torn_lines_injected=torn, killed_after_marker=killed_after_marker,
           records_checked=checked, lost=lost, duplicated=duplicated)
    assert faults >= 1
