"""Atomic checkpoints: OUTPUT/checkpoints/step-XXXXXXXX/ with

    model.safetensors   the draft's weights under their exported names (fc.weight, layers.0.self_attn.q_proj.weight..)
    config.json         the draft's DFlash config.json
    optimizer.pt        AdamW state (full, unsharded, keyed by parameter name)
    trainer_state.json  step, data position, the resolved recipe
    rng-rank<r>.pt      each rank's torch RNG states

A checkpoint is written into a hidden temp dir and renamed into place once every file is on disk, then `latest.json`
is replaced atomically: a step dir that exists is complete, and a kill at any moment leaves the previous one intact.
Full (gathered) state dicts make checkpoints independent of the world size and of DDP vs FSDP2.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dflashkit.io import atomic_write_json, read_json, write_durable
from dflashkit.train.distributed import Dist

log = logging.getLogger(__name__)
LATEST = "latest.json"


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(root: Path, step: int, model, optimizer, d: Dist, trainer_state: dict, config_json: str,
                    keep: int) -> Path:
    from safetensors.torch import save as safetensors_bytes

    # Collective under FSDP2: every rank takes part, rank 0 receives the full tensors on CPU.
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    try:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_durable(tmp / "model.safetensors", safetensors_bytes({k: v.contiguous() for k, v in model_sd.items()}))
            write_durable(tmp / "config.json", config_json.encode())
            write_durable(tmp / "optimizer.pt", _torch_bytes(optim_sd))
            write_durable(tmp / "trainer_state.json", json.dumps(trainer_state, indent=1).encode())
        d.barrier()
        write_durable(tmp / f"rng-rank{d.rank}.pt", _torch_bytes(rng_state(d.device)))
    except OSError as e:  # a full disk: free the partial checkpoint, and name it (the OS's error names no file)
        shutil.rmtree(tmp, ignore_errors=True)
        e.filename = e.filename or str(final)
        raise
    d.barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)  # a rerun that reached this step again
        os.rename(tmp, final)
        atomic_write_json(root / LATEST, {"step": step, "path": final.name})
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint step %d -> %s", step, final)
    d.barrier()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    if not (root / LATEST).exists():
        return None
    path = root / read_json(root / LATEST)["path"]
    if not path.is_dir():
        raise FileNotFoundError(f"{root / LATEST} points at {path}, which does not exist")
    return path


def load_checkpoint(path: Path, model, optimizer, d: Dist) -> dict:
    """Restore model, optimizer and this rank's RNG in place; returns trainer_state.json."""
    from safetensors.torch import load_file

    model_sd = load_file(path / "model.safetensors")
    optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))
    rng_file = path / f"rng-rank{d.rank}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than saved
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    return read_json(path / "trainer_state.json")
