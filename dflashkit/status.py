"""`dflashkit status RUN`: the state of every shard of every stage of a run, and why each one that is not done is not.

State of shard k of a stage, in order of authority:
  done      its done-marker exists (written last by the stage: the only proof of completion) and was made from the
            upstream output that is there now;
  stale     its done-marker exists, but the upstream stage's output changed since (a generate shard redone): a rerun
            redoes it and the stages after it;
  running / pending   the latest job that covers k is active in squeue (or sacct);
  failed    that job ended without the marker: the reason is its Slurm state and exit code, the shard's errors file,
            and the last meaningful line of its log;
  missing   no job ever covered k, or the scheduler forgot it and it left no log.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

from .config import from_dict
from .recipe import Recipe
from .rundir import ManifestError, load_manifest, save_manifest
from .serve import process_alive
from .shards import fingerprint, is_stale, read_marker, setup_logging
from .slurm import ACTIVE, QUEUE_REASONS, TaskState, query_tasks
from .stages import STAGE_NAMES, STAGES, StageJob, StageUnavailable, stage_job

SHARD_STATES = ("done", "stale", "failed", "running", "pending", "missing")


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
    if exit_code is not None and exit_code == STAGES[job.stage].retryable_exit:
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
    upstream = fingerprint(job.upstream) if job.upstream is not None else None
    submissions = manifest["stages"].get(stage, {}).get("submissions", [])
    out = []
    for shard in range(job.num_shards):
        marker = job.marker(shard)
        sub = next((s for s in reversed(submissions) if shard in s["indices"]), None)
        task_id = None
        if sub is not None:
            task_id = f"{sub['job_id']}_{shard}" if job.is_array else sub["job_id"]
        if marker.exists():
            done = read_marker(marker)
            counts = done.get("counts") if done else None
            if upstream is not None and is_stale(done, upstream):
                out.append(ShardStatus(stage, shard, "stale", task_id, counts=counts, reason=(
                    f"made from other {job.upstream.name} output than is there now; rerun redoes it")))
            else:
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
    stages = [s for s in STAGE_NAMES if s in manifest["stages"] and (stages is None or s in stages)]
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


def stage_list(text: str | None, default: list[str]) -> list[str]:
    """Stage names from a comma list (or the default), in pipeline order; unknown names are refused."""
    names = [s.strip() for s in text.split(",") if s.strip()] if text else default
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise StageUnavailable(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    return [s for s in STAGE_NAMES if s in names]


def status_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflashkit status", description="Per stage and shard: done / stale / failed / "
                                "running / pending / missing, with the reason for each shard that is not done.")
    p.add_argument("run_dir")
    p.add_argument("--stage", help="comma list of stages (default: all submitted)")
    p.add_argument("--all", action="store_true", help="list done shards too")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    setup_logging()
    try:
        stages = stage_list(args.stage, list(STAGE_NAMES))
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
