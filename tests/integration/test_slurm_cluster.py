"""The test cluster itself (.ci/slurm/setup.sh) does what the Slurm tests rely on: two nodes, fake GPUs as gres,
arrays with throttles, accounting, requeue of a running job, and submitit."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers.procs import wait_until
from tests.helpers.slurm import sacct_job

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cluster")]


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout


def test_two_nodes_and_gpus_per_task():
    out = sh("srun", "-N2", "--gres=gpu:2", "bash", "-c", "echo $SLURMD_NODENAME $CUDA_VISIBLE_DEVICES")
    assert sorted(out.split("\n")[:2]) == ["n1 0,1", "n2 0,1"]


def test_array_with_throttle_is_accounted(tmp_path):
    job = sh("sbatch", "--parsable", "--array=0-3%2", f"--output={tmp_path}/%A_%a.out",
             "--wrap", "echo task $SLURM_ARRAY_TASK_ID").strip()
    def finished():
        rows = sacct_job(job)
        return rows if len(rows) == 4 and all(v["state"] == "COMPLETED" for v in rows.values()) else None

    rows = wait_until("the array in sacct", finished, timeout=60, every=1)
    assert sorted(rows) == [f"{job}_{i}" for i in range(4)]
    assert (tmp_path / f"{job}_3.out").read_text().strip() == "task 3"


def test_requeue_of_a_running_job_restarts_it(tmp_path):
    out = tmp_path / "requeue.out"
    job = sh("sbatch", "--parsable", "--requeue", "--open-mode=append", f"--output={out}",
             "--wrap", "echo attempt ${SLURM_RESTART_COUNT:-0}; sleep 4").strip()
    wait_until("the job to run", lambda: out.exists() and "attempt 0" in out.read_text(), timeout=60)
    sh("scontrol", "requeue", job)
    wait_until("the second attempt to finish", lambda: sacct_job(job).get(job, {}).get("state") == "COMPLETED"
               and "attempt 1" in out.read_text(), timeout=90, every=1)


def test_submitit_job_runs(tmp_path):
    code = ("import submitit, socket\n"
            f"ex = submitit.AutoExecutor(folder={str(tmp_path)!r})\n"
            "ex.update_parameters(timeout_min=2, nodes=1, tasks_per_node=1)\n"
            "job = ex.submit(pow, 3, 4)\n"
            "print(job.result(), job.job_id)\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    result, job_id = out.split()[:2]
    assert result == "81", out
    assert time.monotonic() - t0 < 60
    wait_until("submitit's job in sacct", lambda: sacct_job(job_id).get(job_id, {}).get("state") == "COMPLETED",
               timeout=30, every=1)
