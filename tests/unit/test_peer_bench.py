"""bench/peers/specforge_step.py: SpecForge's DFlash step runs through its public classes on our synthetic batch,
converted to its inputs. Needs specforge installed (bench/peers/ installs it apart from our environment for the GPU
run); skipped without it."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("specforge.algorithms.common.dflash_family_model")

REPO = Path(__file__).resolve().parents[2]
TINY = ["--preset", "smollm2", "--seq", "96", "--anchors", "6", "--vocab-size", "300", "--num-layers", "1",
        "--attention", "sdpa"]


def bench():
    spec = importlib.util.spec_from_file_location("specforge_step", REPO / "bench" / "peers" / "specforge_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inputs_are_our_batch_with_the_features_padded():
    from dflashkit.train.synthetic import synthetic_batch

    b = synthetic_batch(micro=2, seq=100, width=12, anchors=5, vocab=50, block_size=4, seed=3)
    feed = bench().inputs(b, torch.device("cpu"), torch.float32)
    assert feed["hidden_states"].shape == (2, 128, 12) and torch.equal(feed["input_ids"], b["input_ids"])
    assert torch.equal(feed["hidden_states"][1, :100], b["aux_hidden_states"][100:].float())
    assert feed["loss_mask"].dtype == torch.float32 and feed["loss_mask"].sum() == b["loss_mask"].sum()


def test_specforge_step_trains_on_the_synthetic_batch(capsys):
    assert bench().main(TINY + ["--steps", "3", "--warmup", "0", "--lr", "1e-3"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["peer"] == "specforge" and row["draft_params_m"] > 0 and row["step_time_s"] > 0
    losses = row["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
