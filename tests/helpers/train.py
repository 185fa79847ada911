"""Shared by the model and training tests: tiny draft configs and a small real SmolLM2 dump.

The dump is written with the dump stage's writer (`dflashkit.dump.format`). Its conversations are SmolLM2's own
greedy answers to the first 8 MT-Bench prompts, recorded once as token ids in `train_smollm2_greedy.json` (generating
them takes minutes on a CPU; a forward pass does not). One HF forward pass per conversation gives the hidden states at
the target layers (`hidden_states[k + 1]`) and the pre-norm output of the last decoder layer (a hook: HF's last
`hidden_states` entry is already normed). Built once per test process; the session fixture `smollm2_dump`
(tests/conftest.py) hands it out.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dflashkit.config import from_dict
from dflashkit.dump.format import FORMAT_VERSION, save_dump_record, write_meta
from dflashkit.model import DFlashConfig
from dflashkit.model.layers import CONVENTION
from dflashkit.prepare import model_dir
from dflashkit.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
GREEDY = REPO / "tests" / "data" / "train_smollm2_greedy.json"

LAYER_IDS = [1, 14, 27]
MASK_TOKEN_ID = 16  # SmolLM2's <empty_output>: a special token chats never contain


def tiny_config(**overrides) -> DFlashConfig:
    dims = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                "intermediate_size": 96, "vocab_size": 128, "target_layer_ids": [0, 2, 4], "num_target_layers": 6,
                "mask_token_id": 127, "block_size": 4, "rope_theta": 10000.0, "max_position_embeddings": 512}
    dims.update(overrides)
    return DFlashConfig(**dims)


@functools.cache
def smollm2_dump_dir() -> Path:
    from transformers import AutoModelForCausalLM

    out = Path(tempfile.mkdtemp(prefix="dflashkit-smollm2-dump-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval()
    final = {}
    model.model.layers[-1].register_forward_hook(lambda m, i, o: final.update(h=o[0] if isinstance(o, tuple) else o))
    for conv in json.loads(GREEDY.read_text())["conversations"]:
        ids = torch.tensor(conv["prompt_ids"] + conv["reply_ids"])
        with torch.no_grad():
            hs = model(ids[None], output_hidden_states=True).hidden_states
        save_dump_record(out, {
            "input_ids": ids, "conversation_id": conv["id"],
            "hidden_states": final["h"][0].clone(),
            "aux_hidden_states": torch.cat([hs[k + 1][0] for k in LAYER_IDS], dim=-1),
            "loss_mask": torch.tensor([0] * len(conv["prompt_ids"]) + [1] * len(conv["reply_ids"]), dtype=torch.uint8),
        })
    write_meta(out, {
        "format": FORMAT_VERSION, "model": str(model_dir()), "backend": "hf", "dtype": "float32",
        "hidden_size": model.config.hidden_size, "num_hidden_layers": model.config.num_hidden_layers,
        "target_layer_ids": LAYER_IDS, "layer_id_convention": CONVENTION, "final_state": "pre_norm",
        "max_seq_len": 4096, "length_policy": "skip", "chat_template_sha256": "test", "chat_template": "tokenizer",
    })
    return out


# ---- running the trainer on that dump (tests/integration/test_train_*.py) ----------------------------------------

def recipe(dump: Path, out: Path, **overrides) -> TrainConfig:
    data = {"target_model": str(model_dir()), "output_dir": str(out), "tensorboard": False, "seed": 0,
            "model": {"num_layers": 1, "block_size": 4, "mask_token_id": MASK_TOKEN_ID, "intermediate_size": 256},
            "data": {"dump_dirs": [str(dump)], "num_anchors": 8, "micro_batch_size": 4, "num_workers": 0},
            "optim": {"lr": 2e-3, "warmup_steps": 3, "epochs": 15},
            "loss": {"decay_gamma": 4.0}, "checkpoint_every": 1000}
    return from_dict(TrainConfig, with_overrides(data, overrides))


def with_overrides(data: dict, overrides: dict) -> dict:
    """`data` with keyword overrides applied, `a__b=v` setting data["a"]["b"] (keywords cannot hold dots)."""
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return data


def metrics(out: Path) -> dict[int, dict]:
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # after a resume the last row of a step wins
    return rows


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = json.loads((out / "checkpoints" / "latest.json").read_text())["path"]
    return load_file(out / "checkpoints" / latest / "model.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_worker(rank: int, cfg: TrainConfig, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    from dflashkit.train.loop import train

    train(cfg, resume=False)


def kill_trainer_at_first_checkpoint(args: list[str], out: Path) -> int:
    """Run `train_dflash.py ARGS` (writing to `out`), SIGKILL it as soon as its first checkpoint is complete, and
    return that checkpoint's step."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same kernels as this process
    proc = subprocess.Popen([sys.executable, str(REPO / "train_dflash.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "checkpoints" / "latest.json"
    while not latest.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(latest.read_text())["step"]


def assert_resumed_as_straight(straight: Path, resumed: Path, steps: range) -> None:
    """The resumed run's losses at `steps` and its final weights equal the uninterrupted run's, bitwise."""
    a, b = metrics(straight), metrics(resumed)
    for step in steps:
        assert b[step]["loss"] == a[step]["loss"], step
    wa, wb = weights(straight), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
