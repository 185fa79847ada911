"""`dflashkit submit | status | rerun`: the stages of a run as chained Slurm jobs (or local processes), their state
per shard, and resubmission of exactly the shards that are not done.

The scripts in `slurm/` are submitted with plain sbatch: they are shell workers (worker.sh starts servers; train runs
srun + torchrun) whose array, throttle, requeue and dependency flags are sbatch's own. Why not submitit: docs/SLURM.md.

State of shard k of a stage, in order of authority:
  done      its done-marker exists (written last by the stage: the only proof of completion);
  running / pending   the latest job that covers k is active in squeue (or sacct);
  failed    that job ended without the marker: the reason is its Slurm state and exit code, the shard's errors file,
            and the last meaningful line of its log;
  missing   no job ever covered k, or the scheduler forgot it and it left no log.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from .config import ConfigError, from_dict
from .recipe import STAGES, Recipe, load_recipe
from .rundir import (
    ManifestError,
    StageJob,
    StageUnavailable,
    load_manifest,
    now,
    open_run,
    prepare_stage,
    save_manifest,
    stage_job,
    stage_record,
)
from .serve import process_alive
from .shards import EXIT_RETRYABLE, setup_logging

log = logging.getLogger("dflashkit.slurm")

SHARD_STATES = ("done", "failed", "running", "pending", "missing")
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


# ---- shard status ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ShardStatus:
    stage: str
    shard: int
    state: str  # one of SHARD_STATES
    job: str | None = None  # '12_3', 'local-..._3'
    slurm_state: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    log: str | None = None
    counts: dict | None = None  # from the done-marker


def log_tail_reason(path: Path, lines: int = 40) -> str | None:
    """The last line of a task log that says what went wrong (an error, a Slurm message, a traceback's last line),
    else its last line."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return None
    tail = [t.strip() for t in tail if t.strip()]
    pattern = re.compile(r"error|exception|traceback|cancelled|killed|timed? ?out|interrupted|died|failed|refus",
                         re.IGNORECASE)
    for line in reversed(tail):
        if pattern.search(line):
            return line[:300]
    return tail[-1][:300] if tail else None


def errors_summary(path: Path | None) -> str | None:
    """'2 retryable (timeout), 1 error (http_400)' from a shard's errors file."""
    if path is None or not path.exists():
        return None
    kinds: Counter = Counter()
    reasons: dict[str, Counter] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = str(rec.get("kind", "error"))
            kinds[kind] += 1
            reasons.setdefault(kind, Counter())[str(rec.get("reason", "?"))] += 1
    if not kinds:
        return None
    return ", ".join(f"{n} {k} ({', '.join(r for r, _ in reasons[k].most_common(3))})" for k, n in kinds.items())


def _failure_reason(job: StageJob, shard: int, slurm_state: str | None, exit_code: int | None,
                    signal: int | None, log_path: Path, slurm_reason: str | None = None) -> str:
    parts = []
    if slurm_state == "COMPLETED" or (slurm_state is None and exit_code == 0):
        parts.append("exited 0 without its done-marker")
    elif slurm_state:
        parts.append(slurm_state + (f" exit {exit_code}" if exit_code else "") + (f" signal {signal}" if signal else "")
                     + (f" ({slurm_reason})" if slurm_reason and slurm_reason not in QUEUE_REASONS else ""))
    elif exit_code is not None:
        parts.append(f"exit {exit_code}" if exit_code >= 0 else f"killed by signal {-exit_code}")
    if exit_code == EXIT_RETRYABLE and job.stage == "generate":
        parts.append("retryable failures: rerun finishes them")
    errors = errors_summary(job.errors_file(shard))
    if errors:
        parts.append(f"errors file: {errors}")
    tail = log_tail_reason(log_path)
    if tail:
        parts.append(f"log: {tail}")
    return "; ".join(parts) or "no job state, exit code or log"


def stage_status(run_dir: Path, manifest: dict, recipe: Recipe, stage: str,
                 slurm_states: dict[str, TaskState]) -> list[ShardStatus]:
    job = stage_job(recipe, run_dir, stage)
    submissions = manifest["stages"].get(stage, {}).get("submissions", [])
    out = []
    for shard in range(job.num_shards):
        marker = job.marker(shard)
        sub = next((s for s in reversed(submissions) if shard in s["indices"]), None)
        task_id = None
        if sub is not None:
            task_id = f"{sub['job_id']}_{shard}" if job.is_array else sub["job_id"]
        if marker.exists():
            try:
                counts = json.loads(marker.read_text()).get("counts")
            except (OSError, json.JSONDecodeError):
                counts = None
            out.append(ShardStatus(stage, shard, "done", task_id, counts=counts))
            continue
        if sub is None:
            out.append(ShardStatus(stage, shard, "missing", reason="never submitted"))
            continue
        log_path = job.log_path(run_dir, sub["job_id"], shard)
        st = ShardStatus(stage, shard, "missing", task_id, log=str(log_path) if log_path.exists() else None)
        if sub["executor"] == "slurm":
            t = slurm_states.get(task_id)
            if t is None:
                if log_path.exists():
                    st.state, st.reason = "failed", _failure_reason(job, shard, None, None, None, log_path)
                else:
                    st.reason = f"Slurm has no record of {task_id} and it left no log"
            else:
                st.slurm_state, st.exit_code = t.state, t.exit_code
                if t.state in ACTIVE:
                    st.state, st.reason = ACTIVE[t.state], t.reason
                elif t.state == "CANCELLED" and t.start is None and sub.get("dependency"):
                    st.state = "failed"
                    st.reason = (f"CANCELLED before it started: job {', '.join(sub['dependency'])}, which it ran "
                                 "after, did not succeed (rerun that stage)")
                else:
                    st.state = "failed"
                    st.reason = _failure_reason(job, shard, t.state, t.exit_code, t.signal, log_path, t.reason)
        else:  # local
            task = sub.get("tasks", {}).get(str(shard))
            alive = process_alive(sub.get("pid"))
            if task and task.get("exit_code") is not None:
                st.state, st.exit_code = "failed", task["exit_code"]
                st.reason = _failure_reason(job, shard, None, task["exit_code"], None, log_path)
            elif alive:
                st.state = "running" if task else "pending"
            else:
                st.state = "failed" if task else "missing"
                st.reason = "the local executor stopped before this shard finished"
        out.append(st)
    return out


def run_status(run_dir: Path, stages: list[str] | None = None) -> tuple[dict, Recipe, dict[str, list[ShardStatus]]]:
    manifest = load_manifest(run_dir)
    recipe = from_dict(Recipe, manifest["recipe"])
    stages = [s for s in STAGES if s in manifest["stages"] and (stages is None or s in stages)]
    job_ids = [sub["job_id"] for s in stages for sub in manifest["stages"][s]["submissions"]
               if sub["executor"] == "slurm"]
    slurm_states = query_tasks(job_ids)
    result = {s: stage_status(run_dir, manifest, recipe, s, slurm_states) for s in stages}
    _record_times(manifest, result, slurm_states)
    return manifest, recipe, result


def _record_times(manifest: dict, result: dict[str, list[ShardStatus]], slurm_states: dict[str, TaskState]) -> None:
    """Stage start/end times from Slurm's records (the local executor writes its own), kept in the manifest."""
    changed = False
    for stage, shards in result.items():
        rec = manifest["stages"][stage]
        tasks = [slurm_states[s.job] for s in shards if s.job in slurm_states]
        starts = [t.start for t in tasks if t.start]
        if starts and not rec.get("started_at"):
            rec["started_at"], changed = min(starts), True
        if all(s.state == "done" for s in shards):
            ends = [t.end for t in tasks if t.end]
            if ends and rec.get("ended_at") != max(ends):
                rec["ended_at"], changed = max(ends), True
    if changed:
        save_manifest(Path(manifest["run_dir"]), manifest)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def render_status(manifest: dict, result: dict[str, list[ShardStatus]], show_all: bool = False) -> str:
    out = [f"run {manifest['run_dir']}  (recipe {manifest['recipe_sha256'][:12]})"]
    rows = []
    for stage, shards in result.items():
        c = Counter(s.state for s in shards)
        rec = manifest["stages"][stage]
        rows.append([stage, str(len(shards)), *(str(c[k]) for k in SHARD_STATES),
                     rec.get("started_at") or "-", rec.get("ended_at") or "-"])
    out.append(format_table(rows, ["stage", "shards", *SHARD_STATES, "started", "ended"]))
    detail = [s for shards in result.values() for s in shards if show_all or s.state != "done"]
    if detail:
        out.append("")
        out.append(format_table(
            [[s.stage, str(s.shard), s.state, s.job or "-", s.reason or "", ] for s in detail],
            ["stage", "shard", "state", "job", "reason"]))
    logs = [s for s in detail if s.state == "failed" and s.log]
    if logs:
        out.append("")
        out += [f"log of {s.stage} shard {s.shard}: {s.log}" for s in logs]
    return "\n".join(out)


# ---- submission --------------------------------------------------------------------------------------------------

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
    if s.gpus_per_task:
        cmd.append(f"--gres=gpu:{s.gpu_type + ':' if s.gpu_type else ''}{s.gpus_per_task}")
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


def pick_executor(requested: str) -> str:
    if requested == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if requested == "slurm" and not shutil.which("sbatch"):
        raise StageUnavailable("executor slurm: sbatch is not on PATH")
    return requested


def not_done(job: StageJob) -> list[int]:
    return [k for k in range(job.num_shards) if not job.marker(k).exists()]


def run_chain(run_dir: Path, manifest: dict, recipe: Recipe, jobs: list[StageJob], executor: str,
              first_indices: list[int] | None = None, dry_run: bool = False) -> int:
    """Submit (slurm) or run (local) the stages in order, each after the one before succeeded. The first stage runs
    `first_indices` (default: its shards without a done-marker); later stages run all their unfinished shards."""
    from . import local

    dependency: list[str] | None = None
    for i, job in enumerate(jobs):
        indices = first_indices if (i == 0 and first_indices is not None) else not_done(job)
        if not indices:
            print(f"{job.stage}: every shard is done")
            continue
        if executor == "local":
            if dry_run:
                print(f"{job.stage}: would run shards {array_spec(indices)} locally, "
                      f"{recipe.run.local_parallel} at a time: bash {shlex.join([str(job.script), *job.args])}")
                continue
            prepare_stage(recipe, run_dir, job)
            if not local.run_stage(run_dir, manifest, job, indices, recipe.run.local_parallel):
                print(f"{job.stage}: failed; later stages not run. See `dflashkit status {run_dir}`")
                return 1
            continue
        cmd = sbatch_command(job, run_dir, recipe.run.name, indices, dependency)
        if dry_run:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(job.env.items()))
            print(f"{job.stage}: {env} {shlex.join(cmd)}")
            dependency = [f"<{job.stage}>"]
            continue
        prepare_stage(recipe, run_dir, job)
        job_id = sbatch(cmd, job.env)
        stage_record(manifest, job)["submissions"].append({
            "executor": "slurm", "job_id": job_id, "indices": indices, "submitted_at": now(),
            "dependency": dependency, "command": cmd})
        save_manifest(run_dir, manifest)
        print(f"{job.stage}: submitted job {job_id}"
              + (f" array {array_spec(indices, job.slurm.throttle)}" if job.is_array else "")
              + (f" after {','.join(dependency)}" if dependency else ""))
        dependency = [job_id]
    return 0


