"""`dflashkit submit | rerun`: the stages of a run as chained Slurm jobs (or local processes), and resubmission of
exactly the shards that are not done (failed, missing, stale) with every stage after them.

What each stage runs comes from the stage table (dflashkit/stages.py); how a shard's state is read, from status.py.
A shard's marker is the only proof it is done; a stale one (made from upstream output that changed since) is retired
before its shard runs again, and everything downstream of a redone shard is redone: a dump shard reads every generate
shard, the trainer every dump shard.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

from .config import ConfigError
from .recipe import Recipe, load_recipe
from .rundir import ManifestError, now, open_run, save_manifest, stage_record
from .shards import fingerprint, is_stale, read_marker, retire_marker, setup_logging
from .slurm import ACTIVE, array_spec, cancel, query_tasks, sbatch, sbatch_command, submitit_submit
from .stages import (
    STAGE_NAMES,
    STAGES,
    StageJob,
    StageUnavailable,
    check_stage_args,
    later_stages,
    prepare_stage,
    stage_job,
)
from .status import ShardStatus, run_status, stage_list

log = logging.getLogger("dflashkit.submit")


def pick_executor(requested: str) -> str:
    if requested == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if requested == "slurm" and not shutil.which("sbatch"):
        raise StageUnavailable("executor slurm: sbatch is not on PATH")
    return requested


def shards_to_run(job: StageJob) -> list[int]:
    """Shards without a marker, and shards whose marker was made from other upstream output than is there now."""
    current = fingerprint(job.upstream) if job.upstream is not None else None
    return [k for k in range(job.num_shards) if not job.marker(k).exists()
            or (current is not None and is_stale(read_marker(job.marker(k)), current))]


def retire(job: StageJob, indices: list[int], upstream_redone: bool) -> None:
    """Take the markers of shards about to run again out of the way. A one-job stage (train, eval) that was done, or
    whose partial state was made from upstream output that is being redone, moves its whole output dir aside: the
    trainer would otherwise resume from the old run's last checkpoint."""
    partial = STAGES[job.stage].resumes_from
    for k in indices:
        marker = job.marker(k)
        if job.is_array:
            retire_marker(marker)
        elif marker.exists() or (upstream_redone and partial and (job.out_dir / partial).exists()):
            aside = job.out_dir.with_name(f"{job.out_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            job.out_dir.rename(aside)
            print(f"{job.stage}: its output was made from older {job.upstream.name if job.upstream else 'input'}; "
                  f"moved to {aside}")


def _describe(job: StageJob) -> str:
    return job.function or shlex.join(job.command())


def run_chain(run_dir: Path, manifest: dict, recipe: Recipe, jobs: list[StageJob], executor: str,
              first_indices: list[int] | None = None, dry_run: bool = False) -> int:
    """Submit (slurm) or run (local) the stages in order, each after the one before succeeded. The first stage runs
    `first_indices` (default: its shards to run); a later stage runs all its shards once a stage before it runs
    anything (it reads all of that stage's output), else its own shards to run."""
    from . import local

    dependency: list[str] | None = None
    upstream_redone = False
    for i, job in enumerate(jobs):
        if i == 0 and first_indices is not None:
            indices = first_indices
        else:
            indices = list(range(job.num_shards)) if upstream_redone else shards_to_run(job)
        if not indices:
            print(f"{job.stage}: every shard is done")
            continue
        redo_all, upstream_redone = upstream_redone, True
        if executor == "local":
            if dry_run:
                print(f"{job.stage}: would run shards {array_spec(indices)} locally, "
                      f"{recipe.run.local_parallel} at a time: {_describe(job)}")
                continue
            retire(job, indices, redo_all)
            prepare_stage(recipe, run_dir, job)
            if not local.run_stage(run_dir, manifest, job, indices, recipe.run.local_parallel):
                print(f"{job.stage}: failed; later stages not run. See `dflashkit status {run_dir}`")
                return 1
            continue
        cmd = sbatch_command(job, run_dir, recipe.run.name, indices, dependency) if job.function is None else None
        if dry_run:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(job.env.items()))
            print(f"{job.stage}: {env} {shlex.join(cmd) if cmd else 'submitit: ' + _describe(job)}")
            dependency = [f"<{job.stage}>"]
            continue
        retire(job, indices, redo_all)
        prepare_stage(recipe, run_dir, job)
        if cmd is None:
            job_id = submitit_submit(job, run_dir, recipe.run.name, dependency)
        else:
            job_id = sbatch(cmd, job.env)
        stage_record(manifest, job)["submissions"].append({
            "executor": "slurm", "job_id": job_id, "indices": indices, "submitted_at": now(),
            "dependency": dependency, "command": cmd or ["submitit", job.function, *job.args]})
        save_manifest(run_dir, manifest)
        print(f"{job.stage}: submitted job {job_id}"
              + (f" array {array_spec(indices, job.slurm.throttle)}" if job.is_array else "")
              + (f" after {','.join(dependency)}" if dependency else ""))
        dependency = [job_id]
    return 0


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
        stages = stage_list(args.stages, recipe.run.stages)
        executor = pick_executor(args.executor or recipe.run.executor)
        run_dir = recipe.run_dir()
        jobs = _jobs(recipe, run_dir, stages)
        check_stage_args(recipe, stages)
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


