"""Preemption on the real test cluster (.ci/slurm/setup.sh): `scontrol requeue` of a RUNNING generate array task.

The task is requeued once a conversation is on disk. Slurm stops it (its server and client with it) and starts it
again as the same array task (`--requeue`, log appended: `--open-mode=append`). The second attempt resumes the shard:
the conversations written before the requeue stay as they were, none is written twice, and the stage completes.
"""
from __future__ import annotations

import json
import subprocess

import pytest
from test_slurm import (
    DEMO,
    _cluster_problem,
    dflashkit,
    records,
    sacct_job,
    settled,
    shard_states,
    wait_until,
)

from dflashkit.io import iter_jsonl

pytestmark = pytest.mark.integration

N = 6  # one shard, one request at a time: long enough (seconds per conversation) to be requeued mid-shard
GENERATE = ["generate.num_shards=1", f"generate.max_conversations={N}", "generate.max_tokens=16",
            "generate.temperature=0.0", "generate.seed=0", "generate.concurrency=1",
            "generate.server_startup_timeout=400", "generate.slurm.time=00:20:00"]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def test_requeued_generate_task_resumes_and_every_conversation_lands_once(prepared, tmp_path):
    run_dir = tmp_path / "run"
    dflashkit("submit", "--recipe", str(DEMO), "--stages", "generate", f"run.dir={run_dir}", *GENERATE)
    job = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]["submissions"][0]["job_id"]
    shard = run_dir / "generate" / "shard-00000-of-00001.jsonl"
    wait_until("a conversation in the shard", lambda: shard.exists() and shard.read_bytes().count(b"\n") >= 1,
               every=0.05)
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True, timeout=60)
    before = [obj["id"] for _, obj in iter_jsonl(shard)]  # whole lines only: the client appends a line at a time

    st = wait_until("the requeued task to finish", lambda: settled(run_dir), every=2)
    assert shard_states(st, "generate") == ["done"], dflashkit("status", str(run_dir), check=False).stdout
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", f"{job}_0", "-o", "State"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert "REQUEUED" in history and sacct_job(job)[f"{job}_0"]["state"] == "COMPLETED", history
    log = (run_dir / "logs" / f"generate-{job}_0.out").read_text()
    assert "restart 0" in log and "restart 1" in log, log[-3000:]  # both attempts, one appended log
    resumed = int(log.split("resuming: ", 1)[1].split()[0])
    assert len(before) <= resumed < N, log[-3000:]  # requeued mid-shard; nothing written before it was lost

    ids = [obj["id"] for _, obj in iter_jsonl(shard)]
    assert ids[:len(before)] == before, "what was written before the requeue is kept as it was"
    recs = records(run_dir / "generate")  # raises on an id written twice
    assert len(ids) == len(recs) == N
    assert sorted(r["generation"]["index"] for r in recs.values()) == list(range(N))
    assert st["stages"]["generate"]["shards"][0]["counts"]["written"] == N
