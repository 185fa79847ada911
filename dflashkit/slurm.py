"""Slurm's client side: reading `sacct`/`squeue`, array index lists, and submitting a stage with `sbatch` (a script
stage) or submitit (a function stage). No run-directory logic here: status.py and submit.py build on it.

The scripts in `slurm/` are submitted with plain sbatch: they are shell workers (worker.sh starts servers; train runs
srun + torchrun) whose array, throttle, requeue and dependency flags are sbatch's own. A stage that is a Python
function (export + eval) goes through submitit. Why each: docs/SLURM.md.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from .stages import StageJob

log = logging.getLogger("dflashkit.slurm")

# Slurm job states (first word of sacct's State) mapped to a shard's state when no done-marker exists.
ACTIVE = {"PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
          "RESV_DEL_HOLD": "pending", "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
          "SUSPENDED": "running", "RESIZING": "running", "SIGNALING": "running", "STAGE_OUT": "running",
          "STOPPED": "running"}
# Reasons a job had while it waited in the queue: sacct keeps the last one, which says nothing about why it ended.
QUEUE_REASONS = {"JobArrayTaskLimit", "Priority", "Resources", "BeginTime", "Dependency", "None",
                 "QOSMaxJobsPerUserLimit", "AssocMaxJobsLimit", "ReqNodeNotAvail"}


# ---- Slurm's answers ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TaskState:
    """One array task (or one plain job, index None) as Slurm reports it."""
    job_id: str  # the array's job id (or the job's)
    index: int | None
    state: str  # first word of Slurm's state: "CANCELLED by 0" -> CANCELLED
    exit_code: int | None = None
    signal: int | None = None
    start: str | None = None
    end: str | None = None
    nodes: str | None = None
    reason: str | None = None

    @property
    def task_id(self) -> str:
        return self.job_id if self.index is None else f"{self.job_id}_{self.index}"


def expand_indices(spec: str) -> list[int]:
    """Slurm's array index list `0-3,7,9-15:2%4` (brackets optional) as indices."""
    spec = spec.strip("[]").split("%")[0]
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        out += range(int(lo), int(hi or lo) + 1, int(step or 1))
    return out


def array_spec(indices: list[int], throttle: int = 0) -> str:
    """Indices as sbatch's --array value: consecutive runs collapse (0-3,7,12), `%throttle` appended when > 0."""
    idx = sorted(set(indices))
    parts: list[str] = []
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(parts) + (f"%{throttle}" if throttle > 0 else "")


def _split_job_id(raw: str) -> tuple[str, list[int | None]]:
    """'12_3' -> ('12', [3]); '12_[4-6%2]' -> ('12', [4, 5, 6]); '12' -> ('12', [None])."""
    job, sep, rest = raw.partition("_")
    return (job, expand_indices(rest)) if sep else (job, [None])


def _exit(text: str) -> tuple[int | None, int | None]:
    code, _, sig = (text or "").partition(":")
    return (int(code) if code.isdigit() else None, int(sig) if sig.isdigit() else None)


SACCT_FIELDS = "JobID,State,ExitCode,Start,End,NodeList,Reason"


def parse_sacct(text: str) -> list[TaskState]:
    """`sacct -X -n -P -o SACCT_FIELDS` lines as task states (steps like `12_3.batch` are skipped)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split("|")
        if len(cols) < 7:
            raise ValueError(f"sacct line with {len(cols)} fields, expected 7: {line!r}")
        job_id, state, exit_code, start, end, nodes, reason = cols[:7]
        if "." in job_id or "+" in job_id:
            continue
        job, indices = _split_job_id(job_id)
        code, sig = _exit(exit_code)
        for index in indices:
            out.append(TaskState(job, index, state.split()[0] if state else "UNKNOWN", code, sig,
                                 None if start in ("", "Unknown", "None") else start,
                                 None if end in ("", "Unknown", "None") else end,
                                 nodes or None, None if reason in ("", "None") else reason))
    return out


SQUEUE_FORMAT = "%i|%T|%r|%N"


def parse_squeue(text: str) -> list[TaskState]:
    """`squeue -h -r -o SQUEUE_FORMAT` lines (one per array task thanks to -r)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        job_id, state, reason, nodes = (line.split("|") + ["", "", ""])[:4]
        job, indices = _split_job_id(job_id)
        for index in indices:
            out.append(TaskState(job, index, state.split()[0], nodes=nodes or None,
                                 reason=None if reason in ("", "None") else reason))
    return out