def rerun_indices(shards: list[ShardStatus]) -> list[int]:
    """The shards a rerun submits: failed, missing and stale ones. Refuses while any shard of the stage is still
    active, so a shard is never run by two jobs at once."""
    active = [s for s in shards if s.state in ("running", "pending")]
    if active:
        raise StageUnavailable(
            f"{len(active)} shard(s) of {shards[0].stage} are still running or pending "
            f"({', '.join(s.job or str(s.shard) for s in active[:8])}); wait for them or scancel them first")
    return [s.shard for s in shards if s.state in ("failed", "missing", "stale")]


def cancel_queued(manifest: dict, stages: list[str]) -> None:
    """scancel the still-queued jobs of later stages: they wait on a job that failed (or are about to be replaced)."""
    ids = [sub["job_id"] for s in stages for sub in manifest["stages"].get(s, {}).get("submissions", [])
           if sub["executor"] == "slurm"]
    queued = sorted({t.job_id for t in query_tasks(ids).values() if t.state in ACTIVE})
    if queued:
        cancel(queued)
        print(f"cancelled the queued later-stage job(s) {', '.join(queued)}")


def rerun_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflashkit rerun", description="Resubmit exactly the failed, missing and stale "
                                "shards of a stage as one array, and chain the later stages after it again.")
    p.add_argument("run_dir")
    p.add_argument("--stage", required=True, choices=STAGE_NAMES)
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
        later = [] if args.no_chain else [s for s in later_stages(args.stage) if s in manifest["stages"]]
        jobs = _jobs(recipe, run_dir, [args.stage, *later])
        last = manifest["stages"][args.stage]["submissions"][-1]["executor"]
        executor = pick_executor(args.executor or last)
    except (ManifestError, StageUnavailable, ConfigError) as e:
        print(f"dflashkit rerun: {e}", file=sys.stderr)
        return 2
    if indices:
        print(f"{args.stage}: rerunning shard(s) {array_spec(indices)}")
        if executor == "slurm" and not args.dry_run:
            cancel_queued(manifest, later)
    else:  # the later stages may still be stale (a shard redone by hand) or unfinished: the chain checks each
        busy = [s for s in later if any(x.state in ("running", "pending") for x in result[s])]
        print(f"{args.stage}: nothing to rerun (every shard is done)"
              + (f"; {', '.join(busy)} still running, left alone" if busy else ""))
        if busy:
            return 0
    try:
        return run_chain(run_dir, manifest, recipe, jobs, executor, first_indices=indices, dry_run=args.dry_run)
    except RuntimeError as e:
        print(f"dflashkit rerun: {e}", file=sys.stderr)
        return 1
