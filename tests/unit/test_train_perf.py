"""Training-speed options and the FLOP count behind MFU: activation checkpointing changes nothing but memory, the
sync-free loss path equals the boolean-mask one, the FLOP count matches a hand count and the real mask, and the step
benchmark reports an out-of-memory step as a row."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from dflashkit.model import TargetHead
from dflashkit.model.masks import block_labels, dense_mask
from dflashkit.train.config import DataSpec, DraftSpec, TrainConfig
from dflashkit.train.data import anchor_generator, collate, padded_features, sample_anchors
from dflashkit.train.distributed import Dist
from dflashkit.train.flops import batch_flops, sequence_flops
from dflashkit.train.loop import Trainer
from dflashkit.train.loss import block_loss
from tests.helpers.train import tiny_config

REPO = Path(__file__).resolve().parents[2]


def batch(cfg, lengths=(40, 29), anchors=6, seed=0, label_width=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, t in enumerate(lengths):
        loss_mask = torch.zeros(t, dtype=torch.uint8)
        loss_mask[t // 3:] = 1
        a, valid = sample_anchors(loss_mask, anchors, anchor_generator(seed, 0, i))
        items.append({"input_ids": torch.randint(0, cfg.vocab_size - 1, (t,), generator=g),
                      "aux_hidden_states": torch.randn(t, cfg.num_fused_layers * cfg.hidden_size, generator=g),
                      "loss_mask": loss_mask, "anchors": a, "anchor_valid": valid, "length": torch.tensor(t)})
    return collate(items, label_width or cfg.block_size)  # DSpark's labels are block_size + 1 wide


def trainer(cfg, model: dict | None = None, **options) -> Trainer:
    """A trainer of the tiny draft `cfg` over a random head; `model`: more DraftSpec fields (a DSpark draft's)."""
    tc = TrainConfig(target_model="unused", output_dir="unused", model=DraftSpec(num_layers=cfg.num_hidden_layers,
                     block_size=cfg.block_size, mask_token_id=cfg.mask_token_id, **(model or {})),
                     data=DataSpec(dump_dirs=["unused"]), **options)
    g = torch.Generator().manual_seed(7)
    h, v = cfg.hidden_size, cfg.vocab_size
    head = TargetHead(torch.randn(v, h, generator=g), torch.randn(v, h, generator=g), torch.ones(h), 1e-6)
    return Trainer(tc, Dist(), "pre_norm", cfg, head)


def run(t: Trainer, cfg, steps=3) -> tuple[list[float], dict]:
    b = batch(cfg)
    losses = [t.read(t.step([b], lr=1e-2))["loss"] for _ in range(steps)]
    return losses, {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def test_activation_checkpointing_gives_the_same_training_bitwise():
    cfg = tiny_config()
    plain, plain_w = run(trainer(cfg), cfg)
    ckpt = trainer(cfg, activation_checkpointing=True)
    assert all(layer.activation_checkpointing for layer in ckpt.model.layers)
    checkpointed, ckpt_w = run(ckpt, cfg)
    assert checkpointed == plain and plain[-1] < plain[0]
    assert plain_w.keys() == ckpt_w.keys()  # parameter names (checkpoints, export) unchanged
    assert all(torch.equal(plain_w[k], ckpt_w[k]) for k in plain_w)


def test_the_default_step_trains_as_the_plain_one():
    """The default (fast) step against the plain one (`step: plain`, every lm_head chunk recomputed in backward):
    the same losses and weights up to fp32 rounding. On the CPU the fast step is not compiled (the GPU test
    tests/gpu/test_train_step_match.py covers compilation), so this checks the lm_head gradient in forward
    inside the whole step: loss normalization, gradient clipping, AdamW."""
    cfg = tiny_config()
    fast = trainer(cfg)
    assert fast.cfg.step == "fast" and fast.grad_in_forward and not fast.compiled
    fast_losses, fast_w = run(fast, cfg)
    plain_losses, plain_w = run(trainer(cfg, step="plain"), cfg)
    assert plain_losses[-1] < plain_losses[0]
    assert fast_losses == pytest.approx(plain_losses, rel=1e-5)
    # AdamW normalizes each gradient element: where one is ~0, rounding flips the sign of a whole lr-sized
    # (1e-2) move, so weights are compared to 1% of one step's move.
    for k in plain_w:
        torch.testing.assert_close(fast_w[k], plain_w[k], rtol=1e-4, atol=1e-4)


def test_the_step_reads_nothing_back_from_the_device(monkeypatch):
    """Trainer.step leaves its results on the device (a read waits for the GPU and stalls the host's kernel
    launches); `read` is the one place that copies them back. Any host read from dflashkit code during a step fails
    here (the optimizer's own reads on the CPU are torch's, not ours)."""
    cfg = tiny_config()
    t, b = trainer(cfg), batch(cfg)
    reads = []

    def guarded(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "dflashkit" in Path(caller).parts:
                reads.append(f"{name} from {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
            m.setattr(torch.Tensor, name, guarded(name))
        result = t.step([b], lr=1e-2)
    assert reads == []
    assert all(isinstance(v, torch.Tensor) for v in result.values())
    assert t.read(result)["loss"] == pytest.approx(float(result["loss"]))


def test_collate_packs_the_wide_features_and_pads_them_back_on_the_device_side():
    """The fused target layers travel as [sum of lengths, width] and come back as the zero-padded [b, T, width]
    the draft reads; the token-level tensors are padded as before; the targets are the batch's own."""
    cfg = tiny_config()
    b = batch(cfg, lengths=(40, 29))
    assert b["aux_hidden_states"].shape == (69, cfg.num_fused_layers * cfg.hidden_size)
    padded = padded_features(b, "aux_hidden_states")
    t = b["input_ids"].shape[1]
    assert padded.shape == (2, t, cfg.num_fused_layers * cfg.hidden_size) and t == 128  # padded_length(40)
    assert torch.equal(padded[0, :40], b["aux_hidden_states"][:40]) and torch.equal(padded[1, :29], b["aux_hidden_states"][40:])
    assert not padded[0, 40:].any() and not padded[1, 29:].any()
    labels, counted = block_labels(b["input_ids"], b["loss_mask"], b["anchors"], b["anchor_valid"], cfg.block_size)
    assert torch.equal(b["labels"], labels) and torch.equal(b["counted"], counted)
    assert torch.equal(b["rows"], counted.flatten().nonzero()[:, 0])


def test_precomputed_rows_equal_boolean_mask_selection():
    torch.manual_seed(0)
    b, n, bs, h, v = 2, 5, 4, 8, 30
    hidden = torch.randn(b, n * bs, h, requires_grad=True)
    lm_head, labels = torch.randn(v, h), torch.randint(0, v, (b, n, bs))
    counted = torch.rand(b, n, bs) > 0.3
    counted[..., 0] = False
    rows = counted.flatten().nonzero()[:, 0]
    results = []
    for kind in ("ce", "dpace"):
        for given in (None, rows):
            hidden.grad = None
            loss, stats, _ = block_loss(hidden, lm_head, labels, counted, kind=kind, gamma=4.0, alpha=0.5,
                                     kd_weight=0.0, chunk_rows=7, rows=given)
            loss.backward()
            results.append((loss.detach(), stats, hidden.grad.clone()))
        for a, b_ in zip(*results[-2:]):
            assert torch.equal(a, b_)
    # The selection itself: the rows boolean indexing picks, in the same order.
    assert torch.equal(hidden.reshape(-1, h)[counted.flatten()], hidden.reshape(-1, h).index_select(0, rows))


def test_lm_head_gradient_in_forward_equals_the_recomputed_one():
    torch.manual_seed(0)
    b, n, bs, h, v = 2, 7, 4, 16, 50
    hidden = torch.randn(b, n * bs, h, requires_grad=True)
    lm_head, labels, teacher = torch.randn(v, h), torch.randint(0, v, (b, n, bs)), torch.randn(b, n, bs, h)
    counted = torch.rand(b, n, bs) > 0.3
    counted[..., 0] = False
    for kind in ("ce", "dpace"):
        results = []
        for grad_in_forward in (False, True):
            hidden.grad = None
            loss, stats, _ = block_loss(hidden, lm_head, labels, counted, kind=kind, gamma=4.0, alpha=0.5, kd_weight=0.3,
                                     teacher=teacher, chunk_rows=5, grad_in_forward=grad_in_forward)
            loss.backward()
            results.append((loss.detach(), stats, hidden.grad.clone()))
        (loss_a, stats_a, grad_a), (loss_b, stats_b, grad_b) = results
        assert torch.equal(loss_a, loss_b) and torch.equal(stats_a, stats_b)
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-5)  # fp32 rounding order only


def test_flop_count_matches_a_hand_count():
    cfg = tiny_config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                      intermediate_size=16, vocab_size=10, target_layer_ids=[0, 2], mask_token_id=9, block_size=2)
    f = sequence_flops(cfg, seq_len=6, anchors=[2, 4], lm_head_rows=2)
    # fc: 2 * S 6 * (2 layers * H 8) * H 8 = 1536, x2 (no input grad).
    assert f.fc == 2 * 1536
    # Q = 2 blocks * 2 = 4 tokens. q 2*4*8*8 = 512, o 512, k and v 2*(6+4)*8*4 = 640 each, MLP 3*2*4*8*16 = 3072.
    assert f.projections == 3 * (512 + 512 + 640 + 640 + 3072)
    # Allowed (query, key) pairs: block at 2 -> 2 queries x (2 context + 2 block) = 8, at 4 -> 2 x (4 + 2) = 12;
    # QK^T and PV: 2 * 2 * 2 heads * 4 dims * 20 pairs = 640, x3.
    assert f.attention == 3 * 640
    assert f.lm_head == 2 * (2 * 2 * 8 * 10)  # forward + input grad over 2 counted rows
    assert f.total == 3072 + 16128 + 1920 + 640


def test_flop_count_follows_the_real_mask_rows_and_lengths():
    cfg = tiny_config()
    bt = batch(cfg)
    got = batch_flops(cfg, bt)
    _, counted = block_labels(bt["input_ids"], bt["loss_mask"], bt["anchors"], bt["anchor_valid"], cfg.block_size)
    expected_attention = 0
    for i in range(2):
        valid = bt["anchor_valid"][i].bool()
        anchors, t = bt["anchors"][i][valid], int(bt["length"][i])
        allowed = dense_mask(anchors[None], t, cfg.block_size).sum()  # the mask's True entries, padding excluded
        expected_attention += 3 * cfg.num_hidden_layers * 4 * cfg.num_attention_heads * cfg.head_dim * int(allowed)
    assert got.attention == expected_attention
    assert got.lm_head == 2 * 2 * int(counted.sum()) * cfg.hidden_size * cfg.vocab_size
    assert got.fc == 2 * 2 * (40 + 29) * cfg.num_fused_layers * cfg.hidden_size ** 2  # real lengths, not padded


def step_benchmark():
    spec = importlib.util.spec_from_file_location("train_step_bench", REPO / "bench" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


SMALL_STEP = ["--preset", "smollm2", "--seq", "64", "--anchors", "4", "--vocab-size", "256", "--steps", "1",
              "--warmup", "0"]


def test_step_benchmark_reports_out_of_memory_as_a_row(monkeypatch, capsys):
    bench, small = step_benchmark(), SMALL_STEP
    assert bench.main(small) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["losses"] and row["model_tflop_per_gpu_step"] >= 0 and row["command"].startswith("python bench/")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(bench.Trainer, "step", out_of_memory)
    assert bench.main(small) == 3
    row = json.loads(capsys.readouterr().out)
    assert row["oom"] is True and "out of memory" in row["error"] and row["micro_batch"] == 1


def test_step_benchmark_profiles_steps_after_the_timed_ones(capsys, tmp_path):
    bench = step_benchmark()
    assert bench.main(SMALL_STEP + ["--profile-dir", str(tmp_path), "--profile-steps", "2"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["losses"]) == 1 and row["step_time_s"] > 0  # the profiled steps are not in the row
    table = (tmp_path / "rank0.txt").read_text()
    assert table.startswith("steps 1-2, rank 0:") and "ops over the 2 steps" in table and "aten::mm" in table
