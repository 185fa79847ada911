"""The local executor: a stage's shards as subprocesses on this machine, N at a time, for machines without Slurm
(the demo, laptops, CI without a cluster). `dflashkit submit` uses it when `sbatch` is not on PATH.

It runs the very scripts sbatch runs (`bash slurm/<stage>.sbatch`), with SHARD_ID in place of the array task id, and
a function stage as `python -m` of its module (what submitit calls on Slurm), so a stage behaves the same under both
executors. Each task's exit code and times go into the manifest as they finish;
status and rerun read them the way they read Slurm's records.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from .rundir import now, save_manifest, stage_record
from .stages import StageJob

log = logging.getLogger("dflashkit.local")


def task_env(job: StageJob, shard: int) -> dict[str, str]:
    # Inherited SLURM_* variables (running inside an allocation) would make the scripts act as Slurm tasks.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(job.env)
    if job.is_array:
        env["SHARD_ID"] = str(shard)
    return env


def run_stage(run_dir: Path, manifest: dict, job: StageJob, indices: list[int], parallel: int) -> bool:
    """Run the shards `indices` of `job`, `parallel` at a time. True when every one exited 0 and left its marker."""
    job_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    tasks: dict[str, dict] = {}
    submission = {"executor": "local", "job_id": job_id, "indices": list(indices), "submitted_at": now(),
                  "pid": os.getpid(), "parallel": parallel, "tasks": tasks}
    rec = stage_record(manifest, job)
    rec["submissions"].append(submission)
    rec.setdefault("started_at", now())
    save_manifest(run_dir, manifest)
    log.info("%s: running shard(s) %s locally, %d at a time (job %s)", job.stage, indices, parallel, job_id)

    queue = list(indices)
    running: dict[int, tuple[subprocess.Popen, object]] = {}

    def terminated(signum, frame):  # SIGTERM (scancel of an enclosing job, kill): stop the tasks as on Ctrl-C
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        while queue or running:
            while queue and len(running) < parallel:
                shard = queue.pop(0)
                log_path = job.log_path(run_dir, job_id, shard)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                out = open(log_path, "ab")  # noqa: SIM115 (held by the task; closed when it ends)
                # Its own session: an interrupt stops the task's whole process group (servers included).
                proc = subprocess.Popen(job.command(), env=task_env(job, shard), stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                running[shard] = (proc, out)
                tasks[str(shard)] = {"started_at": now(), "exit_code": None, "log": str(log_path)}
                save_manifest(run_dir, manifest)
            for shard, (proc, out) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                out.close()
                del running[shard]
                tasks[str(shard)].update(exit_code=code, ended_at=now())
                save_manifest(run_dir, manifest)
                level = logging.INFO if code == 0 else logging.ERROR
                log.log(level, "%s shard %d exited %d (log %s)", job.stage, shard, code, tasks[str(shard)]["log"])
            time.sleep(0.5)
    except BaseException:
        for shard, (proc, out) in running.items():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for shard, (proc, out) in running.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.close()
            tasks[str(shard)].update(exit_code=proc.returncode, ended_at=now())
        save_manifest(run_dir, manifest)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    ok = all(tasks[str(k)]["exit_code"] == 0 and job.marker(k).exists() for k in indices)
    if ok and all(job.marker(k).exists() for k in range(job.num_shards)):
        rec["ended_at"] = now()
        save_manifest(run_dir, manifest)
    return ok
