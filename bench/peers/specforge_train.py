"""Train SpecForge 0.2's DFlash draft offline on one of our dump dirs, through SpecForge's own trainer, and write the
trained draft out as a folder `dflashkit eval --draft DIR` (and vLLM / SGLang) loads.

    PYTHONPATH=SITE:. python bench/peers/specforge_train.py --dump RUN/dump --out OUT \
        --mask-token-id M [--steps N | --epochs E] [--global-batch 16] [--micro-batch 1] [--num-layers 1]

SITE holds specforge 0.2.0 installed without its dependencies (`pip install --no-deps --target SITE
specforge-0.2.0-py3-none-any.whl`); its offline DFlash path needs only torch, transformers, accelerate, pydantic,
pyyaml and safetensors beside it (yunchang only for sequence parallelism, which this script does not use).

What it does, in three steps, each through SpecForge's public entry points:

1. Convert. SpecForge's offline reader (`OfflineManifestReader`, DFlash normalizer `dflash_family_offline_v1`)
   reads a directory of `*.ckpt` files, each a `torch.save`d dict of `input_ids` [T] (long), `loss_mask` [T] and
   `hidden_states` [T, n*H] (the target layers fused in id order, the dtype the draft trains in). That is our record's
   `input_ids`, `loss_mask` and `aux_hidden_states` (dequantized by `load_dump_record` for fp8 dumps); our final
   state `hidden_states` [T, H] has no counterpart in SpecForge's DFlash objective and is dropped. Records without
   two consecutive supervised tokens, which SpecForge's normalizer refuses, are skipped and counted.
2. Train: `specforge train --config OUT/specforge/run.json` (`specforge.cli.main`), strategy `dflash`, offline,
   one process (`deployment.trainer.nproc_per_node=1`). The draft config is ours (`DFlashConfig.for_target` on the
   dump's target, its `target_layer_ids`, block size, mask token), which SpecForge reads as its `DFlashDraftModel`
   config. Objective and optimizer are SpecForge's: its `OnlineDFlashModel` (anchors sampled from the positions
   whose token and next token are supervised, the block-diagonal mask, the chunked lm_head CE with decay
   exp(-(k-1)/gamma)) and its `BF16Optimizer` (AdamW over fp32 masters, its cosine schedule with linear warmup), at
   lr 6e-4, warmup ratio 0.04, loss_decay_gamma 7 and every eligible anchor (num_anchors = max_length, so no
   position is left out): the values of SpecForge's DFlash example recipes as we were given them (those yaml files
   are not in the wheel; its TrainingConfig defaults are lr 1e-4, warmup 0.015, no decay, 512 anchors). Global batch = micro batch x accumulation steps (one
   rank). Every other training setting is SpecForge's TrainingConfig default (max_grad_norm 0.5, seed 42,
   fsdp SHARD_GRAD_OP on CUDA; NO_SHARD, i.e. DDP over gloo, on CPU). The model is bf16 on CUDA, fp32 on CPU.
3. Export: `specforge export --to hf` (`specforge.export.to_hf.export_to_hf`) materializes the final checkpoint as
   SpecForge's HF draft folder; its tensors are then written as our draft folder by `dflashkit.export.export_draft`
   (the same checks as `dflashkit export`: shapes against the config, finite, fits the target).

What maps. SpecForge's `DFlashDraftModel` is the z-lab DFlash draft, as ours is: `fc` [H, n*H] -> `hidden_norm`
fuses the target layers once, every Qwen3 decoder layer takes its keys/values from [context ; block] with q/k
RMSNorm before RoPE (context at positions 0..S-1, block slots at anchor + 0..B-1), a final `norm`, and the target's
embeddings and lm_head. Its state dict names are ours one for one (`fc.weight`, `hidden_norm.weight`, `norm.weight`,
`layers.N.{input_layernorm,post_attention_layernorm}.weight`, `layers.N.self_attn.{q,k,v,o}_proj.weight`,
`layers.N.self_attn.{q,k}_norm.weight`, `layers.N.mlp.{gate,up,down}_proj.weight`) with the same shapes; the
conversion is a rename-free copy (`specforge_to_ours`), checked by `check_weights`. Slot k of a block predicts
token anchor + k in both. What does not carry over: nothing in the weights (`rotary_emb.inv_freq` is a buffer,
not saved, in both). The folder's config.json is ours, the very config SpecForge built its draft from, not the one its
HF export writes (that one adds transformers keys such as `draft_vocab_size`, `use_cache`). Acceptance of the result
is measured by our evaluator (`dflashkit eval --draft OUT/draft`), not SpecForge's.

Tested on the CPU only (tests/unit/test_peer_train.py: SpecForge's gloo/DDP path, fp32, sdpa): the conversion against
SpecForge's own normalizer, 2 steps of its trainer, our folder holding its checkpoint's tensors exactly, and our
forward equal to its `DFlashDraftModel`'s on those weights under the same block mask. The CUDA path (bf16,
flex_attention, FSDP over NCCL with one rank) is SpecForge's standard one but was not run from this script yet.

Prints one JSON line: records converted/skipped, steps, the per-step losses and accuracies SpecForge logged, wall
time, and where the draft is.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dflashkit.dump import list_dump_records, load_dump_record, read_meta
from dflashkit.model import DFlashConfig
from dflashkit.model.target import read_target_config

# SpecForge's DFlash recipe settings (the brief's "its own defaults"); everything else is its TrainingConfig default.
LEARNING_RATE = 6e-4
WARMUP_RATIO = 0.04
LOSS_DECAY_GAMMA = 7.0
RUN_ID = "sf-dflash"


# -- 1. our dump records -> SpecForge's offline feature files -------------------------------------------------------

def two_consecutive(loss_mask: torch.Tensor) -> bool:
    m = loss_mask.bool()
    return bool((m[:-1] & m[1:]).any())


def to_specforge_sample(rec: dict, dtype: torch.dtype) -> dict:
    """One of our dump records as SpecForge's DFlash offline reader takes it (keys of `algorithm_spec()`'s
    OfflineStorageContract: input_ids, loss_mask, hidden_states)."""
    return {"input_ids": rec["input_ids"].long().contiguous(),
            "loss_mask": rec["loss_mask"].long().contiguous(),
            "hidden_states": rec["aux_hidden_states"].to(dtype).contiguous()}


def convert(dump_dir: Path, out_dir: Path, dtype: torch.dtype, max_length: int, limit: int | None = None) -> dict:
    """Write `<id>.ckpt` per usable record; returns the counts. A record is unusable for SpecForge when, after its
    own truncation to max_length, no two consecutive tokens are supervised."""
    meta = read_meta(dump_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"records": 0, "converted": 0, "skipped_no_consecutive_supervised": 0, "tokens": 0, "loss_tokens": 0}
    for path in list_dump_records(dump_dir)[:limit]:
        counts["records"] += 1
        rec = load_dump_record(path, meta)
        if not two_consecutive(rec["loss_mask"][:max_length]):
            counts["skipped_no_consecutive_supervised"] += 1
            continue
        sample = to_specforge_sample(rec, dtype)
        tmp = out_dir / f".{path.stem}.ckpt.tmp"
        torch.save(sample, tmp)
        os.replace(tmp, out_dir / f"{path.stem}.ckpt")
        counts["converted"] += 1
        counts["tokens"] += int(min(len(sample["input_ids"]), max_length))
        counts["loss_tokens"] += int(sample["loss_mask"][:max_length].sum())
    return counts


# -- 2. the draft config and SpecForge's run config ------------------------------------------------------------------

def draft_config(meta: dict, target: Path, args) -> DFlashConfig:
    overrides = {"intermediate_size": args.intermediate_size} if args.intermediate_size else {}
    return DFlashConfig.for_target(read_target_config(target), num_hidden_layers=args.num_layers,
                                   target_layer_ids=list(meta["target_layer_ids"]), mask_token_id=args.mask_token_id,
                                   block_size=args.block_size, **overrides)


def epochs_for_steps(steps: int, num_records: int, micro_batch: int, accumulation: int) -> int:
    """Epochs whose micro-batches hold `steps` whole optimizer steps: SpecForge's loaders drop an epoch's last partial
    micro-batch and refuse a plan whose optimizer steps cannot all complete (its validate_fixed_accumulation_plan)."""
    per_epoch = num_records // micro_batch
    if per_epoch < 1:
        raise SystemExit(f"{num_records} records make no micro-batch of {micro_batch}")
    return -(-steps * accumulation // per_epoch)


def run_config(args, target: Path, features: Path, draft_json: Path, train_dir: Path, cuda: bool,
               num_records: int) -> dict:
    if args.global_batch % args.micro_batch:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    accumulation = args.global_batch // args.micro_batch
    # With --steps, enough epochs for them (the learning-rate schedule follows max_steps, not the epochs).
    epochs = epochs_for_steps(args.steps, num_records, args.micro_batch, accumulation) if args.steps else args.epochs
    training = {
        "strategy": "dflash", "num_epochs": epochs, "batch_size": args.micro_batch,
        "accumulation_steps": accumulation,
        "learning_rate": args.lr, "warmup_ratio": args.warmup_ratio, "loss_decay_gamma": args.gamma,
        "num_anchors": args.num_anchors or args.max_length, "attention_backend": args.attention,
        "log_interval": 1, "save_interval": 0, "seed": args.seed,
    }
    if args.steps:
        training["max_steps"] = args.steps
    if not cuda:
        training["fsdp_sharding"] = "NO_SHARD"  # DDP over gloo; FSDP wants an accelerator
    return {
        "run_id": RUN_ID, "output_dir": str(train_dir),
        "model": {"target_model_path": str(target), "draft_model_config": str(draft_json),
                  "mask_token_id": args.mask_token_id, "torch_dtype": "bfloat16" if cuda else "float32"},
        "data": {"hidden_states_path": str(features), "max_length": args.max_length,
                 "dataloader_num_workers": args.num_workers},
        "training": training,
        "deployment": {"mode": "local_colocated", "trainer": {"nnodes": 1, "nproc_per_node": 1}},
    }


class StepLog(io.TextIOBase):
    """Stdout as SpecForge's trainer writes it, passed through, keeping its per-step rows. Without an external
    tracker (wandb & co.) its only metrics sink is the console logger, one `step N: {name: value, ...}` line per
    logged step (`specforge.training.assembly._logger`)."""

    LINE = re.compile(r"^step (\d+): (\{.*\})$")

    def __init__(self, stream):
        super().__init__()
        self.stream, self.rows, self._partial = stream, [], ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            m = self.LINE.match(line.strip())
            if m:
                values = ast.literal_eval(re.sub(r"\b(nan|inf)\b", r"'\1'", m.group(2)))
                self.rows.append({"step": int(m.group(1)),
                                  **{k: float(v) for k, v in values.items() if isinstance(v, (int, float, str))}})
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def train(run: dict, config_path: Path) -> tuple[int, list[dict]]:
    from specforge.cli import main as specforge_main

    config_path.write_text(json.dumps(run, indent=2) + "\n")
    log = StepLog(sys.stdout)
    environ = dict(os.environ)  # the CLI sets RANK, WORLD_SIZE, MASTER_PORT, ... for its one-process group
    try:
        with contextlib.redirect_stdout(log):
            rc = specforge_main(["train", "--config", str(config_path)])
    finally:
        os.environ.clear()
        os.environ.update(environ)
    return rc, log.rows


# -- 3. SpecForge's checkpoint -> its HF draft -> our draft folder --------------------------------------------------

def latest_checkpoint(train_dir: Path) -> Path:
    link = train_dir / f"{RUN_ID}-latest"
    if link.exists():
        return link.resolve()
    steps = sorted(train_dir.glob(f"{RUN_ID}-step*"), key=lambda p: int(p.name.rsplit("step", 1)[1]))
    if not steps:
        raise FileNotFoundError(f"{train_dir}: SpecForge wrote no checkpoint")
    return steps[-1]


def specforge_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SpecForge's DFlashDraftModel tensors under our export names: the names are the same, so this only drops
    what is not a draft weight (a `model.`-less HF draft holds none; an exported embedding would be the target's)."""
    return {name: t.contiguous() for name, t in state.items()
            if not name.startswith(("embed_tokens.", "lm_head.", "rotary_emb."))}


