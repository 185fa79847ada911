"""Stage 4a: export a trained draft as the HF folder vLLM and SGLang serve (`dflashkit export`).

    dflashkit export --checkpoint RUN/train --target MODEL_DIR --out RUN/export/draft [--yarn-factor 128
                     --yarn-original-max-position 8192] [--max-model-len N] [--dtype bfloat16]

The folder holds `config.json` (the DFlash layout of `dflashkit.model.config`) and `model.safetensors` with the
draft's own tensors under their bare names (`fc.weight`, `layers.0.self_attn.q_proj.weight`, ...): no `model.`
prefix, no `embed_tokens`, no `lm_head` (vLLM's loader adds the prefix itself and shares the target's embeddings and
lm_head when the hidden sizes match). Served with

    vllm serve TARGET --speculative-config '{"method": "dflash", "model": DIR, "num_speculative_tokens": B-1}'
    python -m sglang.launch_server --model-path TARGET --speculative-algorithm DFLASH \
        --speculative-draft-model-path DIR --speculative-num-draft-tokens B

A DSpark draft (`model.kind: dspark`) has `architectures: ["Qwen3DSparkModel"]`, its head keys and tensors beside
these (docs/FORMATS.md) and is served with `"method": "dspark", "num_speculative_tokens": B` (SGLang: `DSPARK`).

A draft that does not fit its target is refused with the reason (`DraftMismatch`) instead of becoming a folder that
crashes the server at its first request. The folder is written next to its destination and renamed into place, so it
either exists complete or not at all.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from dflashkit.config import UserError
from dflashkit.io import write_durable
from dflashkit.model import DFlashConfig, DFlashDraft, config_from_dict, kind_of
from dflashkit.model.target import read_target_config

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DraftMismatch(UserError):
    """The draft cannot be served with this target (or at all); the message says why and what to change."""


# -- reading a draft -------------------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A folder with config.json + model.safetensors: a checkpoint step dir, an exported draft, or the training output
    dir / its `checkpoints/` dir (then the checkpoint `latest.json` names)."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / "latest.json").exists():
            with open(root / "latest.json", encoding="utf-8") as f:
                path = root / json.load(f)["path"]
            break
    missing = [name for name in (CONFIG, WEIGHTS) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: no {' or '.join(missing)} (expected a checkpoint step dir, a training "
                                "output dir with checkpoints/latest.json, or an exported draft)")
    return path


def read_draft(path: str | Path) -> tuple[DFlashConfig, dict[str, torch.Tensor]]:
    """Config and weights of a draft folder; a torn or foreign file is a DraftMismatch naming it (the parsers' own
    errors name no file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    try:
        with open(path / CONFIG, encoding="utf-8") as f:
            cfg = config_from_dict(json.load(f))
    except json.JSONDecodeError as e:
        raise DraftMismatch(f"{path / CONFIG}: not valid JSON ({e})") from None
    try:
        return cfg, load_file(path / WEIGHTS)
    except SafetensorError as e:
        raise DraftMismatch(f"{path / WEIGHTS}: not a readable safetensors file, truncated or damaged ({e})") from None


def load_draft(path: str | Path, dtype: torch.dtype | None = None) -> DFlashDraft:
    """The draft module (DFlashDraft or DSparkDraft, as its config says) of a checkpoint or an exported folder,
    weights checked against its config."""
    cfg, state = read_draft(path)
    check_weights(cfg, state)
    model = kind_of(cfg).model(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(dtype) if dtype is not None else model


# -- consistency -----------------------------------------------------------------------------------------------------

def expected_shapes(cfg: DFlashConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in kind_of(cfg).model(cfg).state_dict().items()}


def check_weights(cfg: DFlashConfig, state: dict[str, torch.Tensor]) -> None:
    """Every tensor the config implies, with its shape, nothing else, all finite."""
    want = expected_shapes(cfg)
    problems = []
    fc = state.get("fc.weight")
    if fc is not None and tuple(fc.shape) != want["fc.weight"]:
        problems.append(f"fc.weight is {list(fc.shape)}, expected {list(want['fc.weight'])} = hidden_size x "
                        f"({cfg.num_fused_layers} target layers {cfg.target_layer_ids} x hidden_size {cfg.hidden_size})"
                        ": the weights were trained with another number of target layers than config.json lists")
    missing = sorted(set(want) - set(state))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    extra = sorted(set(state) - set(want))
    heads = [name for name in extra if name.split(".")[0] in ("markov_head", "confidence_head")]
    if heads:  # DSpark heads under a config that does not have them: say what the config does describe
        described = f"architectures [{cfg.architecture}]" + (
            ", enable_confidence_head false" if getattr(cfg, "enable_confidence_head", True) is False else "")
        problems.append(f"unexpected head tensors {', '.join(heads)}: config.json describes a {cfg.kind_label} draft "
                        f"({described})")
    extra = [name for name in extra if name not in heads]
    if extra:
        problems.append(f"unexpected tensors (a draft owns no embed_tokens/lm_head and has no `model.`/`module.` "
                        f"prefix): {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    problems += [f"{name} is {list(t.shape)}, expected {list(want[name])}" for name, t in state.items()
                 if name in want and name != "fc.weight" and tuple(t.shape) != want[name]]
    problems += [f"{name} holds NaN or inf values" for name, t in state.items()
                 if t.is_floating_point() and not torch.isfinite(t).all()]
    if problems:
        raise DraftMismatch("the draft's weights do not match its config.json:\n  " + "\n  ".join(problems))


def check_target(cfg: DFlashConfig, target: dict, max_model_len: int) -> None:
    """What vLLM/SGLang need from a draft served with this target (its config.json as a dict)."""
    problems = []
    layers = target["num_hidden_layers"]
    beyond = [i for i in cfg.target_layer_ids if not 0 <= i < layers]
    if beyond:
        problems.append(f"target_layer_ids {beyond} are beyond the target's {layers} decoder layers (ids are 0-based "
                        "decoder-layer outputs, HF hidden_states[id + 1])")
    if cfg.num_target_layers != layers:
        problems.append(f"num_target_layers is {cfg.num_target_layers} but the target has {layers} layers: the draft "
                        "was trained on hidden states of another model")
    if cfg.hidden_size != target["hidden_size"]:
        problems.append(f"hidden_size {cfg.hidden_size} != the target's {target['hidden_size']}: the draft shares the "
                        "target's embeddings and lm_head, so they must match")
    if cfg.vocab_size != target["vocab_size"]:
        problems.append(f"vocab_size {cfg.vocab_size} != the target's {target['vocab_size']}")
    if not 0 <= cfg.mask_token_id < min(cfg.vocab_size, target["vocab_size"]):
        problems.append(f"mask_token_id {cfg.mask_token_id} is not a token id below the vocabulary size "
                        f"{target['vocab_size']}")
    if cfg.max_position_embeddings < max_model_len:
        problems.append(f"max_position_embeddings {cfg.max_position_embeddings} < the serving context {max_model_len} "
                        "(vLLM's engine fails on longer requests): pass --max-model-len, or --yarn-factor with "
                        "--yarn-original-max-position")
    if problems:
        raise DraftMismatch("the draft does not fit the target:\n  " + "\n  ".join(problems))


def serving_config(cfg: DFlashConfig, max_model_len: int | None = None, yarn_factor: float | None = None,
                   yarn_original_max_position: int | None = None) -> DFlashConfig:
    """The config to serve with: YaRN rope scaling when asked, and a position limit covering the serving context."""
    changes: dict = {}
    if (yarn_factor is None) != (yarn_original_max_position is None):
        raise DraftMismatch("--yarn-factor and --yarn-original-max-position go together")
    if yarn_factor is not None:
        if yarn_factor <= 1:
            raise DraftMismatch(f"--yarn-factor {yarn_factor}: YaRN extends the context, the factor must be > 1")
        changes["rope_scaling"] = {"rope_type": "yarn", "factor": float(yarn_factor),
                                   "original_max_position_embeddings": int(yarn_original_max_position)}
        changes["max_position_embeddings"] = int(yarn_factor * yarn_original_max_position)
    if max_model_len is not None:
        changes["max_position_embeddings"] = max(changes.get("max_position_embeddings", 0), max_model_len)
    return dataclasses.replace(cfg, **changes)


# -- writing ---------------------------------------------------------------------------------------------------------

def export_draft(cfg: DFlashConfig, state: dict[str, torch.Tensor], target_dir: str | Path, out: str | Path, *,
                 max_model_len: int | None = None, yarn_factor: float | None = None,
                 yarn_original_max_position: int | None = None, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    """Check the draft against the target and write the serving folder atomically. Returns `out`."""
    from safetensors.torch import save as safetensors_bytes

    out = Path(out)
    target = read_target_config(target_dir)
    serve_len = max_model_len or target.get("max_position_embeddings") or cfg.max_position_embeddings
    cfg = serving_config(cfg, max_model_len, yarn_factor, yarn_original_max_position)
    check_weights(cfg, state)
    check_target(cfg, target, serve_len)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    config = cfg.to_dict()
    type(cfg).from_dict(config)  # what we write must read back
    tensors = {name: (t.to(dtype) if dtype is not None else t).contiguous() for name, t in state.items()}
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_durable(tmp / WEIGHTS, safetensors_bytes(tensors, metadata={"format": "pt"}))
        write_durable(tmp / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        if out.exists():  # --overwrite: move the old folder aside first, so a crash never leaves neither
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported draft (%d layers, block %d, target layers %s, mask %d, max positions %d, rope %s) -> %s",
             cfg.num_hidden_layers, cfg.block_size, cfg.target_layer_ids, cfg.mask_token_id,
             cfg.max_position_embeddings, cfg.rope_scaling or "default", out)
    return out


def serve_hints(out: Path, target_dir: str | Path, cfg: DFlashConfig) -> str:
    kind = kind_of(cfg)
    spec = json.dumps({"method": kind.vllm_method, "model": str(out),
                       "num_speculative_tokens": kind.model.num_drafts(cfg.block_size)})
    return (f"vLLM:   vllm serve {target_dir} --speculative-config '{spec}'\n"
            f"SGLang: python -m sglang.launch_server --model-path {target_dir} --speculative-algorithm "
            f"{kind.sglang_algorithm} --speculative-draft-model-path {out} --speculative-num-draft-tokens "
            f"{cfg.block_size}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflashkit export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="training output dir, its checkpoints/ dir, or one checkpoint step dir")
    p.add_argument("--target", required=True, help="the target's HF folder (only config.json is read)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the longest context the target will serve (default: its max_position_embeddings)")
    p.add_argument("--yarn-factor", type=float, default=None, help="YaRN rope scaling factor (e.g. 128)")
    p.add_argument("--yarn-original-max-position", type=int, default=None,
                   help="YaRN original_max_position_embeddings (e.g. 8192)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as trained)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("export configuration: %s", json.dumps(vars(args)))
    try:
        source = resolve_checkpoint(args.checkpoint)
        cfg, state = read_draft(source)
        log.info("draft checkpoint %s", source)
        out = export_draft(cfg, state, args.target, args.out, max_model_len=args.max_model_len,
                           yarn_factor=args.yarn_factor, yarn_original_max_position=args.yarn_original_max_position,
                           dtype=DTYPES.get(args.dtype), overwrite=args.overwrite)
    except (DraftMismatch, FileNotFoundError, FileExistsError, ValueError) as e:
        log.error("export failed: %s", e)
        return 2
    print(serve_hints(out, args.target, cfg))
    return 0
