"""Preemption on the real test cluster (.ci/slurm/setup.sh): `scontrol requeue` of a RUNNING generate array task.

The task is requeued once a conversation is on disk. Slurm stops it (its server and client with it) and starts it
again as the same array task (`--requeue`, log appended: `--open-mode=append`). The second attempt resumes the shard:
the conversations written before the requeue stay as they were, none is written twice, and the stage completes.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from dflashkit.io import iter_jsonl
from tests.helpers.procs import wait_until
from tests.helpers.slurm import DEMO, dflashkit, records, sacct_job, settled, shard_states

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cluster")]

N = 6  # one shard, one request at a time: long enough (seconds per conversation) to be requeued mid-shard
GENERATE = ["generate.num_shards=1", f"generate.max_conversations={N}", "generate.max_tokens=16",
            "generate.temperature=0.0", "generate.seed=0", "generate.concurrency=1",
            "generate.server_startup_timeout=400", "generate.slurm.time=00:20:00"]


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


DUMP_TRAIN = ["dump.num_shards=1", "dump.slurm.gpus_per_task=0", "dump.slurm.time=00:20:00",
              "train.slurm.nodes=1", "train.slurm.gpus_per_task=0", "train.slurm.time=00:20:00",
              "train.config.optim.max_steps=6", "train.config.checkpoint_every=2"]
RECORDS = 6


def requeue(job: str) -> None:
    """Preempt a running job the way the scheduler does, then let it start again at once (Slurm holds a requeued
    job until its next scheduling pass, which on this idle cluster can be minutes)."""
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    start_now = ["scontrol", "update", f"JobId={job}", "StartTime=now"]  # refused until the job is pending again
    wait_until(f"{job} to be pending again", lambda: subprocess.run(
        start_now, capture_output=True, timeout=60, check=False).returncode == 0, timeout=120, every=0.5)


def requeued_once_and_completed(job: str) -> None:
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "State"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert history.count("REQUEUED") == 1 and sacct_job(job.split("_")[0])[job]["state"] == "COMPLETED", history


def test_requeued_dump_and_train_jobs_resume_and_complete_once(prepared, tmp_path):
    """`scontrol requeue` of the running dump task once a record is written, then of the running trainer once a
    checkpoint is: each second attempt resumes (the dump keeps its records, the trainer its checkpoint) and completes
    exactly once."""
    from dflashkit.dump import list_dump_records, load_dump_record, read_meta
    from dflashkit.dump.format import RECORD_KEYS

    run_dir = tmp_path / "run"
    generate = run_dir / "generate"  # a finished generate stage
    generate.mkdir(parents=True)
    (generate / "shard-00000-of-00001.jsonl").write_text("".join(json.dumps({
        "id": f"conv-{i}", "thinking_mode": None, "generation": {"chat_template_kwargs": {}, "index": i},
        "messages": [{"role": "user", "content": f"Name a fruit ({i})."},
                     {"role": "assistant", "content": "An apple. " * (8 + i)}]}) + "\n" for i in range(RECORDS)))
    (generate / "shard-00000-of-00001.done.json").write_text(json.dumps({"stage": "generate", "counts": {}}))
    dflashkit("submit", "--recipe", str(DEMO), "--stages", "dump,train", f"run.dir={run_dir}", *DUMP_TRAIN)
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    dump_job, train_job = (stages[s]["submissions"][0]["job_id"] for s in ("dump", "train"))

    dump = run_dir / "dump"
    wait_until("a dump record", lambda: list_dump_records(dump) if dump.exists() else [], every=0.05)
    requeue(f"{dump_job}_0")
    before = {p.name: load_dump_record(p) for p in list_dump_records(dump)}  # whole files only, never rewritten

    latest = run_dir / "train" / "checkpoints" / "latest.json"
    wait_until("a train checkpoint", latest.exists, timeout=900, every=0.05)
    seen = json.loads(latest.read_text())["step"]
    requeue(train_job)

    st = wait_until("the requeued jobs to finish", lambda: settled(run_dir), timeout=900, every=2)
    assert shard_states(st, "dump") == ["done"] and shard_states(st, "train") == ["done"], \
        dflashkit("status", str(run_dir), check=False).stdout
    requeued_once_and_completed(f"{dump_job}_0")
    requeued_once_and_completed(train_job)

    meta = read_meta(dump)
    assert meta["counts"]["written"] == RECORDS and 1 <= meta["counts"]["resumed"] < RECORDS, meta["counts"]
    files = list_dump_records(dump)
    assert sorted(p.name for p in files) == sorted(f"conv-{i}.pt" for i in range(RECORDS))  # each once
    for name, rec in before.items():
        assert all(torch.equal(rec[k], load_dump_record(dump / name, meta)[k]) for k in RECORD_KEYS[:4]), name
    log = (run_dir / "logs" / f"dump-{dump_job}_0.out").read_text()
    assert "restart 0" in log and "restart 1" in log, log[-3000:]

    train_log = (run_dir / "logs" / f"train-{train_job}.out").read_text()
    assert "restart 0" in train_log and "restart 1" in train_log, train_log[-3000:]
    second = train_log.split("restart 1", 1)[1]
    assert "resumed from" in second, train_log[-3000:]  # from the checkpoint, not from scratch
    saved = int(second.split("resumed from", 1)[1].split(" at step ", 1)[1].split()[0])
    assert 2 <= seen <= saved < 6, (seen, saved)
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, 7)) and steps[-(6 - saved):] == list(range(saved + 1, 7)), steps
    assert json.loads((run_dir / "train" / "done.json").read_text())["job_id"] == train_job