def _stage_list(text: str | None, default: list[str]) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()] if text else default
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise StageUnavailable(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    return [s for s in STAGES if s in names]


def _jobs(recipe: Recipe, run_dir: Path, stages: list[str]) -> list[StageJob]:
    jobs, problems = [], []
    for s in stages:
        try:
            jobs.append(stage_job(recipe, run_dir, s))
        except StageUnavailable as e:
            problems.append(f"{s}: {e}")
    if problems:
        raise StageUnavailable("cannot submit:\n  " + "\n  ".join(problems)
                               + "\n(choose the stages that can run with --stages)")
    return jobs


def submit_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflashkit submit", description="Submit a recipe's stages, chained by "
                                "dependencies (Slurm), or run them here when sbatch is not on PATH.")
    p.add_argument("--recipe", required=True)
    p.add_argument("--stages", help="comma list (default: the recipe's run.stages)")
    p.add_argument("--executor", choices=["auto", "slurm", "local"], help="default: the recipe's run.executor")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; write nothing")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. generate.num_shards=16")
    args = p.parse_args(argv)
    setup_logging()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        stages = _stage_list(args.stages, recipe.run.stages)
        executor = pick_executor(args.executor or recipe.run.executor)
        run_dir = recipe.run_dir()
        jobs = _jobs(recipe, run_dir, stages)
        log.info("resolved recipe: %s", json.dumps(dataclasses.asdict(recipe), sort_keys=True))
        if args.dry_run:
            return run_chain(run_dir, {}, recipe, jobs, executor, dry_run=True)
        run_dir, manifest = open_run(recipe, args.recipe)
        if any(s in manifest["stages"] for s in stages):
            # Submitting into an existing run: only shards without a marker go out, and none that a job still holds.
            for shards in run_status(run_dir, stages)[2].values():
                rerun_indices(shards)
    except (ConfigError, StageUnavailable, ManifestError) as e:
        print(f"dflashkit submit: {e}", file=sys.stderr)
        return 2
    print(f"run dir {run_dir} (executor {executor})")
    try:
        return run_chain(run_dir, manifest, recipe, jobs, executor)
    except RuntimeError as e:  # sbatch refused a stage: the ones before it stay submitted (see status)
        print(f"dflashkit submit: {e}", file=sys.stderr)
        return 1


