"""The local executor with a real stage script (bash) in place of worker.sh: tasks run N at a time with SHARD_ID set
and no SLURM_* variables, exit codes land in the manifest, status reads them, and running the failed shard again
finishes the stage."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dflashkit import local
from dflashkit.recipe import ROOT, load_recipe
from dflashkit.rundir import load_manifest, open_run
from dflashkit.stages import stage_job
from dflashkit.status import stage_status
from dflashkit.submit import rerun_indices

DEMO = ROOT / "configs" / "smollm2-demo.yaml"

# A stand-in shard worker: fails for shard FAIL_SHARD, else writes the stage's done-marker last.
SCRIPT = """\
set -euo pipefail
[[ -z "${SLURM_JOB_ID:-}" ]] || { echo "saw SLURM_JOB_ID"; exit 9; }
name=$(printf 'shard-%05d-of-%05d' "$SHARD_ID" "$NUM_SHARDS")
echo "shard $SHARD_ID start $(date +%s.%N)"
sleep 0.3
if [[ "$SHARD_ID" == "${FAIL_SHARD:-}" ]]; then echo "error: shard $SHARD_ID broke" >&2; exit 3; fi
echo '{"id": "x"}' > "$OUTPUT_DIR/$name.jsonl"
echo '{"counts": {"input": 1, "written": 1}}' > "$OUTPUT_DIR/$name.done.json"
echo "shard $SHARD_ID end $(date +%s.%N)"
"""


@pytest.fixture
def stage(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASHKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # as if called inside an allocation: the tasks must not see it
    recipe = load_recipe(DEMO, [f"run.dir={tmp_path / 'run'}"])
    run_dir, manifest = open_run(recipe, str(DEMO))
    script = tmp_path / "stage.sh"
    script.write_text(SCRIPT)
    job = dataclasses.replace(stage_job(recipe, run_dir, "generate"), script=script)
    job.out_dir.mkdir(parents=True)
    return recipe, run_dir, manifest, job


def test_failed_shard_is_recorded_then_finished_by_a_second_run(stage):
    recipe, run_dir, manifest, job = stage
    job.env["FAIL_SHARD"] = "1"
    assert local.run_stage(run_dir, manifest, job, [0, 1, 2, 3], parallel=2) is False
    sub = load_manifest(run_dir)["stages"]["generate"]["submissions"][-1]
    assert {k: t["exit_code"] for k, t in sub["tasks"].items()} == {"0": 0, "1": 3, "2": 0, "3": 0}
    shards = stage_status(run_dir, load_manifest(run_dir), recipe, "generate", {})
    assert [s.state for s in shards] == ["done", "failed", "done", "done"]
    assert "exit 3" in shards[1].reason and "error: shard 1 broke" in shards[1].reason
    assert rerun_indices(shards) == [1]

    del job.env["FAIL_SHARD"]
    manifest = load_manifest(run_dir)
    assert local.run_stage(run_dir, manifest, job, [1], parallel=2) is True
    shards = stage_status(run_dir, load_manifest(run_dir), recipe, "generate", {})
    assert [s.state for s in shards] == ["done"] * 4
    assert load_manifest(run_dir)["stages"]["generate"]["ended_at"]


def test_tasks_run_at_most_n_at_a_time(stage):
    _, run_dir, manifest, job = stage
    assert local.run_stage(run_dir, manifest, job, [0, 1, 2, 3], parallel=2) is True
    sub = load_manifest(run_dir)["stages"]["generate"]["submissions"][-1]
    events = []
    for task in sub["tasks"].values():
        words = Path(task["log"]).read_text().split()
        events += [(float(words[words.index("start") + 1]), 1), (float(words[words.index("end") + 1]), -1)]
    running, most = 0, 0
    for _, step in sorted(events):
        running += step
        most = max(most, running)
    assert most == 2
    assert json.loads((job.out_dir / "shard-00003-of-00004.done.json").read_text())["counts"]["written"] == 1
