"""`model.kind: dspark` on the real SmolLM2 dump: it learns, resumes exactly, and two FSDP2 processes compute what
one does (the chunked loss uses the Markov projection that the module's forward hands out, gathered)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dflashkit.train.loop import train
from tests.helpers.train import free_port, metrics, recipe, two_process_worker, weights

pytestmark = pytest.mark.integration  # it trains on the real SmolLM2 dump, two processes for FSDP2, like test_train_smollm2

DSPARK = {"model__kind": "dspark", "model__markov_rank": 16}


def test_dspark_learns_saves_its_heads_and_resumes_exactly(smollm2_dump, tmp_path):
    straight = tmp_path / "straight"
    assert train(recipe(smollm2_dump, straight, optim__max_steps=12, checkpoint_every=4, **DSPARK), resume=False) == 0
    rows = metrics(straight)
    assert rows[12]["loss"] < 0.8 * rows[1]["loss"]
    assert len(rows[12]["acc_per_pos"]) == 4  # block_size 4: four drafted positions
    w = weights(straight)
    assert w["markov_head.markov_w1.weight"].shape == (49152, 16)
    assert w["confidence_head.proj.weight"].shape == (1, 576 + 16)
    assert w["markov_head.markov_w2.weight"].abs().sum() > 0  # trained away from its zero start
    config = json.loads((straight / "checkpoints" / "step-00000012" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["markov_rank"] == 16

    # Resumed from its step-8 checkpoint (heads, their AdamW moments, data position), steps 9-12 are bitwise the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000012")
    (resumed / "checkpoints" / "latest.json").write_text(json.dumps({"step": 8, "path": "step-00000008"}))
    assert train(recipe(smollm2_dump, resumed, optim__max_steps=12, checkpoint_every=4, **DSPARK), resume=True) == 0
    for step in range(9, 13):
        assert metrics(resumed)[step]["loss"] == rows[step]["loss"], step
    wb = weights(resumed)
    assert all(torch.equal(w[k], wb[k]) for k in w)


def test_dspark_two_fsdp2_processes_match_one_process(smollm2_dump, tmp_path):
    mode = "fsdp"
    common = {"optim__max_steps": 2, "optim__eps": 1e-3, "loss__kd_weight": 0.5, **DSPARK}  # KD's teacher too
    assert train(recipe(smollm2_dump, tmp_path / "one", **common), resume=False) == 0
    two = recipe(smollm2_dump, tmp_path / mode, data__micro_batch_size=2, parallel=mode, **common)
    torch.multiprocessing.spawn(two_process_worker, args=(two, free_port()), nprocs=2)
    for step in (1, 2):
        a, b = metrics(tmp_path / "one")[step], metrics(tmp_path / mode)[step]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["tau_anchor_mean"] == pytest.approx(b["tau_anchor_mean"])
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / mode)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-6, rtol=1e-4, msg=f"{mode} {name}")
