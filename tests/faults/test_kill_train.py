"""SIGKILL of the trainer (train_dflash.py on a small real SmolLM2 dump) at seeded random steps, with checkpoints
every 1-3 steps, so some kills land while a checkpoint is being written. `--resume` continues from the last complete
checkpoint, and every step after it has exactly (bitwise) the loss of an uninterrupted run."""
from __future__ import annotations

import json
import os
import random
import sys
from functools import partial
from pathlib import Path

import torch
from faultlib import SEED, Stage, inject_kill, report, rounds

from dflashkit.config import load_config
from dflashkit.prepare import model_dir
from dflashkit.train.checkpoint import latest_checkpoint
from dflashkit.train.config import TrainConfig
from dflashkit.train.loop import train
from tests.helpers.train import MASK_TOKEN_ID

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
# A step's cost is mostly the loss over SmolLM2's 49152-token vocabulary, one row per anchor x block position: few
# anchors keep a round cheap; the checks (bitwise loss of every resumed step) are the same for any number.
ANCHORS = 4


def overrides(dump: Path, out: Path, checkpoint_every: int) -> list[str]:
    return [f"target_model={model_dir()}", f"output_dir={out}", "tensorboard=false", "seed=0", "model.num_layers=1",
            "model.block_size=4", f"model.mask_token_id={MASK_TOKEN_ID}", "model.intermediate_size=256",
            f"data.dump_dirs=[{dump}]", f"data.num_anchors={ANCHORS}", "data.micro_batch_size=4", "data.num_workers=0",
            "optim.lr=2e-3", "optim.warmup_steps=3", "optim.epochs=1", f"optim.max_steps={STEPS}",
            f"checkpoint_every={checkpoint_every}", "keep_checkpoints=2"]


def losses(out: Path) -> dict[int, float]:
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row["loss"]  # after a resume the last row of a step wins
    return rows


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def saved_step(out: Path) -> int:
    """The step of the last complete checkpoint (a step dir named by latest.json is complete), 0 if none."""
    latest = latest_checkpoint(out / "checkpoints")
    return json.loads((latest / "trainer_state.json").read_text())["step"] if latest else 0


def whole_run(out: Path, expected: dict[int, float]) -> None:
    """What the final checkpoint promises: the run finished, every step logged with the uninterrupted run's loss."""
    assert losses(out) == expected


def test_kill_trainer_at_random_steps(smollm2_dump, tmp_path):
    straight = tmp_path / "straight"
    old_umask = os.umask(0)  # the trainer's files must not be world-writable even so
    try:
        assert train(load_config(TrainConfig, None, overrides(smollm2_dump, straight, 1000)), resume=False) == 0
    finally:
        os.umask(old_umask)
    loose = {str(p.relative_to(straight)): oct(p.stat().st_mode & 0o777) for p in straight.rglob("*")
             if p.is_file() and p.stat().st_mode & 0o022}
    assert loose == {}, f"group/world-writable trainer outputs: {loose}"
    expected = losses(straight)
    assert sorted(expected) == list(range(1, STEPS + 1))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same kernels as this process
    stage = Stage(progress=steps_logged, done=lambda out: saved_step(out) == STEPS,
                  complete=partial(whole_run, expected=expected))
    faults = compared = mismatches = late = 0
    for r in range(rounds("train")):
        rng = random.Random(SEED * 1_000_003 + 104729 + r)
        out = tmp_path / f"round{r}"
        every = rng.randint(1, 3)
        cmd = [sys.executable, str(REPO / "train_dflash.py"), "--resume", *overrides(smollm2_dump, out, every)]
        late += inject_kill(cmd, env, stage, out, rng, (1, STEPS - 1), 0.3, tmp_path / "train.log")
        faults += 1
        saved = saved_step(out)
        assert train(load_config(TrainConfig, None, overrides(smollm2_dump, out, every)), resume=True) == 0
        got = losses(out)
        for step in range(saved + 1, STEPS + 1):
            compared += 1
            mismatches += got[step] != expected[step]
        assert all(got[s] == expected[s] for s in range(saved + 1, STEPS + 1)), (saved, got, expected)
    report("kill_train", rounds=rounds("train"),
           faults_injected=faults, resumed_steps_compared=compared, loss_mismatches=mismatches,
           late_kill_points_redrawn=late)
    assert faults >= 1 or rounds("train") == 0
