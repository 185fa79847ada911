"""Status and rerun logic without a cluster: Slurm's text parsed, shard states derived from markers + job states,
rerun index lists, sbatch command lines."""
from __future__ import annotations

import json

import pytest

from dflashkit.recipe import ROOT, load_recipe
from dflashkit.rundir import open_run
from dflashkit.slurm import array_spec, expand_indices, parse_sacct, parse_squeue, sbatch_command
from dflashkit.stages import StageUnavailable, stage_job
from dflashkit.status import errors_summary, log_tail_reason, stage_status
from dflashkit.submit import rerun_indices

DEMO = ROOT / "configs" / "smollm2-demo.yaml"

SACCT = """\
13_0|COMPLETED|0:0|2026-11-27T09:33:11|2026-11-27T09:34:40|n1|None
13_0.batch|COMPLETED|0:0|2026-11-27T09:33:11|2026-11-27T09:34:40|n1|
13_1|FAILED|75:0|2026-11-27T09:33:11|2026-11-27T09:34:41|n1|NonZeroExitCode
13_2|CANCELLED by 0|0:15|2026-11-27T09:34:41|2026-11-27T09:35:02|n2|None
13_[3-5,7%2]|PENDING|0:0|Unknown|Unknown|None assigned|JobArrayTaskLimit
14|TIMEOUT|0:0|2026-11-27T09:33:11|2026-11-27T10:33:11|n[1-2]|None
"""


def test_parse_sacct_expands_pending_ranges_and_skips_steps():
    states = {t.task_id: t for t in parse_sacct(SACCT)}
    assert sorted(states) == ["13_0", "13_1", "13_2", "13_3", "13_4", "13_5", "13_7", "14"]
    assert states["13_1"].exit_code == 75 and states["13_1"].state == "FAILED"
    assert states["13_2"].state == "CANCELLED" and states["13_2"].signal == 15
    assert states["13_4"].state == "PENDING" and states["13_4"].start is None
    assert states["13_4"].reason == "JobArrayTaskLimit"
    assert states["14"].index is None and states["14"].nodes == "n[1-2]"


def test_parse_sacct_rejects_short_lines():
    with pytest.raises(ValueError, match="7"):
        parse_sacct("13_0|COMPLETED\n")


def test_parse_squeue():
    states = parse_squeue("13_2|RUNNING|None|n1\n13_3|PENDING|JobArrayTaskLimit|\n")
    assert [(t.task_id, t.state, t.reason) for t in states] == [("13_2", "RUNNING", None),
                                                                 ("13_3", "PENDING", "JobArrayTaskLimit")]


@pytest.mark.parametrize("spec,indices", [
    ("0-3", [0, 1, 2, 3]), ("[3,7,12]", [3, 7, 12]), ("1-7:3%2", [1, 4, 7]), ("5", [5]), ("[0-1,4]", [0, 1, 4])])
def test_expand_indices(spec, indices):
    assert expand_indices(spec) == indices


