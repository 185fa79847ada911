"""The recipe: one YAML file that drives every stage of a run (`dflashkit submit --recipe R`).

    recipe = load_recipe("configs/smollm2-demo.yaml", ["generate.max_tokens=16", "run.dir=/scratch/r1"])

Sections: `run` (where and how), `model` (the target), and one section per stage, each with its own `slurm`
resources. Unknown keys and wrong types are errors naming the key's path (dflashkit.config). `${VAR}` in any string is
replaced by the environment variable at load time (never evaluated); `DFLASHKIT_ROOT` (this checkout) and
`DFLASHKIT_CACHE` (the prepared test assets) are always defined. An unset variable is an error with the key's path.

The generate section's keys are worker.sh's variables in lower case (docs: README, "Generate"); a key left null keeps
server_generate.py's own default, so defaults live in one place. The dump section's `args` are passed as flags to the
dump script; the train section's `config` is the trainer's own config (dflashkit/train/config.py), checked against it.
The export section holds `dflashkit export`'s options, the eval section `dflashkit eval`'s flags; `dflashkit plan`
prints a run's shards, disk and GPU-hours, and its export command. Every key and its default: docs/RECIPES.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from .formats import unknown_thinking_modes
from .generate.settings import below_minimum

STAGES = ("generate", "dump", "train", "eval")  # the recipe's stage sections; what each runs: dflashkit/stages.py
ROOT = Path(__file__).resolve().parent.parent  # the checkout: worker.sh, slurm/, the stage scripts


@dataclass
class SlurmSpec:
    """sbatch resources of one stage. For train, `nodes` nodes with `gpus_per_task` GPUs each (one task per node)."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    nodes: int = 1
    gpus_per_task: int = 1  # 0: no GPU request (CPU clusters, the CI cluster's train check)
    gpu_type: str | None = None  # --gres=gpu:<type>:<n>
    cpus_per_task: int | None = None
    mem: str | None = None
    throttle: int = 0  # array tasks running at once (the `%` of --array); 0 = no limit
    requeue: bool = True  # let Slurm requeue a preempted or node-failed task (shards resume from their files)
    extra_args: list[str] = field(default_factory=list)  # more sbatch flags, e.g. ["--exclusive"]

    def validate(self) -> None:
        if self.nodes < 1 or self.gpus_per_task < 0 or self.throttle < 0:
            raise ValueError("nodes must be >= 1, gpus_per_task and throttle >= 0")


@dataclass
class RunSpec:
    name: str = "run"
    dir: str = ""  # default: runs/<name> under the current directory
    executor: Literal["auto", "slurm", "local"] = "auto"  # auto: slurm when `sbatch` is on PATH
    local_parallel: int = 1  # the local executor's tasks at once
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # what `submit` runs when --stages is not given

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ValueError(f"run.name {self.name!r}: use letters, digits, '.', '_' and '-'")
        if self.local_parallel < 1:
            raise ValueError("run.local_parallel must be >= 1")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"run.stages: unknown stage(s) {unknown}; stages are {list(STAGES)}")


@dataclass
class ModelSpec:
    path: str = ""  # what the server loads: an HF folder or hub name
    served_model_name: str | None = None  # default: path
    hidden_size: int | None = None  # for `dflashkit plan` before config.json is at hand; checked against it when it is
    # false: the model's attention kernel rejects an fp8 KV cache (MiniMax-M3's MSA), so any fp8 --kv-cache-dtype in
    # the recipe's server args is refused at load time instead of at the first server start.
    allow_fp8_kv_cache: bool = True

    def validate(self) -> None:
        if not self.path:
            raise ValueError("model.path must be set")
        if self.hidden_size is not None and self.hidden_size < 1:
            raise ValueError("model.hidden_size must be >= 1")


@dataclass
class GenerateSpec:
    """worker.sh's variables, lower-cased. Null keeps the worker's / server_generate.py's default, which lives in one
    place: dflashkit/generate/settings.py."""
    input: str = ""
    num_shards: int = 1
    backend: Literal["vllm", "sglang"] | None = None
    tp_size: int | None = None
    servers_per_node: int | None = None
    server_startup_timeout: int | None = None
    port_base: int | None = None
    vllm_serve_extra_args: str | None = None  # split with shell word rules by worker.sh, never evaluated
    sglang_serve_extra_args: str | None = None
    thinking_modes: list[str] = field(default_factory=list)
    thinking_mode_key: str | None = None
    thinking_mode_map: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    think_open_tag: str | None = None
    think_close_tag: str | None = None
    output_format: Literal["oai", "sharegpt"] | None = None
    on_length: Literal["keep", "drop"] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    concurrency: int | None = None
    max_conversations: int | None = None
    system_prompt: str | None = None
    request_timeout: float | None = None
    max_retries: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # more environment for the task (e.g. VLLM_* settings)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    def validate(self) -> None:
        if self.num_shards < 1:
            raise ValueError("generate.num_shards must be >= 1")
        unknown = set(self.thinking_mode_map) - set(self.thinking_modes)
        if unknown:
            raise ValueError(f"generate.thinking_mode_map names modes not in thinking_modes: {sorted(unknown)}")
        unknown = unknown_thinking_modes(self.thinking_modes, self.thinking_mode_map)
        if unknown:
            raise ValueError(f"generate.thinking_modes: {unknown}")
        # Refused at submit, not by every shard of the array.
        for s in below_minimum(lambda s: getattr(self, s.key) if s.recipe else None):
            raise ValueError(f"generate.{s.key} must be >= {s.minimum}")

    def worker_env(self) -> dict[str, str]:
        """The worker.sh environment this section sets (INPUT, MODEL, OUTPUT_DIR and NUM_SHARDS come from the run)."""
        skip = {"input", "num_shards", "env", "slurm"}
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in skip or value is None or value == [] or value == {}:
                continue
            if isinstance(value, list):
                value = ",".join(value)
            elif isinstance(value, dict):
                value = json.dumps(value)
            env[f.name.upper()] = str(value)
        return env


