"""The stages of a run, declared once: what each runs, where its output and done-markers are, what it is made from.

    generate -> dump -> train -> eval (export + eval)

Submit, status, rerun and the local executor read this table and nothing else about a stage. A stage is either a
script in `slurm/` (sbatch runs it as a plain batch script; the local executor runs the same file with bash) or a
Python function run on one node (submitted with submitit; the local executor runs it as `python -m`). An array stage
has one task per shard and a marker per shard (dflashkit/shards.py); the others one job and `done.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError
from .io import atomic_write_json
from .recipe import ROOT, Recipe, SlurmSpec, check_train_config
from .shards import EXIT_RETRYABLE, ShardFiles


class StageUnavailable(RuntimeError):
    """The stage cannot run from this checkout (its script is missing) or from this recipe."""


def flags(args: dict[str, Any]) -> list[str]:
    """A mapping as command-line flags: {max_seq_len: 8192, enforce_eager: true, layers: [1, 2]} ->
    --max-seq-len 8192 --enforce-eager --layers 1 2. False and null leave the flag out. A value that starts with a
    dash is glued on with `=` (`--vllm-extra-args=--enforce-eager`): argparse would read it as an option."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [f"{flag}={value}"] if str(value).startswith("-") else [flag, str(value)]
    return out


@dataclasses.dataclass
class StageJob:
    """One stage of one run, resolved from the recipe: everything an executor needs."""
    stage: str
    script: Path | None  # slurm/<stage>.sbatch, or None for a function stage
    args: list[str]  # the script's arguments (a function stage: the function's)
    env: dict[str, str]  # added to the environment of every task
    num_shards: int  # array size (1 when not an array)
    out_dir: Path
    slurm: SlurmSpec
    is_array: bool = True
    upstream: Path | None = None  # the output dir it reads: its markers say whether this stage is stale
    function: str | None = None  # "module:function" of a function stage, called with `args`

    def marker(self, shard: int) -> Path:
        return ShardFiles(self.out_dir, shard, self.num_shards).done if self.is_array else self.out_dir / "done.json"

    def errors_file(self, shard: int) -> Path | None:
        return ShardFiles(self.out_dir, shard, self.num_shards).errors if self.is_array else None

    def command(self) -> list[str]:
        """What the local executor runs for one task (sbatch runs `script` itself; submitit calls `function`)."""
        if self.function is not None:
            return [sys.executable, "-m", self.function.partition(":")[0], *self.args]
        return ["bash", str(self.script), *self.args]

    def log_path(self, run_dir: Path, job_id: str, shard: int) -> Path:
        """Where the task's stdout+stderr go: the sbatch --output pattern, expanded (submitit's own for a function
        on Slurm: `logs/<stage>/<job>_0_log.out`)."""
        if self.function is not None and not job_id.startswith("local-"):
            return run_dir / "logs" / self.stage / f"{job_id}_0_log.out"
        tag = f"{job_id}_{shard}" if self.is_array else job_id
        return run_dir / "logs" / f"{self.stage}-{tag}.out"

    def slurm_output_pattern(self, run_dir: Path) -> str:
        return str(run_dir / "logs" / (f"{self.stage}-%A_%a.out" if self.is_array else f"{self.stage}-%j.out"))


def _common_env(run_dir: Path) -> dict[str, str]:
    # Jobs run this interpreter (the venv's) and this checkout, wherever it is cloned.
    return {"PYTHON": sys.executable, "DFLASHKIT_ROOT": str(ROOT), "DFLASHKIT_RUN_DIR": str(run_dir)}


def _generate(recipe: Recipe, run_dir: Path) -> StageJob:
    g, model = recipe.generate, recipe.model
    if not g.input:
        raise StageUnavailable("generate.input is not set")
    out = run_dir / "generate"
    env = {**g.worker_env(), "MODEL": model.path, "SERVED_MODEL_NAME": model.served_model_name or model.path,
           "INPUT": g.input, "OUTPUT_DIR": str(out), "NUM_SHARDS": str(g.num_shards), **g.env}
    return StageJob("generate", ROOT / "slurm" / "generate.sbatch", [], {**_common_env(run_dir), **env},
                    g.num_shards, out, g.slurm)


def dump_settings(recipe: Recipe) -> argparse.Namespace:
    """The recipe's dump args as the dump script resolves them (its defaults included)."""
    from .dump.run import parse_args

    try:  # the script's own checks too (--batch-size, --max-seq-len), as each shard would make them
        return parse_args(["--model", recipe.model.path, "--input", "-", "--output-dir", "-", "--num-shards", "1",
                           "--shard-id", "0", *flags(recipe.dump.args)],
                          f"compute_hidden_states_{recipe.dump.backend}.py", recipe.dump.backend)
    except SystemExit as e:
        raise ConfigError("dump.args: not valid flags of the dump script (its message is above)") from e


