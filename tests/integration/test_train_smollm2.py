"""Training on a real (small) SmolLM2 dump: the target head, learning, held-out scoring, DDP/FSDP2 equivalence, kill
and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dflashkit.dump import list_dump_records, load_dump_record, read_meta
from dflashkit.model import TargetHead
from dflashkit.prepare import model_dir
from dflashkit.train import data
from dflashkit.train.distributed import Dist
from dflashkit.train.loop import Trainer, draft_config, train
from tests.helpers.train import (
    MASK_TOKEN_ID,
    assert_resumed_as_straight,
    free_port,
    kill_trainer_at_first_checkpoint,
    metrics,
    recipe,
    two_process_worker,
    weights,
)

pytestmark = pytest.mark.integration  # it spawns the trainer (torchrun, 2 processes): minutes, not seconds

REPO = Path(__file__).resolve().parents[2]


def test_target_head_gives_the_targets_greedy_tokens(smollm2_dump):
    """The fake base (embed_tokens = lm_head, tied; the final norm) on the dumped pre-norm final states reproduces
    the tokens SmolLM2 chose greedily: the KD path's target logits are the target's."""
    head = TargetHead.from_pretrained(model_dir())
    assert head.tied and head.lm_head.data_ptr() == head.embed_tokens.weight.data_ptr()
    meta = read_meta(smollm2_dump)
    agree = total = 0
    for path in list_dump_records(smollm2_dump):
        rec = load_dump_record(path, meta)
        start = int(rec["loss_mask"].nonzero()[0]) - 1  # the last prompt position predicts the first reply token
        logits = head.final_norm(rec["hidden_states"][start:-1]) @ head.lm_head.t()
        agree += int((logits.argmax(-1) == rec["input_ids"][start + 1:]).sum())
        total += logits.shape[0]
    assert agree / total >= 0.99, (agree, total)


def test_training_lowers_loss_and_raises_accuracy(smollm2_dump, tmp_path):
    assert train(recipe(smollm2_dump, tmp_path), resume=False) == 0
    rows = metrics(tmp_path)
    assert sorted(rows) == list(range(1, 31))
    # From random init the first loss is far above ln(vocab); 30 CPU steps on 8 conversations only start the
    # climb in accuracy, so the accuracy bar is modest (a real run is in docs/TRAINING.md).
    first, last = [rows[s] for s in (1, 2, 3)], [rows[s] for s in range(21, 31)]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    assert mean(last, "loss") < 0.3 * mean(first, "loss")
    assert mean(last, "acc") > mean(first, "acc") + 0.02
    assert mean(last, "tau_anchor_mean") > mean(first, "tau_anchor_mean")
    assert len(rows[30]["acc_per_pos"]) == 3
    assert (tmp_path / "checkpoints" / "step-00000030" / "config.json").exists()


def test_heldout_records_are_kept_out_of_training_and_scored_at_checkpoints(smollm2_dump, tmp_path):
    all_paths = list_dump_records(smollm2_dump)
    train_paths, heldout_paths = data.split_heldout(all_paths, 2)
    assert len(heldout_paths) == 2 and sorted(train_paths + heldout_paths) == sorted(all_paths)
    assert data.split_heldout(all_paths, 2) == (train_paths, heldout_paths)  # the same text for every run
    with pytest.raises(ValueError, match="leaves none"):
        data.split_heldout(all_paths, 8)

    assert train(recipe(smollm2_dump, tmp_path, data__heldout_records=2, checkpoint_every=5), resume=False) == 0
    # 6 training records, micro-batch 4: one step per epoch, 15 epochs; a score at every checkpoint.
    assert sorted(metrics(tmp_path)) == list(range(1, 16))
    state = json.loads((tmp_path / "checkpoints" / "step-00000015" / "trainer_state.json").read_text())
    assert state["data_position"]["num_records"] == 6
    rows = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15]
    assert all(r["tau"] >= 1 and len(r["acc_per_pos"]) == 3 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]  # the draft learns the target's features, not just these 6 texts


def test_heldout_score_is_the_training_steps_loss_without_the_update(smollm2_dump):
    """evaluate() computes what step() reports (the loss and stats of the weights before the update), and changes
    no weight."""
    cfg = recipe(smollm2_dump, Path("unused"))
    meta, paths = data.read_dump_dirs([str(smollm2_dump)])
    trainer = Trainer(cfg, Dist(), meta["final_state"], draft_config(cfg, meta), TargetHead.from_pretrained(model_dir()))
    dataset = data.DumpDataset(paths, meta, 4096, 8, 0, with_final=False)
    batches = [data.collate([dataset[(i, 0)] for i in range(j, j + 4)], cfg.model.block_size) for j in (0, 4)]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    scored = trainer.evaluate(batches)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    stepped = trainer.read(trainer.step(batches, lr=1e-3))
    assert scored["loss"] == pytest.approx(stepped["loss"], rel=1e-6)
    assert scored["tau_anchor_mean"] == stepped["tau_anchor_mean"] and scored["acc_per_pos"] == stepped["acc_per_pos"]


def test_two_processes_match_one_process_with_ddp_and_fsdp2(smollm2_dump, tmp_path):
    # KD and D-PACE on, so every loss path is compared. A large Adam eps keeps the first updates proportional to
    # the gradients (with eps ~ 0 they are lr * sign(g), which flips on gradients that are float noise). Two records
    # are held out: one rank scores both, or each of two ranks scores one; the sums must agree.
    common = {"optim__max_steps": 2, "optim__eps": 1e-3, "loss__kd_weight": 0.5, "loss__kind": "dpace",
              "data__heldout_records": 2}
    assert train(recipe(smollm2_dump, tmp_path / "one", **common), resume=False) == 0
    for mode in ("ddp", "fsdp"):
        two = recipe(smollm2_dump, tmp_path / mode, data__micro_batch_size=2, parallel=mode, **common)
        torch.multiprocessing.spawn(two_process_worker, args=(two, free_port()), nprocs=2)
        for step in (1, 2):
            a, b = metrics(tmp_path / "one")[step], metrics(tmp_path / mode)[step]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), mode
            assert a["tau_anchor_mean"] == pytest.approx(b["tau_anchor_mean"]) and a["tokens"] == b["tokens"]
        held_one, held_two = ([json.loads(line) for line in (tmp_path / run / "heldout.jsonl").read_text().splitlines()]
                              for run in ("one", mode))
        assert [r["step"] for r in held_one] == [r["step"] for r in held_two] == [2]
        assert held_one[0]["loss"] == pytest.approx(held_two[0]["loss"], rel=1e-5), mode
        for key in ("tau", "tau_anchor_mean"):
            assert held_one[0][key] == pytest.approx(held_two[0][key]), mode
        wa, wb = weights(tmp_path / "one"), weights(tmp_path / mode)
        assert wa.keys() == wb.keys()
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], atol=2e-6, rtol=1e-4, msg=f"{mode} {name}")


def test_kill_and_resume_continues_exactly(smollm2_dump, tmp_path):
    common = {"optim__max_steps": 6, "optim__epochs": 1}
    assert train(recipe(smollm2_dump, tmp_path / "straight", **common), resume=False) == 0
    killed = tmp_path / "killed"
    cfg = recipe(smollm2_dump, killed, checkpoint_every=2, **common)
    args = [f"target_model={cfg.target_model}", f"output_dir={killed}", "tensorboard=false", "seed=0",
            "model.num_layers=1", "model.block_size=4", f"model.mask_token_id={MASK_TOKEN_ID}",
            "model.intermediate_size=256", f"data.dump_dirs=[{smollm2_dump}]", "data.num_anchors=8",
            "data.micro_batch_size=4", "data.num_workers=0", "optim.lr=2e-3", "optim.warmup_steps=3",
            "optim.epochs=1", "optim.max_steps=6", "loss.decay_gamma=4.0", "checkpoint_every=2"]
    saved = kill_trainer_at_first_checkpoint(args, killed)
    assert saved < 6, "the run finished before it could be killed"
    with pytest.raises(SystemExit, match="--resume"):
        train(cfg, resume=False)
    assert train(cfg, resume=True) == 0
    assert_resumed_as_straight(tmp_path / "straight", killed, range(saved + 1, 7))