def status_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflashkit status", description="Per stage and shard: done / failed / running "
                                "/ pending / missing, with the reason for each shard that is not done.")
    p.add_argument("run_dir")
    p.add_argument("--stage", help="comma list of stages (default: all submitted)")
    p.add_argument("--all", action="store_true", help="list done shards too")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    setup_logging()
    try:
        stages = _stage_list(args.stage, list(STAGES))
        manifest, _, result = run_status(Path(args.run_dir).absolute(), stages)
    except (ManifestError, StageUnavailable) as e:
        print(f"dflashkit status: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "run_dir": manifest["run_dir"], "recipe_sha256": manifest["recipe_sha256"],
            "stages": {s: {"counts": {k: sum(x.state == k for x in shards) for k in SHARD_STATES},
                           "started_at": manifest["stages"][s].get("started_at"),
                           "ended_at": manifest["stages"][s].get("ended_at"),
                           "shards": [dataclasses.asdict(x) for x in shards]}
                       for s, shards in result.items()}}, indent=2))
    else:
        print(render_status(manifest, result, args.all))
    # Non-zero while anything failed: scripts can poll `status` and stop on failure.
    return 1 if any(x.state == "failed" for shards in result.values() for x in shards) else 0


def rerun_indices(shards: list[ShardStatus]) -> list[int]:
    """The shards a rerun submits: failed and missing ones. Refuses while any shard of the stage is still active, so
    a shard is never run by two jobs at once."""
    active = [s for s in shards if s.state in ("running", "pending")]
    if active:
        raise StageUnavailable(
            f"{len(active)} shard(s) of {shards[0].stage} are still running or pending "
            f"({', '.join(s.job or str(s.shard) for s in active[:8])}); wait for them or scancel them first")
    return [s.shard for s in shards if s.state in ("failed", "missing")]