def export(train_dir: Path, draft_json: Path, target: Path, out: Path, cfg: DFlashConfig) -> Path:
    from safetensors.torch import load_file
    from specforge.export.to_hf import export_to_hf

    from dflashkit.export import export_draft

    hf_dir = out / "specforge-hf"
    shutil.rmtree(hf_dir, ignore_errors=True)
    export_to_hf(str(latest_checkpoint(train_dir)), str(draft_json), str(hf_dir))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return export_draft(cfg, specforge_to_ours(state), target, out / "draft", overwrite=True)


# -- the run ---------------------------------------------------------------------------------------------------------

def run(args) -> dict:
    cuda = torch.cuda.is_available()
    dump, out = Path(args.dump).resolve(), Path(args.out).resolve()
    meta = read_meta(dump)
    target = Path(args.target or meta["model"]).resolve()
    work = out / "specforge"
    features, train_dir = work / "features", work / "train"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    counts = convert(dump, features, torch.bfloat16 if cuda else torch.float32, args.max_length, args.limit)
    if not counts["converted"]:
        raise SystemExit(f"{dump}: no record SpecForge can train on ({counts})")
    cfg = draft_config(meta, target, args)
    draft_json = work / "draft_config.json"
    draft_json.write_text(cfg.to_json_string())
    t_convert = time.perf_counter() - t0
    config = run_config(args, target, features, draft_json, train_dir, cuda, counts["converted"])
    rc, rows = train(config, work / "run.json")
    t_train = time.perf_counter() - t0 - t_convert
    if rc:
        raise SystemExit(f"specforge train exited {rc}")
    draft = export(train_dir, draft_json, target, out, cfg)
    import specforge

    return {"peer": "specforge", "version": getattr(specforge, "__version__", "0.2.0"),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "dump": str(dump), "target": str(target),
            "data": counts, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
            "epochs": config["training"]["num_epochs"], "max_steps": args.steps, "steps_logged": len(rows),
            "lr": args.lr, "warmup_ratio": args.warmup_ratio, "loss_decay_gamma": args.gamma,
            "num_anchors": args.num_anchors or args.max_length, "max_length": args.max_length,
            "num_layers": args.num_layers, "block_size": args.block_size, "attention": args.attention,
            "losses": [r["loss"] for r in rows], "log": rows,
            "loss_finite": bool(rows) and all(math.isfinite(r["loss"]) for r in rows),
            "convert_s": round(t_convert, 2), "train_s": round(t_train, 2), "draft": str(draft),
            "eval_command": f"dflashkit eval --draft {draft} --target {target} --out {out / 'eval'}",
            "command": "python bench/peers/specforge_train.py " + " ".join(sys.argv[1:])}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dump", required=True, help="our dump dir (meta.json + <id>.pt)")
    p.add_argument("--out", required=True, help="writes OUT/specforge/ (features, run, checkpoints) and OUT/draft/")
    p.add_argument("--target", help="the target's HF folder (default: the dump's meta.json model)")
    p.add_argument("--mask-token-id", type=int, required=True)
    p.add_argument("--steps", type=int, help="optimizer steps (default: all of --epochs)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--num-layers", type=int, default=1, help="draft decoder layers (SpecForge's generated default: 1)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--intermediate-size", type=int, help="draft MLP width (default: the target's)")
    p.add_argument("--max-length", type=int, default=2048, help="SpecForge's data.max_length (its default)")
    p.add_argument("--num-anchors", type=int, help="anchors per sequence (default: max_length, i.e. every eligible)")
    p.add_argument("--lr", type=float, default=LEARNING_RATE)
    p.add_argument("--warmup-ratio", type=float, default=WARMUP_RATIO)
    p.add_argument("--gamma", type=float, default=LOSS_DECAY_GAMMA)
    p.add_argument("--attention", choices=["flex_attention", "sdpa", "eager"], default="flex_attention")
    p.add_argument("--num-workers", type=int, default=2, help="SpecForge's feature-loader workers")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, help="convert only the first N records (smoke tests)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    row = run(args)
    print(json.dumps(row), flush=True)
    return 0 if row["loss_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