def test_array_spec_round_trip():
    assert array_spec([12, 3, 7]) == "3,7,12"
    assert array_spec([0, 1, 2, 3, 7, 9, 10], throttle=2) == "0-3,7,9-10%2"
    for idx in ([0], [0, 2, 4], list(range(10)), [1, 2, 5, 6, 7, 11]):
        assert expand_indices(array_spec(idx, 3)) == idx


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run dir of the demo recipe (4 generate shards), made by the real open_run."""
    monkeypatch.setenv("DFLASHKIT_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(DEMO, [f"run.dir={tmp_path / 'run'}"])
    run_dir, manifest = open_run(recipe, str(DEMO))
    job = stage_job(recipe, run_dir, "generate")
    job.out_dir.mkdir(parents=True)
    return recipe, run_dir, manifest, job


def _submit(manifest, job, job_id, indices, executor="slurm", **extra):
    rec = manifest["stages"].setdefault("generate", {"num_shards": job.num_shards, "submissions": []})
    rec["submissions"].append({"executor": executor, "job_id": job_id, "indices": indices, **extra})


def _mark_done(job, shard, written=2):
    job.marker(shard).write_text(json.dumps({"counts": {"input": written, "written": written}}))


def test_stage_status_from_markers_slurm_states_logs_and_errors(run):
    recipe, run_dir, manifest, job = run
    _submit(manifest, job, "13", [0, 1, 2, 3])
    _mark_done(job, 0)
    job.errors_file(1).write_text(json.dumps({"id": "a", "kind": "retryable", "reason": "timeout"}) + "\n")
    job.log_path(run_dir, "13", 1).write_text("worker.sh: server 0 healthy\nERROR dflashkit.generate: shard "
                                              "incomplete; rerun the shard\nworker.sh: exited with status 75\n")
    job.log_path(run_dir, "13", 2).write_text("slurmstepd: error: *** JOB 16 ON n1 CANCELLED AT x ***\n")
    states = {t.task_id: t for t in parse_sacct(SACCT)}
    shards = {s.shard: s for s in stage_status(run_dir, manifest, recipe, "generate", states)}
    assert shards[0].state == "done" and shards[0].counts == {"input": 2, "written": 2}
    assert shards[1].state == "failed" and shards[1].exit_code == 75
    assert "FAILED exit 75" in shards[1].reason and "1 retryable (timeout)" in shards[1].reason
    assert "log: ERROR dflashkit.generate: shard incomplete" in shards[1].reason  # the last line that says why
    assert shards[2].state == "failed" and "CANCELLED" in shards[2].reason and "CANCELLED AT" in shards[2].reason
    assert shards[3].state == "pending" and shards[3].reason == "JobArrayTaskLimit"
    assert rerun_indices(list(shards.values())[:3]) == [1, 2]
    with pytest.raises(StageUnavailable, match="still running or pending"):
        rerun_indices(list(shards.values()))


def test_later_submission_wins_and_missing_shards(run):
    recipe, run_dir, manifest, job = run
    _submit(manifest, job, "13", [0, 1])
    _submit(manifest, job, "20", [1])
    states = {t.task_id: t for t in parse_sacct("13_0|COMPLETED|0:0|a|b|n1|None\n13_1|FAILED|1:0|a|b|n1|None\n"
                                                "20_1|RUNNING|0:0|a|Unknown|n2|None\n")}
    shards = stage_status(run_dir, manifest, recipe, "generate", states)
    assert [s.state for s in shards] == ["failed", "running", "missing", "missing"]
    assert shards[0].reason.startswith("exited 0 without its done-marker")  # COMPLETED but no marker
    assert shards[1].job == "20_1"
    assert shards[2].reason == "never submitted"


def test_completed_job_forgotten_by_slurm_is_judged_by_its_log(run):
    recipe, run_dir, manifest, job = run
    _submit(manifest, job, "13", [0, 1, 2, 3])
    job.log_path(run_dir, "13", 0).write_text("Traceback (most recent call last):\nValueError: boom\n")
    shards = stage_status(run_dir, manifest, recipe, "generate", {})
    assert shards[0].state == "failed" and "ValueError: boom" in shards[0].reason
    assert shards[1].state == "missing" and "no record" in shards[1].reason


def test_local_submission_states(run):
    recipe, run_dir, manifest, job = run
    dead_pid = 2 ** 22 + 12345  # above pid_max: never a live process
    _submit(manifest, job, "local-x", [0, 1, 2, 3], executor="local", pid=dead_pid,
            tasks={"0": {"exit_code": 0}, "1": {"exit_code": 75}, "2": {"exit_code": None}})
    _mark_done(job, 0)
    shards = stage_status(run_dir, manifest, recipe, "generate", {})
    assert [s.state for s in shards] == ["done", "failed", "failed", "missing"]
    assert "exit 75" in shards[1].reason and "stopped" in shards[2].reason


def test_log_tail_reason_and_errors_summary(tmp_path):
    log = tmp_path / "x.out"
    log.write_text("line\nworker.sh: server 0 died while generating; log tail:\nsome server line\n\n")
    assert log_tail_reason(log) == "worker.sh: server 0 died while generating; log tail:"
    log.write_text("all fine\nstill fine\n")
    assert log_tail_reason(log) == "still fine"
    assert log_tail_reason(tmp_path / "absent") is None
    errs = tmp_path / "e.jsonl"
    errs.write_text("".join(json.dumps({"kind": k, "reason": r}) + "\n"
                            for k, r in [("skipped", "bad_json"), ("skipped", "no_user_turn"), ("error", "http_400")]))
    assert errors_summary(errs) == "2 skipped (bad_json, no_user_turn), 1 error (http_400)"


def test_sbatch_command_lines(run):
    recipe, run_dir, _, job = run
    cmd = sbatch_command(job, run_dir, "demo", [3, 7, 12], ["41"])
    assert "--array=3,7,12%2" in cmd and "--gres=gpu:1" in cmd and "--requeue" in cmd
    assert "--dependency=afterok:41" in cmd and "--kill-on-invalid-dep=yes" in cmd
    assert f"--output={run_dir}/logs/generate-%A_%a.out" in cmd
    assert cmd[-1].endswith("slurm/generate.sbatch")
    train = stage_job(recipe, run_dir, "train")
    cmd = sbatch_command(train, run_dir, "demo", [0], None)
    assert "--nodes=2" in cmd and not any(c.startswith(("--array", "--gres", "--dependency")) for c in cmd)
    assert cmd[-3:] == ["--config", str(run_dir / "train" / "config.json"), "--resume"]
    assert train.env["NPROC_PER_NODE"] == "1"


def test_dependent_job_cancelled_before_start_names_its_dependency(run):
    recipe, run_dir, manifest, job = run
    _submit(manifest, job, "13", [0, 1, 2, 3], dependency=["9"])
    states = {t.task_id: t for t in parse_sacct("13_[0-3]|CANCELLED by 0|0:0|None|2026-11-27T10:00:00|None assigned|"
                                                "Dependency\n")}
    shards = stage_status(run_dir, manifest, recipe, "generate", states)
    assert {s.state for s in shards} == {"failed"}
    assert shards[0].reason.startswith("CANCELLED before it started: job 9")


def test_auto_executor_is_local_without_sbatch(tmp_path, monkeypatch):
    from dflashkit.submit import pick_executor

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert pick_executor("auto") == "local"
    with pytest.raises(StageUnavailable, match="sbatch is not on PATH"):
        pick_executor("slurm")
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert pick_executor("auto") == "slurm"
