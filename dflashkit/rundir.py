"""The run directory and its manifest: what was submitted (job ids, indices, times), never whether a shard is done
(only its done-marker says that; what each stage runs: dflashkit/stages.py).
Layout and manifest fields: docs/FORMATS.md, "Run directory" and "Run manifest".
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from .config import to_dict
from .io import atomic_write_json, read_json
from .recipe import Recipe, recipe_hash

if TYPE_CHECKING:
    from .stages import StageJob

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dflashkit.manifest/1"


class ManifestError(ValueError):
    pass


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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
                "recipe_sha256": digest, "recipe": to_dict(recipe), "created_at": now(), "stages": {}}
    save_manifest(run_dir, manifest)
    return run_dir, manifest


def stage_record(manifest: dict, job: StageJob) -> dict:
    rec = manifest["stages"].setdefault(job.stage, {"num_shards": job.num_shards, "out_dir": str(job.out_dir),
                                                    "submissions": []})
    if rec["num_shards"] != job.num_shards:
        raise ManifestError(f"stage {job.stage}: the run has {rec['num_shards']} shards, the recipe {job.num_shards}")
    return rec
