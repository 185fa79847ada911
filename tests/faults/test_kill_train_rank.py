"""SIGKILL of one rank of a 2-process trainer (torchrun, gloo on CPU) at a seeded random step: every rank is gone and
torchrun exits non-zero within a bounded time; the checkpoint latest.json names (if any) is whole, with both ranks'
RNG states; `--resume` on 2 ranks continues from it, every later step with exactly (bitwise) the loss of an
uninterrupted 2-rank run."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from faultlib import SEED, Stage, inject_kill, report, rounds
from safetensors.torch import load_file
from test_kill_train import STEPS, losses, overrides, saved_step, steps_logged, whole_run

from dflashkit.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 60  # torchrun's agent sees a worker die within seconds and stops the rest
CHECKPOINT_FILES = {"model.safetensors", "config.json", "optimizer.pt", "trainer_state.json", "rng-rank0.pt",
                    "rng-rank1.pt"}


def torchrun(dump: Path, out: Path, every: int) -> list[str]:
    # Two records per rank and step: the global batch of 4 makes 2 steps per epoch of the 8-record dump.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(REPO / "train_dflash.py"), "--resume", *overrides(dump, out, every), "data.micro_batch_size=2"]


def rank_pids(agent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (its children whose environment has RANK)."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            env = dict(kv.split("=", 1) for kv in (stat.parent / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(stat.parent.name)
    return ranks


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_one_rank_of_two(smollm2_dump, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on a 2-core box
    straight = tmp_path / "straight"
    res = subprocess.run(torchrun(smollm2_dump, straight, 1000), env=env, capture_output=True, text=True,
                         timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = losses(straight)
    assert sorted(expected) == list(range(1, STEPS + 1))
    stage = Stage(progress=steps_logged, done=lambda out: saved_step(out) == STEPS,
                  complete=partial(whole_run, expected=expected))
    faults = compared = mismatches = late = 0
    exit_s = []
    for r in range(rounds("train")):
        rng = random.Random(SEED * 1_000_003 + 15485863 + r)
        out = tmp_path / f"round{r}"
        every, rank = rng.randint(1, 3), rng.randint(0, 1)
        seen: dict = {}

        def victim(agent: subprocess.Popen, rank: int = rank, seen: dict = seen) -> int | None:
            seen.update(agent=agent, ranks=rank_pids(agent.pid), t0=time.monotonic())
            return seen["ranks"].get(rank)

        # Killed once `every`..STEPS-2 steps are logged: after a checkpoint, or while one is written.
        late += inject_kill(torchrun(smollm2_dump, out, every), env, stage, out, rng, (every, STEPS - 2), 0.3,
                            tmp_path / "torchrun.log", victim=victim, bound_s=BOUND_S)
        exit_s.append(time.monotonic() - seen["t0"])
        faults += 1
        assert seen["agent"].returncode != 0 and sorted(seen["ranks"]) == [0, 1], seen
        assert not any(alive(pid) for pid in seen["ranks"].values()), seen
        latest = latest_checkpoint(out / "checkpoints")
        if latest is not None:  # named by latest.json: whole, both ranks' RNG included, every file loads
            assert {p.name for p in latest.iterdir()} == CHECKPOINT_FILES
            load_file(latest / "model.safetensors")
            for name in CHECKPOINT_FILES - {"model.safetensors", "config.json", "trainer_state.json"}:
                torch.load(latest / name, weights_only=True)
        saved = saved_step(out)
        res = subprocess.run(torchrun(smollm2_dump, out, every), env=env, capture_output=True, text=True,
                             timeout=900, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        got = losses(out)
        for step in range(saved + 1, STEPS + 1):
            compared += 1
            mismatches += got[step] != expected[step]
        assert all(got[s] == expected[s] for s in range(saved + 1, STEPS + 1)), (saved, got, expected)
    report("kill_train_rank", rounds=rounds("train"), faults_injected=faults, resumed_steps_compared=compared,
           loss_mismatches=mismatches, late_kill_points_redrawn=late, max_exit_s=round(max(exit_s, default=0), 2))
    assert faults >= 1 or rounds("train") == 0
