"""`dflashkit plan RECIPE`: what a run will cost before it is submitted: shards, disk per stage, GPU-hours per stage.

    dflashkit plan configs/minimax-m3.yaml --num-conversations 2760000 --mean-tokens 8192
    dflashkit plan --model MODEL --mean-tokens T [--num-conversations N]    # a dump's disk alone (was plan-dump)

Disk, from the record formats (docs/FORMATS.md):
  generate  JSONL: JSONL_BYTES_PER_TOKEN per token + JSONL_BYTES_PER_RECORD per conversation (measured, see below);
  dump      one `.pt` per conversation (dflashkit.dump.plan.dump_bytes): T x (n + 1) x H x dtype bytes of hidden
            states (n target layers and the final state), 9 bytes per token of input_ids and loss_mask, and framing;
  train     `keep_checkpoints` checkpoints of fp32 weights and AdamW's two fp32 moments (12 bytes per draft
            parameter), the draft shaped by the trainer's own DFlashConfig.for_target;
  export    the draft's weights once, in the export dtype.
The hidden size, layer count and dtype come from the target's config.json (`model.path` when it is a local folder, or
`--target-config`), else from `model.hidden_size` (the dump's dtype then defaults to bfloat16). The dump settings
(target layers, max_seq_len, dtype) are the recipe's dump args parsed by the dump script's own parser, so its
defaults are the ones used here.

Training data on disk is shown for each way to train: offline from a bf16 dump, offline from an fp8 dump (half the
bytes), and online (no dump: the generate shards only).

GPU-hours come only from throughputs measured on hardware and recorded in bench/throughputs.json by the benchmarks
(format: docs/RECIPES.md, "Planning"); a stage without a measured figure for this model prints "not measured". The
export and eval command lines the recipe gives are printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path

from .config import ConfigError
from .dump.plan import ITEMSIZE, PER_FILE_OVERHEAD, dump_bytes, human
from .io import require_local_model
from .recipe import ROOT, Recipe, check_train_config, load_recipe
from .stages import dump_settings, eval_command, flags

# Measured here: 2,979 ShareGPT conversations are 21.1 MB of JSONL for 4.82M tokens (SmolLM2's tokenizer), and a
# generated record carries ~520 bytes of id, thinking mode and generation metadata besides its text (2 turns).
JSONL_BYTES_PER_TOKEN = 4.4
JSONL_BYTES_PER_RECORD = 520
CHECKPOINT_BYTES_PER_PARAM = 4 + 8  # fp32 weights + AdamW exp_avg and exp_avg_sq (dflashkit/train/checkpoint.py)
NOT_MEASURED = "not measured"
THROUGHPUTS = ROOT / "bench" / "throughputs.json"
# Training modes and the dump dtype each stores (None: online, no dump).
DISK_MODES = {"offline bf16": "bfloat16", "offline fp8": "float8_e4m3fn", "online": None}


@dataclasses.dataclass
class Target:
    hidden_size: int
    num_hidden_layers: int | None
    dtype: str  # the dump's dtype
    config: dict | None  # config.json, when at hand
    source: str


@dataclasses.dataclass
class StageCost:
    stage: str
    shards: int
    per_shard: str
    disk_bytes: int | None
    disk_note: str
    gpus: int  # GPUs per array task; train: of the whole job
    tokens: int  # tokens the stage processes
    throughput: tuple[float, str] | None  # (tokens/s per GPU, where measured)

    @property
    def gpu_hours(self) -> float | None:
        return None if self.throughput is None else self.tokens / self.throughput[0] / 3600


def target_facts(recipe: Recipe, dump: argparse.Namespace, target_config: str | None) -> Target:
    from .model.layers import hidden_size, num_hidden_layers, text_config

    path = Path(target_config) if target_config else Path(recipe.model.path) / "config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        h = hidden_size(config)
        if recipe.model.hidden_size is not None and recipe.model.hidden_size != h:
            raise ConfigError(f"model.hidden_size {recipe.model.hidden_size} != {h} in {path}")
        text = text_config(config)
        dtype = dump.dtype if dump.dtype != "auto" else str(text.get("dtype") or text.get("torch_dtype")
                                                              or config.get("torch_dtype") or "float32")
        return Target(h, num_hidden_layers(config), dtype, config, str(path))
    if recipe.model.hidden_size is None:
        raise ConfigError(f"no config.json at {path} and model.hidden_size is not set: pass --target-config "
                          "(`huggingface-cli download MODEL config.json`) or set model.hidden_size")
    dtype = dump.dtype if dump.dtype != "auto" else "bfloat16"
    return Target(recipe.model.hidden_size, None, dtype, None, "model.hidden_size (no config.json at hand)")


def num_target_layers(dump: argparse.Namespace) -> int:
    return len(dump.target_layer_ids) if dump.target_layer_ids else dump.num_draft_layers


def hidden_state_bytes(tokens: int, stored_layers: int, hidden: int, dtype_bytes: int) -> int:
    """The hidden states of one dumped conversation: T x stored layers (n target layers [+ the final state]) x H x
    dtype bytes."""
    return tokens * stored_layers * hidden * dtype_bytes


def draft_parameters(recipe: Recipe, target: Target, dump: argparse.Namespace) -> int | None:
    """The draft's parameter count as the trainer would build it, or None without the target's config.json."""
    if target.config is None or target.num_hidden_layers is None:
        return None
    from .export import expected_shapes
    from .model import DFlashConfig
    from .model.layers import default_target_layer_ids

    cfg = check_train_config(recipe, recipe.run_dir())["model"]
    ids = dump.target_layer_ids or default_target_layer_ids(target.num_hidden_layers, dump.num_draft_layers)
    dims = {k: cfg[k] for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                "max_position_embeddings") if cfg[k] is not None}
    dcfg = DFlashConfig.for_target(target.config, num_hidden_layers=cfg["num_layers"], target_layer_ids=ids,
                                   mask_token_id=cfg["mask_token_id"], block_size=cfg["block_size"], **dims)
    return sum(math.prod(shape) for shape in expected_shapes(dcfg).values())


def read_throughputs(path: Path, names: set[str]) -> dict[str, tuple[float, str]]:
    """{stage: (tokens/s per GPU, hardware)} of the rows of bench/throughputs.json whose model is one of `names`
    (case-insensitive); the last row of a (model, stage) wins."""
    if not path.is_file():
        return {}
    found = {}
    for row in json.loads(path.read_text(encoding="utf-8")):
        if row["model"].lower() in names and row["tokens_per_s_per_gpu"] > 0:
            found[row["stage"].lower()] = (float(row["tokens_per_s_per_gpu"]), row.get("hardware", ""))
    return found


def record_throughput(model: str, stage: str, tokens_per_s_per_gpu: float, hardware: str, command: str,
                      path: Path = THROUGHPUTS) -> None:
    """Add (or replace) the measured row of (model, stage): what benchmarks call when run with their --record flag."""
    from .io import atomic_write_json

    rows = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    rows = [r for r in rows if (r["model"], r["stage"]) != (model, stage)]
    rows.append({"model": model, "stage": stage, "tokens_per_s_per_gpu": round(tokens_per_s_per_gpu),
                 "hardware": hardware, "command": command})
    atomic_write_json(path, rows)


def disk_by_mode(num_conversations: int, mean_tokens: int, hidden: int, n_layers: int, final_state: bool,
                 generate_bytes: int) -> dict[str, dict[str, int]]:
    """{mode: {"dump": bytes, "data": generate + dump bytes}} for every training mode."""
    out = {}
    for mode, dtype in DISK_MODES.items():
        dumped = 0 if dtype is None else num_conversations * dump_bytes(mean_tokens, hidden, n_layers, dtype,
                                                                         final_state)
        out[mode] = {"dump": dumped, "data": generate_bytes + dumped}
    return out


def generate_bytes(num_conversations: int, mean_tokens: int) -> int:
    return round(num_conversations * (JSONL_BYTES_PER_TOKEN * mean_tokens + JSONL_BYTES_PER_RECORD))


def plan(recipe: Recipe, num_conversations: int, mean_tokens: int, target_config: str | None = None,
         throughputs: Path = THROUGHPUTS) -> tuple[list[StageCost], dict]:
    dump = dump_settings(recipe)
    target = target_facts(recipe, dump, target_config)
    n_layers = num_target_layers(dump)
    dtype_bytes = ITEMSIZE[target.dtype]
    final_state = not dump.no_final_state
    per_record = dump_bytes(mean_tokens, target.hidden_size, n_layers, target.dtype, final_state)
    names = {recipe.model.path.lower(), Path(recipe.model.path).name.lower(), recipe.run.name.lower()}
    if recipe.model.served_model_name:
        names.add(recipe.model.served_model_name.lower())
    measured = read_throughputs(throughputs, names)
    tokens = num_conversations * mean_tokens

    g, d, t = recipe.generate, recipe.dump, recipe.train
    train_cfg = check_train_config(recipe, recipe.run_dir())
    train_gpus = t.slurm.nodes * t.nproc_per_node()
    optim = train_cfg["optim"]
    if optim["max_steps"]:
        batch = train_cfg["data"]["micro_batch_size"] * train_gpus * optim["grad_accum"]
        train_tokens = optim["max_steps"] * batch * mean_tokens
    else:
        train_tokens = optim["epochs"] * tokens
    params = draft_parameters(recipe, target, dump)
    export_bytes = ITEMSIZE[recipe.export.dtype or "float32"]
    no_config = "needs the target's config.json (--target-config)"

    rows = [
        StageCost("generate", g.num_shards, f"{math.ceil(num_conversations / g.num_shards):,} conv",
                  generate_bytes(num_conversations, mean_tokens), "JSONL, estimate", g.slurm.gpus_per_task, tokens, measured.get("generate")),
        StageCost("dump", d.num_shards, f"{math.ceil(num_conversations / d.num_shards):,} conv",
                  num_conversations * per_record, f"{per_record / 1e6:,.1f} MB/conv", d.slurm.gpus_per_task, tokens,
                  measured.get("dump")),
        StageCost("train", 1, f"{t.slurm.nodes} node(s)",
                  None if params is None else params * CHECKPOINT_BYTES_PER_PARAM * train_cfg["keep_checkpoints"],
                  no_config if params is None else f"{train_cfg['keep_checkpoints']} checkpoints, "
                  f"{params / 1e6:,.0f}M params", train_gpus, train_tokens, measured.get("train")),
        StageCost("export", 1, "-", None if params is None else params * export_bytes,
                  no_config if params is None else f"weights, {recipe.export.dtype or 'float32'}", 0, 0, None),
    ]
    facts = {
        "model": recipe.model.path, "facts_from": target.source, "hidden_size": target.hidden_size,
        "num_hidden_layers": target.num_hidden_layers, "dtype": target.dtype, "target_layers": n_layers,
        "target_layer_ids": dump.target_layer_ids, "max_seq_len": dump.max_seq_len,
        "num_conversations": num_conversations, "mean_tokens": mean_tokens,
        "hidden_state_bytes_per_conversation": hidden_state_bytes(mean_tokens, n_layers + final_state,
                                                                  target.hidden_size, dtype_bytes),
        "dump_bytes_per_conversation": per_record, "draft_parameters": params, "final_state": final_state,
        "disk_by_mode": disk_by_mode(num_conversations, mean_tokens, target.hidden_size, n_layers, final_state,
                                     generate_bytes(num_conversations, mean_tokens)),
        "throughputs": str(throughputs) if throughputs.is_file() else None,
    }
    return rows, facts


def export_command(recipe: Recipe) -> list[str]:
    """`dflashkit export` for the run's latest checkpoint, with the recipe's export options."""
    run_dir = recipe.run_dir()
    return ["dflashkit", "export", "--checkpoint", str(run_dir / "train"), "--target", recipe.model.path,
            "--out", str(run_dir / "export" / "draft"), *flags(dataclasses.asdict(recipe.export))]


def render(rows: list[StageCost], facts: dict, after: list[list[str]]) -> str:
    from .status import format_table

    layers = facts["target_layer_ids"] or f"{facts['target_layers']} (spread over [1, L-3])"
    n, t, h = facts["num_conversations"], facts["mean_tokens"], facts["hidden_size"]
    out = [
        (f"model {facts['model']}: hidden {h}, {facts['num_hidden_layers'] or '?'} layers, "
         f"dump dtype {facts['dtype']} (from {facts['facts_from']})"),
        (f"target layers {layers}{' + the final state' if facts['final_state'] else ''}; "
         f"dump max_seq_len {facts['max_seq_len']}"),
        f"{n:,} conversations x {t:,} tokens = {n * t:,} tokens",
        (f"dump record at {t:,} tokens: {t:,} x ({facts['target_layers']} + {int(facts['final_state'])}) x {h} x "
         f"{ITEMSIZE[facts['dtype']]} B = {facts['hidden_state_bytes_per_conversation']:,} B of hidden states; "
         f"{facts['dump_bytes_per_conversation']:,} B as a file, with input_ids, loss_mask and framing"),
        "",
    ]
    table = []
    for r in rows:
        hours = "-" if r.stage == "export" else (
            NOT_MEASURED if r.gpu_hours is None else f"{r.gpu_hours:,.{1 if r.gpu_hours < 10 else 0}f} "
            f"({r.throughput[0]:,.0f} tok/s/GPU"
            + (f", {r.throughput[1]}" if r.throughput[1] else "") + ")")
        table.append([r.stage, str(r.shards), r.per_shard, "-" if r.disk_bytes is None else human(r.disk_bytes), r.disk_note,
                      str(r.gpus) if r.gpus else "-", hours])
    out.append(format_table(table, ["stage", "shards", "per shard", "disk", "disk basis", "GPUs", "GPU-hours"]))
    total = sum(r.disk_bytes or 0 for r in rows)
    out += ["", f"disk in all: {human(total)}"
            + (" (+ checkpoints and export: unknown)" if any(r.disk_bytes is None for r in rows) else "")]
    out += ["", "training data on disk (generate + dump) by training mode:", render_modes(facts["disk_by_mode"])]
    if any(r.stage != "export" and r.gpu_hours is None for r in rows):
        out.append(f"GPU-hours: only from throughputs measured on hardware "
                   f"({facts['throughputs'] or 'no bench/throughputs.json found'}); see docs/RECIPES.md, 'Planning'")
    out += ["", "after training (the eval stage of `dflashkit submit` runs these, or run them by hand):"]
    out += ["  " + shlex.join(cmd) for cmd in after]
    return "\n".join(out)


def render_modes(modes: dict[str, dict[str, int]]) -> str:
    from .status import format_table

    return format_table([[mode, human(m["dump"]), human(m["data"])] for mode, m in modes.items()],
                        ["mode", "dump", "generate + dump"])


def dump_only(args: argparse.Namespace) -> dict:
    """The no-recipe plan (formerly `plan-dump`): a dump's bytes from a model config or --hidden-size, every mode."""
    from .model.layers import default_target_layer_ids, hidden_size, num_hidden_layers

    if args.model:
        from transformers import AutoConfig

        require_local_model(args.model, "--model")
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        hidden, layers = hidden_size(config), num_hidden_layers(config)
    else:
        hidden, layers = args.hidden_size, args.num_layers
    n, t, count = args.num_draft_layers, round(args.mean_tokens or 0), args.num_conversations or 1
    if t < 1:
        raise ConfigError("--mean-tokens must be >= 1")
    final = not args.no_final_state
    out = {"hidden_size": hidden, "num_hidden_layers": layers, "num_target_layers": n,
           "target_layer_ids": default_target_layer_ids(layers, n) if layers else None, "dtype": args.dtype,
           "final_state": final, "bytes_per_token": dump_bytes(1, hidden, n, args.dtype, final) - PER_FILE_OVERHEAD,
           "bytes_per_conversation_mean": dump_bytes(t, hidden, n, args.dtype, final)}
    out["total_bytes"] = out["bytes_per_conversation_mean"] * count
    if args.max_seq_len:
        out["bytes_per_conversation_at_max_seq_len"] = dump_bytes(args.max_seq_len, hidden, n, args.dtype, final)
    out["disk_by_mode"] = disk_by_mode(count, t, hidden, n, final, generate_bytes(count, t))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflashkit plan", description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", help="recipe YAML; without one, --model or --hidden-size plans a dump alone")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. dump.num_shards=512")
    p.add_argument("--num-conversations", type=int, default=None,
                   help="default: generate.max_conversations when the recipe sets it")
    p.add_argument("--mean-tokens", type=float, default=None,
                   help="mean tokens per conversation (default: the dump's max_seq_len, an upper bound)")
    p.add_argument("--target-config", default=None, help="the target's config.json (default: model.path's)")
    p.add_argument("--throughputs", default=str(THROUGHPUTS), help="measured throughputs (bench/throughputs.json)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    alone = p.add_argument_group("a dump alone, without a recipe (the former plan-dump)")
    alone.add_argument("--model", help="HF model dir or name (its config gives H and L)")
    alone.add_argument("--hidden-size", type=int, help="H, when no config is at hand")
    alone.add_argument("--num-layers", type=int, default=None, help="L (with --hidden-size)")
    alone.add_argument("--num-draft-layers", type=int, default=5, help="number of target layers n")
    alone.add_argument("--dtype", choices=sorted(ITEMSIZE), default="bfloat16")
    alone.add_argument("--no-final-state", action="store_true", help="the dump's --no-final-state (KD off)")
    alone.add_argument("--max-seq-len", type=int, default=None, help="also show one conversation at this length")
    alone.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.recipe is None:
        if not (args.model or args.hidden_size):
            p.error("pass a recipe, or --model / --hidden-size to plan a dump alone")
        try:
            dumped = dump_only(args)
        except (ConfigError, OSError, ValueError) as e:
            print(f"dflashkit plan: {e}", file=sys.stderr)
            return 2
        print(json.dumps(dumped, indent=2))
        print(render_modes(dumped["disk_by_mode"]))
        return 0
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        n = args.num_conversations or recipe.generate.max_conversations
        if not n:
            raise ConfigError("pass --num-conversations N (the recipe sets no generate.max_conversations)")
        if n < 1:
            raise ConfigError(f"--num-conversations {n}: must be >= 1")
        mean = round(args.mean_tokens) if args.mean_tokens else dump_settings(recipe).max_seq_len
        if mean < 1:
            raise ConfigError("--mean-tokens must be >= 1")
        rows, facts = plan(recipe, n, mean, args.target_config, Path(args.throughputs))
        after = [export_command(recipe), eval_command(recipe)]
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"dflashkit plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"facts": facts, "stages": [dataclasses.asdict(r) | {"gpu_hours": r.gpu_hours}
                                                     for r in rows], "export_command": after[0],
                          "eval_command": after[1]}, indent=2))
    else:
        print(render(rows, facts, after))
    if args.mean_tokens is None:
        print(f"note: every conversation counted at the dump's max_seq_len ({mean} tokens), an upper bound; pass "
              "--mean-tokens with your data's mean", file=sys.stderr)
    return 0


def plan_dump_main(argv: list[str] | None = None) -> int:
    """`dflashkit plan-dump FLAGS`: the old command, same flags, now `dflashkit plan FLAGS` without a recipe."""
    print("dflashkit plan-dump is now `dflashkit plan` without a recipe (same flags)", file=sys.stderr)
    return main(argv)