def _run(cmd: list[str]) -> str | None:
    """Output of a Slurm client command, or None when it is not installed or fails (no accounting, controller down)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        log.warning("%s timed out", cmd[0])
        return None
    if proc.returncode != 0:
        log.debug("%s failed: %s", shlex.join(cmd), proc.stderr.strip())
        return None
    return proc.stdout


def query_tasks(job_ids: list[str]) -> dict[str, TaskState]:
    """State of every task of these jobs, keyed by task id ('12_3' or '12'): squeue for what is active (it is the
    controller's own view), sacct for the rest (finished jobs leave squeue after MinJobAge)."""
    if not job_ids:
        return {}
    states: dict[str, TaskState] = {}
    ids = ",".join(sorted(set(job_ids)))
    text = _run(["sacct", "-X", "-n", "-P", "-j", ids, "-o", SACCT_FIELDS])
    for t in parse_sacct(text or ""):
        states[t.task_id] = t
    text = _run(["squeue", "-h", "-r", "-j", ids, "-o", SQUEUE_FORMAT])
    for t in parse_squeue(text or ""):
        if t.state in ACTIVE:  # sacct may lag the controller by a moment; the controller wins for live jobs
            old = states.get(t.task_id)
            states[t.task_id] = dataclasses.replace(old, state=t.state, reason=t.reason) if old else t
    return states


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False)


# ---- submitting --------------------------------------------------------------------------------------------------

def _gres(job: StageJob) -> str | None:
    s = job.slurm
    return f"gpu:{s.gpu_type + ':' if s.gpu_type else ''}{s.gpus_per_task}" if s.gpus_per_task else None


def sbatch_command(job: StageJob, run_dir: Path, run_name: str, indices: list[int],
                   dependency: list[str] | None) -> list[str]:
    s = job.slurm
    cmd = ["sbatch", "--parsable", f"--job-name=dflash-{job.stage}-{run_name}",
           f"--output={job.slurm_output_pattern(run_dir)}", f"--time={s.time}", "--export=ALL",
           "--requeue" if s.requeue else "--no-requeue"]
    if job.is_array:
        cmd.append(f"--array={array_spec(indices, s.throttle)}")
    else:
        cmd.append(f"--nodes={s.nodes}")
    if _gres(job):
        cmd.append(f"--gres={_gres(job)}")
    for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                        ("cpus-per-task", s.cpus_per_task), ("mem", s.mem)):
        if value is not None:
            cmd.append(f"--{flag}={value}")
    if dependency:
        # afterok on an array waits for every task; a failed task makes the dependency impossible, and
        # --kill-on-invalid-dep cancels the dependent job instead of leaving it pending forever.
        cmd += [f"--dependency=afterok:{':'.join(dependency)}", "--kill-on-invalid-dep=yes"]
    return cmd + list(s.extra_args) + [str(job.script), *job.args]


def sbatch(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable: "jobid[;cluster]"


def submitit_submit(job: StageJob, run_dir: Path, run_name: str, dependency: list[str] | None) -> str:
    """Submit a function stage (one task on one node) with submitit; returns its job id. The function is pickled by
    reference and runs with this interpreter, so it must be importable on the node (same checkout, same venv)."""
    import importlib

    import submitit

    module, _, name = job.function.partition(":")
    function = getattr(importlib.import_module(module), name)
    s = job.slurm
    executor = submitit.AutoExecutor(folder=run_dir / "logs" / job.stage, cluster="slurm")
    extra = {"export": "ALL", "requeue": s.requeue} if s.requeue else {"export": "ALL", "no-requeue": True}
    if dependency:
        extra.update(dependency=f"afterok:{':'.join(dependency)}", **{"kill-on-invalid-dep": "yes"})
    for arg in s.extra_args:  # the recipe's extra sbatch flags, `--flag` or `--flag=value`
        key, eq, value = arg.removeprefix("--").partition("=")
        extra[key] = value if eq else True
    params = {"slurm_job_name": f"dflash-{job.stage}-{run_name}", "slurm_time": s.time, "nodes": 1,
              "tasks_per_node": 1, "slurm_stderr_to_stdout": True, "slurm_additional_parameters": extra,
              "slurm_gres": _gres(job), "slurm_partition": s.partition, "slurm_account": s.account,
              "slurm_qos": s.qos, "slurm_cpus_per_task": s.cpus_per_task, "slurm_mem": s.mem}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    saved = {k: os.environ.get(k) for k in job.env}
    os.environ.update(job.env)  # submitit's sbatch (--export=ALL) passes this process's environment on
    try:
        submitted = executor.submit(function, *job.args)
    except Exception as e:  # submitit raises its own error types for an sbatch refusal
        raise RuntimeError(f"submitit could not submit {job.stage}: {e}") from e
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return str(submitted.job_id)
