"""The run directory and its manifest, and what each stage runs: one description shared by both executors.

A stage is a script in `slurm/` (the same file sbatch runs and the local executor runs with bash), its arguments, its
environment, and a number of shards. Shard k of a stage is done when, and only when, its done-marker exists; the
manifest records what was submitted (job ids, indices, times), never whether a shard is done.
Layout and manifest fields: docs/FORMATS.md, "Run directory" and "Run manifest".
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from .io import atomic_write_json, read_json
from .recipe import ROOT, STAGES, Recipe, SlurmSpec, check_train_config, recipe_dict, recipe_hash
from .shards import ShardFiles

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dflashkit.manifest/1"


class StageUnavailable(RuntimeError):
    """The stage cannot run from this checkout (its script is missing) or from this recipe."""


class ManifestError(ValueError):
    pass


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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
    stage: str
    script: Path  # slurm/<stage>.sbatch
    args: list[str]  # the script's arguments
    env: dict[str, str]  # added to the environment of every task
    num_shards: int  # array size (train: 1, not an array)
    out_dir: Path
    slurm: SlurmSpec

    @property
    def is_array(self) -> bool:
        return self.stage != "train"

    def marker(self, shard: int) -> Path:
        if self.is_array:
            return ShardFiles(self.out_dir, shard, self.num_shards).done
        return self.out_dir / "done.json"

    def errors_file(self, shard: int) -> Path | None:
        return ShardFiles(self.out_dir, shard, self.num_shards).errors if self.is_array else None

    def log_path(self, run_dir: Path, job_id: str, shard: int) -> Path:
        """Where the task's stdout+stderr go: the sbatch --output pattern, expanded."""
        tag = f"{job_id}_{shard}" if self.is_array else job_id
        return run_dir / "logs" / f"{self.stage}-{tag}.out"

    def slurm_output_pattern(self, run_dir: Path) -> str:
        return str(run_dir / "logs" / (f"{self.stage}-%A_%a.out" if self.is_array else f"{self.stage}-%j.out"))


def _common_env(run_dir: Path) -> dict[str, str]:
    # Jobs run this interpreter (the venv's) and this checkout, wherever it is cloned.
    return {"PYTHON": sys.executable, "DFLASHKIT_ROOT": str(ROOT), "DFLASHKIT_RUN_DIR": str(run_dir)}


def stage_job(recipe: Recipe, run_dir: Path, stage: str) -> StageJob:
    """What `stage` runs for this recipe. Raises StageUnavailable when this checkout cannot run it."""
    model = recipe.model
    if stage == "generate":
        g = recipe.generate
        if not g.input:
            raise StageUnavailable("generate.input is not set")
        out = run_dir / "generate"
        env = {**g.worker_env(), "MODEL": model.path, "SERVED_MODEL_NAME": model.served_model_name or model.path,
               "INPUT": g.input, "OUTPUT_DIR": str(out), "NUM_SHARDS": str(g.num_shards), **g.env}
        return StageJob(stage, ROOT / "slurm" / "generate.sbatch", [], {**_common_env(run_dir), **env},
                        g.num_shards, out, g.slurm)
    if stage == "dump":
        d = recipe.dump
        script = ROOT / f"compute_hidden_states_{d.backend}.py"
        if not script.exists():
            raise StageUnavailable(f"the dump stage is not in this checkout yet ({script.name} is missing)")
        out = run_dir / "dump"
        env = {"MODEL": model.path, "INPUT": str(run_dir / "generate"), "OUTPUT_DIR": str(out),
               "NUM_SHARDS": str(d.num_shards), "DUMP_BACKEND": d.backend, **d.env}
        return StageJob(stage, ROOT / "slurm" / "dump.sbatch", flags(d.args), {**_common_env(run_dir), **env},
                        d.num_shards, out, d.slurm)
    if stage == "train":
        t = recipe.train
        if not (ROOT / "train_dflash.py").exists():
            raise StageUnavailable("the train stage is not in this checkout yet (train_dflash.py is missing)")
        if not t.config:
            raise StageUnavailable("train.config is empty: the trainer needs at least model.mask_token_id")
        out = run_dir / "train"
        env = {"NPROC_PER_NODE": str(t.nproc_per_node()), "DONE_MARKER": str(out / "done.json"), **t.env}
        if t.rdzv_port is not None:
            env["RDZV_PORT"] = str(t.rdzv_port)
        args = ["--config", str(out / "config.json"), "--resume"]
        return StageJob(stage, ROOT / "slurm" / "train.sbatch", args, {**_common_env(run_dir), **env}, 1, out,
                        t.slurm)
    raise StageUnavailable(f"unknown stage {stage!r}; stages are {list(STAGES)}")


def prepare_stage(recipe: Recipe, run_dir: Path, job: StageJob) -> None:
    """Files a stage needs before it runs: the train stage's resolved config (JSON is YAML, so --config reads it)."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    if job.stage == "train":
        atomic_write_json(job.out_dir / "config.json", check_train_config(recipe, run_dir))


# ---- manifest ------------------------------------------------------------------------------------------------------

def manifest_path(run_dir: Path) -> Path:
    return Path(run_dir) / MANIFEST


def load_manifest(run_dir: Path) -> dict:
    path = manifest_path(run_dir)
    if not path.exists():
        raise ManifestError(f"{path}: no manifest; is {run_dir} a run directory made by `dflashkit submit`?")
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    for key in ("recipe", "recipe_sha256", "stages", "run_dir"):
        if key not in m:
            raise ManifestError(f"{path}: missing key {key!r}")
    return m


def save_manifest(run_dir: Path, manifest: dict) -> None:
    manifest["updated_at"] = now()
    atomic_write_json(manifest_path(run_dir), manifest)


def open_run(recipe: Recipe, recipe_path: str | None) -> tuple[Path, dict]:
    """The run directory and its manifest, made on first use. A run dir holds one recipe: a different hash is refused
    (a changed setting would mix two configurations in one dataset)."""
    run_dir = recipe.run_dir()
    digest = recipe_hash(recipe)
    if manifest_path(run_dir).exists():
        manifest = load_manifest(run_dir)
        if manifest["recipe_sha256"] != digest:
            raise ManifestError(
                f"{run_dir} was made with another recipe (sha256 {manifest['recipe_sha256'][:12]}, now "
                f"{digest[:12]}); use a new run.dir, or `dflashkit rerun` to finish this one")
        return run_dir, manifest
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    manifest = {"format": MANIFEST_FORMAT, "name": recipe.run.name, "run_dir": str(run_dir),
                "recipe_path": str(Path(recipe_path).absolute()) if recipe_path else None,
                "recipe_sha256": digest, "recipe": recipe_dict(recipe), "created_at": now(), "stages": {}}
    save_manifest(run_dir, manifest)
    return run_dir, manifest


def stage_record(manifest: dict, job: StageJob) -> dict:
    rec = manifest["stages"].setdefault(job.stage, {"num_shards": job.num_shards, "out_dir": str(job.out_dir),
                                                    "submissions": []})
    if rec["num_shards"] != job.num_shards:
        raise ManifestError(f"stage {job.stage}: the run has {rec['num_shards']} shards, the recipe {job.num_shards}")
    return rec