def cancel_stale(manifest: dict, stages: list[str]) -> None:
    """scancel the still-queued jobs of later stages: they wait on a job that failed (or are about to be replaced)."""
    ids = [sub["job_id"] for s in stages for sub in manifest["stages"].get(s, {}).get("submissions", [])
           if sub["executor"] == "slurm"]
    states = query_tasks(ids)
    stale = sorted({t.job_id for t in states.values() if t.state in ACTIVE})
    if stale:
        subprocess.run(["scancel", *stale], check=False)
        print(f"cancelled the queued later-stage job(s) {', '.join(stale)}")


def rerun_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflashkit rerun", description="Resubmit exactly the failed and missing shards "
                                "of a stage as one array, and chain the later stages after it again.")
    p.add_argument("run_dir")
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--no-chain", action="store_true", help="do not resubmit the later stages")
    p.add_argument("--executor", choices=["auto", "slurm", "local"],
                   help="default: the executor of the stage's last submission")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    setup_logging()
    run_dir = Path(args.run_dir).absolute()
    try:
        manifest, recipe, result = run_status(run_dir)
        if args.stage not in result:
            raise StageUnavailable(f"stage {args.stage} was never submitted in {run_dir}; use `dflashkit submit`")
        indices = rerun_indices(result[args.stage])
        later = [] if args.no_chain else [s for s in STAGES[STAGES.index(args.stage) + 1:] if s in manifest["stages"]]
        jobs = _jobs(recipe, run_dir, [args.stage, *later])
        last = manifest["stages"][args.stage]["submissions"][-1]["executor"]
        executor = pick_executor(args.executor or last)
    except (ManifestError, StageUnavailable, ConfigError) as e:
        print(f"dflashkit rerun: {e}", file=sys.stderr)
        return 2
    if not indices:
        print(f"{args.stage}: nothing to rerun (every shard is done)")
        return 0
    print(f"{args.stage}: rerunning shard(s) {array_spec(indices)}")
    if executor == "slurm" and not args.dry_run:
        cancel_stale(manifest, later)
    try:
        return run_chain(run_dir, manifest, recipe, jobs, executor, first_indices=indices, dry_run=args.dry_run)
    except RuntimeError as e:
        print(f"dflashkit rerun: {e}", file=sys.stderr)
        return 1