@dataclass
class DumpSpec:
    backend: Literal["vllm", "hf"] = "vllm"  # compute_hidden_states_<backend>.py
    num_shards: int = 1
    args: dict[str, Any] = field(default_factory=dict)  # flags: {max_seq_len: 8192} -> --max-seq-len 8192
    env: dict[str, str] = field(default_factory=dict)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    def validate(self) -> None:
        if self.num_shards < 1:
            raise ValueError("dump.num_shards must be >= 1")


@dataclass
class TrainSpec:
    # The trainer's config (dflashkit/train/config.py TrainConfig); target_model, output_dir and data.dump_dirs are
    # filled from the run unless set here.
    config: dict[str, Any] = field(default_factory=dict)
    processes_per_node: int = 0  # torchrun --nproc-per-node; 0 = slurm.gpus_per_task (at least 1)
    rdzv_port: int | None = None  # default: 29500 + job id mod 2000 (train.sbatch)
    env: dict[str, str] = field(default_factory=dict)  # e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    def nproc_per_node(self) -> int:
        return self.processes_per_node or max(self.slurm.gpus_per_task, 1)


@dataclass
class ExportSpec:
    """`dflashkit export`'s options (dflashkit/export.py). Null keeps the export's own default."""
    yarn_factor: float | None = None  # YaRN rope scaling: positions = factor x yarn_original_max_position
    yarn_original_max_position: int | None = None
    max_model_len: int | None = None  # the longest context the target will serve (default: its config's)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # cast the weights (default: as trained)

    def validate(self) -> None:
        if (self.yarn_factor is None) != (self.yarn_original_max_position is None):
            raise ValueError("export.yarn_factor and export.yarn_original_max_position go together")
        if self.yarn_factor is not None and self.yarn_factor <= 1:
            raise ValueError(f"export.yarn_factor {self.yarn_factor}: YaRN extends the context, it must be > 1")


@dataclass
class EvalSpec:
    """The eval stage: `dflashkit export` (the export section) then `dflashkit eval` with `args`, on one GPU node."""
    args: dict[str, Any] = field(default_factory=dict)  # flags of `dflashkit eval` (dflashkit/eval/run.py)
    slurm: SlurmSpec = field(default_factory=lambda: SlurmSpec(time="04:00:00"))


def fp8_kv_cache_flags(extra_args: str | None) -> list[str]:
    """The fp8 `--kv-cache-dtype` settings in a server's extra-args string (vLLM and SGLang spell the flag alike)."""
    from .serve import split_extra_args

    args = split_extra_args(extra_args)
    found = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name.replace("_", "-") != "--kv-cache-dtype":
            continue
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        if value.lower().startswith("fp8"):
            found.append(f"{name} {value}")
    return found


@dataclass
class Recipe:
    run: RunSpec = field(default_factory=RunSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    generate: GenerateSpec = field(default_factory=GenerateSpec)
    dump: DumpSpec = field(default_factory=DumpSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def validate(self) -> None:
        if self.model.allow_fp8_kv_cache:
            return
        server_args = {f"generate.{key}": getattr(self.generate, key)
                       for key in ("vllm_serve_extra_args", "sglang_serve_extra_args")}
        server_args["eval.args.vllm_extra_args"] = self.eval.args.get("vllm_extra_args")
        for key, value in server_args.items():
            flagged = fp8_kv_cache_flags(value)
            if flagged:
                raise ValueError(
                    f"{key} sets {flagged[0]}, but model.allow_fp8_kv_cache is false: this model's attention "
                    "kernel rejects an fp8 KV cache (MiniMax-M3's MSA sparse attention). Remove the flag; the KV "
                    "cache stays in the model's dtype (bf16)")

    def run_dir(self) -> Path:
        return Path(self.run.dir or Path("runs") / self.run.name).absolute()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: Any, env: dict[str, str], path: str = "") -> Any:
    """Replace `${VAR}` in every string of a nested mapping/list; unset variables are errors naming the key."""
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) not in env:
                raise ConfigError(f"{path}: environment variable {m.group(1)} is not set")
            return env[m.group(1)]
        return _VAR.sub(sub, value)
    return value


def recipe_env() -> dict[str, str]:
    from .prepare import cache_dir

    return {"DFLASHKIT_ROOT": str(ROOT), "DFLASHKIT_CACHE": str(cache_dir()), **os.environ}


def check_train_config(recipe: Recipe, run_dir: Path) -> dict:
    """The trainer's config with the run's paths filled in, validated by the trainer's own dataclass."""
    from .train.config import TrainConfig

    cfg = json.loads(json.dumps(recipe.train.config))  # a deep copy
    cfg.setdefault("target_model", recipe.model.path)
    cfg.setdefault("output_dir", str(run_dir / "train"))
    cfg.setdefault("data", {}).setdefault("dump_dirs", [str(run_dir / "dump")])
    return to_dict(from_dict(TrainConfig, cfg, "train.config"))


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    data = apply_overrides(load_yaml(path), list(overrides))
    recipe = from_dict(Recipe, expand_env(data, recipe_env()))
    if recipe.train.config and "train" in recipe.run.stages:
        check_train_config(recipe, recipe.run_dir())
    return recipe


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the resolved recipe as canonical JSON: two runs with the same hash ran the same settings."""
    return hashlib.sha256(json.dumps(to_dict(recipe), sort_keys=True).encode()).hexdigest()
