"""SIGKILL of the generate client at seeded random points (against the session's real vLLM server), sometimes with a
torn half line left at the end of the shard file as a node crash would leave it. After each kill the shard has no
done-marker, or (killed on its way out, then no fault) a marker and every conversation; after the final rerun every
conversation is present exactly once and the marker's counts reconcile."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from faultlib import SEED, Stage, inject_kill, report, rounds

from dflashkit.io import iter_jsonl

REPO = Path(__file__).resolve().parents[2]
SHARD = "shard-00000-of-00001"
N = 12
# Short replies: a round's cost is the CPU server's decode steps, and what is checked (ids, counts, markers, whole
# lines) does not depend on a reply's length. Kill points are set by conversations on disk, not by tokens.
MAX_TOKENS = "6"


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def whole_shard(out: Path) -> None:
    """What a done-marker promises: every conversation exactly once, whole lines, the counts reconciled."""
    shard, marker = out / f"{SHARD}.jsonl", out / f"{SHARD}.done.json"
    assert json.loads(marker.read_text())["counts"] == {"input": N, "written": N, "skipped": 0, "errors": 0}
    assert sorted(obj["id"] for _, obj in iter_jsonl(shard)) == sorted(f"k{i}" for i in range(N))
    assert shard.read_bytes().endswith(b"\n")


def test_kill_generate_at_random_points(vllm_server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"k{i}", "messages": [
        {"role": "user", "content": f"Write one short sentence about the number {i}."}]}) + "\n" for i in range(N)))
    env = {**os.environ, "OPENAI_API_KEY": vllm_server.api_key}
    stage = Stage(progress=lambda out: lines(out / f"{SHARD}.jsonl"),
                  done=lambda out: (out / f"{SHARD}.done.json").exists(), complete=whole_shard)
    faults = torn = checked = lost = duplicated = late = 0
    for r in range(rounds("generate")):
        rng = random.Random(SEED * 1_000_003 + r)
        out = tmp_path / f"round{r}"
        cmd = [sys.executable, str(REPO / "server_generate.py"), "--input", str(inp), "--output-dir", str(out),
               "--model", vllm_server.model, "--base-url", f"{vllm_server.url}/v1", "--max-tokens", MAX_TOKENS,
               "--temperature", "0", "--concurrency", "3", "--no-progress"]
        shard = out / f"{SHARD}.jsonl"
        for _ in range(rng.randint(1, 3)):
            late += inject_kill(cmd, env, stage, out, rng, (0, N - 1), 0.4, tmp_path / "generate.log")
            faults += 1
            if rng.random() < 0.5 and shard.exists():
                with open(shard, "a") as f:  # what a crash in the middle of a line leaves
                    f.write('{"id": "k0", "messages": [{"role": "user", "content": "Wri')
                torn += 1
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        ids = [obj["id"] for _, obj in iter_jsonl(shard)]
        checked += len(ids)
        lost += N - len(set(ids))
        duplicated += len(ids) - len(set(ids))
        whole_shard(out)
    report("kill_generate", rounds=rounds("generate"),
           faults_injected=faults, torn_lines_injected=torn, late_kill_points_redrawn=late,
           records_checked=checked, lost=lost, duplicated=duplicated)
    assert faults >= 1
