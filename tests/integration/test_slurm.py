"""The stages on a real Slurm cluster (.ci/slurm/setup.sh: two nodes n1/n2 on this host, fake GPUs, accounting).

One generate run of 4 shards against CPU vLLM (each task starts its own server through worker.sh), with the dump
chained after it, and the real trainer on 2 nodes after that when the checkout has it. Shard 2 is cancelled
mid-generation: status names it failed with the reason, the later stages are cancelled by their never-satisfiable
dependencies, the cancelled shard's partial file is resumable, and `rerun` resubmits exactly that index and chains the
later stages again. The local executor then repeats the generate run without Slurm and must give identical records.
Plus the 2-node torch.distributed check through slurm/train.sbatch (srun + torchrun, gloo).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dflashkit.io import iter_jsonl
from dflashkit.recipe import ROOT
from tests.helpers.procs import wait_until
from tests.helpers.slurm import DEMO, dflashkit, records, sacct_job, settled, shard_states, status

pytestmark = pytest.mark.integration

NUM_SHARDS, NUM_CONVERSATIONS, VICTIM = 4, 12, 2
# Small and deterministic: greedy, one request at a time per shard (same batches, same numbers on every run).
GENERATE = [f"generate.num_shards={NUM_SHARDS}", f"generate.max_conversations={NUM_CONVERSATIONS}",
            "generate.max_tokens=16", "generate.temperature=0.0", "generate.seed=0", "generate.concurrency=1",
            "generate.server_startup_timeout=400", "generate.slurm.throttle=2", "generate.slurm.time=00:20:00",
            "run.local_parallel=2", "dump.num_shards=1", "dump.slurm.gpus_per_task=0",
            # two nodes, one gloo process each, a few steps (the demo recipe's tiny draft)
            "train.slurm.nodes=2", "train.slurm.gpus_per_task=0", "train.processes_per_node=1",
            "train.config.optim.max_steps=4", "train.config.checkpoint_every=2"]
# The trainer is chained after the dump when this checkout has it.
TRAINER = (ROOT / "train_dflash.py").exists() and (ROOT / "dflashkit" / "train" / "loop.py").exists()
STAGES = "generate,dump,train" if TRAINER else "generate,dump"


@pytest.fixture(scope="module")
def slurm_run(cluster, prepared, tmp_path_factory):
    """The generate+dump run on Slurm, with shard VICTIM cancelled mid-shard, then rerun. Returns what each step saw."""
    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    seen: dict = {"run_dir": run_dir}
    dflashkit("submit", "--recipe", str(DEMO), "--stages", STAGES, f"run.dir={run_dir}", *GENERATE)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    gen_job = manifest["stages"]["generate"]["submissions"][0]["job_id"]
    dump_job = manifest["stages"]["dump"]["submissions"][0]["job_id"]
    seen["first_dump_job"] = dump_job
    if TRAINER:
        seen["first_train_job"] = manifest["stages"]["train"]["submissions"][0]["job_id"]
    assert manifest["stages"]["dump"]["submissions"][0]["dependency"] == [gen_job]

    # Cancel the victim once it has written at least one conversation: it dies mid-shard, like a preempted task.
    victim_file = run_dir / "generate" / f"shard-{VICTIM:05d}-of-{NUM_SHARDS:05d}.jsonl"
    wait_until("a conversation in the victim shard",
               lambda: victim_file.exists() and victim_file.read_bytes().count(b"\n") >= 1, every=0.05)
    subprocess.run(["scancel", f"{gen_job}_{VICTIM}"], check=True)
    seen["failed_status"] = wait_until("generate to settle", lambda: settled(run_dir), every=2)
    seen["failed_table"] = dflashkit("status", str(run_dir), check=False)
    seen["victim_lines_after_cancel"] = sum(1 for _ in iter_jsonl(victim_file))
    seen["first_dump_sacct"] = sacct_job(dump_job)
    if TRAINER:
        seen["first_train_sacct"] = sacct_job(seen["first_train_job"])

    seen["rerun"] = dflashkit("rerun", str(run_dir), "--stage", "generate")
    seen["manifest_after_rerun"] = json.loads((run_dir / "manifest.json").read_text())
    seen["final_status"] = wait_until("the rerun and the dump", lambda: settled(run_dir), every=2)
    seen["final_table"] = dflashkit("status", str(run_dir), "--all", check=False)
    print(f"status before the rerun:\n{seen['failed_table'].stdout}\n{seen['rerun'].stdout}\n"
          f"status after:\n{seen['final_table'].stdout}")  # shown with pytest -rP
    return seen


def test_cancelled_shard_is_reported_failed_with_reason(slurm_run):
    st = slurm_run["failed_status"]
    states = shard_states(st, "generate")
    assert states == ["done" if k != VICTIM else "failed" for k in range(NUM_SHARDS)], slurm_run["failed_table"].stdout
    victim = st["stages"]["generate"]["shards"][VICTIM]
    assert victim["slurm_state"] == "CANCELLED" and "CANCELLED" in victim["reason"]
    assert victim["log"] and Path(victim["log"]).exists()
    assert st["stages"]["generate"]["counts"] == {"done": 3, "stale": 0, "failed": 1, "running": 0, "pending": 0,
                                                 "missing": 0}
    assert slurm_run["failed_table"].returncode == 1  # status exits non-zero while a shard failed
    assert "CANCELLED" in slurm_run["failed_table"].stdout


def test_later_stages_never_start_after_a_failed_generate(slurm_run):
    """--kill-on-invalid-dep: the dump (and the train after it) are cancelled, not left pending, and never ran."""
    rows = [*slurm_run["first_dump_sacct"].values(), *slurm_run.get("first_train_sacct", {}).values()]
    for row in rows:
        assert row["state"] == "CANCELLED" and row["start"] in ("Unknown", "None", "")
        assert "Dependency" in row["reason"] or row["reason"] == "None"
    assert shard_states(slurm_run["failed_status"], "dump") == ["failed"]


def test_cancelled_shard_left_a_resumable_partial_file(slurm_run):
    n = slurm_run["victim_lines_after_cancel"]
    assert 1 <= n < NUM_CONVERSATIONS // NUM_SHARDS  # cut mid-shard, whole lines only
    run_dir = slurm_run["run_dir"]
    rerun_job = slurm_run["manifest_after_rerun"]["stages"]["generate"]["submissions"][-1]["job_id"]
    log = (run_dir / "logs" / f"generate-{rerun_job}_{VICTIM}.out").read_text()
    assert f"resuming: {n} conversations already in" in log


def test_rerun_resubmits_only_the_failed_index_and_rechains_the_dump(slurm_run):
    subs = slurm_run["manifest_after_rerun"]["stages"]
    assert subs["generate"]["submissions"][-1]["indices"] == [VICTIM]
    assert f"--array={VICTIM}%2" in subs["generate"]["submissions"][-1]["command"]
    new_dump = subs["dump"]["submissions"][-1]
    assert new_dump["job_id"] != slurm_run["first_dump_job"]
    assert new_dump["dependency"] == [subs["generate"]["submissions"][-1]["job_id"]]
    if TRAINER:
        assert subs["train"]["submissions"][-1]["dependency"] == [new_dump["job_id"]]
    assert "rerunning shard(s) 2" in slurm_run["rerun"].stdout


def test_after_rerun_every_shard_is_done_complete_and_unique(slurm_run):
    st = slurm_run["final_status"]
    assert shard_states(st, "generate") == ["done"] * NUM_SHARDS, slurm_run["final_table"].stdout
    assert shard_states(st, "dump") == ["done"], slurm_run["final_table"].stdout
    recs = records(slurm_run["run_dir"] / "generate")
    assert len(recs) == NUM_CONVERSATIONS
    assert sorted(r["generation"]["index"] for r in recs.values()) == list(range(NUM_CONVERSATIONS))
    written = sum(s["counts"]["written"] for s in st["stages"]["generate"]["shards"])
    assert written == NUM_CONVERSATIONS


def test_dump_ran_only_after_generate_finished(slurm_run):
    subs = slurm_run["manifest_after_rerun"]["stages"]
    gen = sacct_job(subs["generate"]["submissions"][-1]["job_id"])
    dump = sacct_job(subs["dump"]["submissions"][-1]["job_id"])
    gen_end = max(r["end"] for r in gen.values())
    (dump_row,) = dump.values()
    assert dump_row["state"] == "COMPLETED" and dump_row["start"] >= gen_end  # ISO times compare as strings


def test_two_node_training_after_the_dump(slurm_run):
    """The real trainer through submit: slurm/train.sbatch, srun + torchrun on n1 and n2, after the dump."""
    if not TRAINER:
        pytest.skip("the train stage (train_dflash.py, dflashkit/train/) is not in this checkout")
    subs = slurm_run["manifest_after_rerun"]["stages"]
    assert shard_states(slurm_run["final_status"], "train") == ["done"], slurm_run["final_table"].stdout
    job = subs["train"]["submissions"][-1]["job_id"]
    (row,) = sacct_job(job).values()
    (dump_row,) = sacct_job(subs["dump"]["submissions"][-1]["job_id"]).values()
    assert row["state"] == "COMPLETED" and row["start"] >= dump_row["end"]
    log = (slurm_run["run_dir"] / "logs" / f"train-{job}.out").read_text()
    assert "2 node(s) x 1 process(es), rendezvous n1:" in log
    assert "global batch 2" in log  # two ranks, one per node
    assert json.loads((slurm_run["run_dir"] / "train" / "done.json").read_text())["job_id"] == job


def test_local_executor_gives_identical_records(slurm_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "local"
    proc = dflashkit("submit", "--recipe", str(DEMO), "--stages", "generate", "--executor", "local",
                     f"run.dir={run_dir}", *GENERATE)
    assert "executor local" in proc.stdout
    st = status(run_dir)
    assert shard_states(st, "generate") == ["done"] * NUM_SHARDS
    local, slurm = records(run_dir / "generate"), records(slurm_run["run_dir"] / "generate")
    assert local.keys() == slurm.keys()
    for cid in slurm:
        assert local[cid] == slurm[cid], cid


def test_two_node_allreduce_through_train_sbatch(cluster, tmp_path):
    """slurm/train.sbatch on 2 nodes (one torchrun per node, rendezvous on the first node): a gloo all-reduce in
    place of the trainer, as train.sbatch runs whatever TRAIN_ENTRY names."""
    check = tmp_path / "allreduce_check.py"
    check.write_text(
        "import json, os, sys, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "t = torch.tensor([float(dist.get_rank() + 1)])\n"
        "dist.all_reduce(t)\n"
        "out = {'rank': dist.get_rank(), 'world': dist.get_world_size(), 'sum': t.item(),\n"
        "       'node': os.environ['SLURMD_NODENAME'], 'steps': sys.argv[1:]}\n"
        "open(os.path.join(os.environ['CHECK_DIR'], f\"rank{dist.get_rank()}.json\"), 'w').write(json.dumps(out))\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "PYTHON": sys.executable, "DFLASHKIT_ROOT": str(ROOT), "TRAIN_ENTRY": str(check),
           "CHECK_DIR": str(tmp_path), "NPROC_PER_NODE": "1", "DONE_MARKER": str(tmp_path / "done.json")}
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--time=00:05:00", f"--output={tmp_path}/train-%j.out",
                          str(ROOT / "slurm" / "train.sbatch"), "--steps", "3"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    wait_until("the 2-node job", lambda: (tmp_path / "done.json").exists() or
               sacct_job(job).get(job, {}).get("state") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
               timeout=240, every=1)
    log = (tmp_path / f"train-{job}.out").read_text()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["sum"] for r in results] == [3.0, 3.0], log
    assert {r["world"] for r in results} == {2}
    assert {r["node"] for r in results} == {"n1", "n2"}  # one process on each node
    assert results[0]["steps"] == ["--steps", "3"]  # the script's arguments reach the entry
    assert "rendezvous n1:" in log
    assert json.loads((tmp_path / "done.json").read_text())["job_id"] == job