def _dump(recipe: Recipe, run_dir: Path) -> StageJob:
    d = recipe.dump
    script = ROOT / f"compute_hidden_states_{d.backend}.py"
    if not script.exists():
        raise StageUnavailable(f"the dump stage is not in this checkout yet ({script.name} is missing)")
    out = run_dir / "dump"
    env = {"MODEL": recipe.model.path, "INPUT": str(run_dir / "generate"), "OUTPUT_DIR": str(out),
           "NUM_SHARDS": str(d.num_shards), "DUMP_BACKEND": d.backend, **d.env}
    return StageJob("dump", ROOT / "slurm" / "dump.sbatch", flags(d.args), {**_common_env(run_dir), **env},
                    d.num_shards, out, d.slurm, upstream=run_dir / "generate")


def _train(recipe: Recipe, run_dir: Path) -> StageJob:
    t = recipe.train
    if not (ROOT / "train_dflash.py").exists():
        raise StageUnavailable("the train stage is not in this checkout yet (train_dflash.py is missing)")
    if not t.config:
        raise StageUnavailable("train.config is empty: the trainer needs at least model.mask_token_id")
    out = run_dir / "train"
    env = {"NPROC_PER_NODE": str(t.nproc_per_node()), "DONE_MARKER": str(out / "done.json"),
           "TRAIN_INPUT": str(run_dir / "dump"), **t.env}
    if t.rdzv_port is not None:
        env["RDZV_PORT"] = str(t.rdzv_port)
    args = ["--config", str(out / "config.json"), "--resume"]
    return StageJob("train", ROOT / "slurm" / "train.sbatch", args, {**_common_env(run_dir), **env}, 1, out,
                    t.slurm, is_array=False, upstream=run_dir / "dump")


def eval_command(recipe: Recipe) -> list[str]:
    """`dflashkit eval` of the exported draft with the recipe's eval args, checked by the eval's own parser."""
    from .eval.run import parse_args

    run_dir = recipe.run_dir()
    cmd = ["dflashkit", "eval", "--draft", str(run_dir / "export" / "draft"), "--target", recipe.model.path,
           "--out", str(run_dir / "eval"), *flags(recipe.eval.args)]
    try:
        parse_args(cmd[2:])
    except SystemExit as e:
        raise ConfigError("eval.args: not valid flags of `dflashkit eval` (its message is above)") from e
    return cmd


def check_stage_args(recipe: Recipe, stages: list[str]) -> None:
    """The dump and eval flags through those stages' own parsers, so that submit refuses what they would refuse
    after the stages before them had run. Once, at submit: the parsers' modules import torch, which a rerun (the
    recipe the submit checked, on a login node) does not need."""
    if "dump" in stages:
        dump_settings(recipe)
    if "eval" in stages:
        eval_command(recipe)


def _eval(recipe: Recipe, run_dir: Path) -> StageJob:
    return StageJob("eval", None, [str(run_dir)], dict(_common_env(run_dir)), 1, run_dir / "eval", recipe.eval.slurm,
                    is_array=False, upstream=run_dir / "train", function="dflashkit.finish:export_and_eval")


def _write_train_config(recipe: Recipe, run_dir: Path, job: StageJob) -> None:
    # The trainer's resolved config (JSON is YAML, so --config reads it).
    atomic_write_json(job.out_dir / "config.json", check_train_config(recipe, run_dir))


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    build: Callable[[Recipe, Path], StageJob]  # the job for a recipe; raises StageUnavailable
    prepare: Callable[[Recipe, Path, StageJob], None] | None = None  # files it needs before it runs
    retryable_exit: int | None = None  # an exit code that means "rerun me" (generate: 75)
    resumes_from: str | None = None  # partial state in its output dir that a rerun resumes from (train: checkpoints)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("generate", _generate, retryable_exit=EXIT_RETRYABLE),
    Stage("dump", _dump),
    Stage("train", _train, prepare=_write_train_config, resumes_from="checkpoints"),
    Stage("eval", _eval),
)}
STAGE_NAMES = tuple(STAGES)


def stage_job(recipe: Recipe, run_dir: Path, stage: str) -> StageJob:
    """What `stage` runs for this recipe. Raises StageUnavailable when this checkout cannot run it."""
    if stage not in STAGES:
        raise StageUnavailable(f"unknown stage {stage!r}; stages are {list(STAGES)}")
    return STAGES[stage].build(recipe, run_dir)


def prepare_stage(recipe: Recipe, run_dir: Path, job: StageJob) -> None:
    job.out_dir.mkdir(parents=True, exist_ok=True)
    hook = STAGES[job.stage].prepare
    if hook is not None:
        hook(recipe, run_dir, job)


def later_stages(stage: str) -> list[str]:
    return list(STAGE_NAMES[STAGE_NAMES.index(stage) + 1:])
