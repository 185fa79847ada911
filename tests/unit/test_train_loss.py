"""Loss weights, D-PACE, acceptance metrics, chunked logits, anchors, batch order, and dump compatibility checks."""
from __future__ import annotations

import math

import pytest
import torch

from dflashkit.train.data import BatchPlan, anchor_generator, first_anchors, read_dump_dirs, sample_anchors
from dflashkit.train.loss import (
    acceptance_stats,
    accepted_per_block,
    block_loss,
    dpace_weights,
    normalizer,
    position_weights,
    row_stats,
    served_walk,
    summarize,
)


def test_position_weights_decay_from_the_first_predicted_slot():
    w = position_weights(5, gamma=7.0)
    assert w[0] == 0 and w[1] == 1
    torch.testing.assert_close(w[1:], torch.tensor([math.exp(-k / 7) for k in range(4)]))
    assert position_weights(4, gamma=0).tolist() == [0, 1, 1, 1]


def test_dpace_weights_are_the_gradient_of_expected_accepted_length():
    torch.manual_seed(0)
    log_q = torch.rand(3, 6).log().requires_grad_()
    counted = torch.ones(3, 6, dtype=torch.bool)
    counted[:, 0] = False
    q = log_q.exp()
    expected_accepted = torch.cumprod(torch.where(counted, q, torch.ones_like(q)), -1)[:, 1:].sum()
    expected_accepted.backward()
    w = dpace_weights(q.detach(), counted, alpha=0.0)
    torch.testing.assert_close(w, log_q.grad)
    # Smoothing lifts every weight; slots that do not count get none.
    assert (dpace_weights(q.detach(), counted, 0.5)[:, 1:] >= w[:, 1:]).all()
    assert (dpace_weights(q.detach(), counted, 0.5)[:, 0] == 0).all()


def test_acceptance_stats_count_the_run_of_correct_slots():
    correct = torch.tensor([[[False, True, True, False, True], [False, False, True, True, True],
                             [False, True, True, True, False]]])
    counted = torch.tensor([[[False, True, True, True, True], [False, True, True, True, True],
                             [False, True, True, True, False]]])
    accepted = accepted_per_block(correct & counted)
    assert accepted.tolist() == [[2, 0, 3]]
    s = summarize(acceptance_stats(correct & counted, counted, accepted), 5)
    assert s["tau_anchor_mean"] == pytest.approx(1 + (2 + 0 + 3) / 3)
    assert s["acc_per_pos"] == [pytest.approx(2 / 3, abs=1e-4), 1.0, pytest.approx(2 / 3, abs=1e-4), 1.0]


def test_served_walk_steps_through_the_anchors_served_decoding_reaches():
    """Served decoding drafts from anchor t, accepts a_t and drafts next from t + a_t + 1: long accepts skip anchors,
    so tokens per step is not the mean acceptance length over anchors."""
    accept = [5] * 12 + [0] * 6 + [2] * 6  # every anchor of one answer: an easy stretch, a hard one, a middling one
    anchors = torch.arange(10, 10 + len(accept))[None]
    steps, tokens = served_walk(torch.tensor([accept]), anchors, torch.ones_like(anchors, dtype=torch.bool))
    assert (steps, tokens) == (2 + 6 + 2, len(accept))  # 24 tokens: tau 2.4, while the anchor mean is 1 + 3 = 4
    # A second answer further on starts its own walk; padding anchors (not valid) are skipped.
    second = torch.tensor([[3, 0, 9, 9, 0, 0]]), torch.tensor([[4, 5, 40, 41, 0, 0]])
    steps, tokens = served_walk(*second, torch.tensor([[True, True, True, True, False, False]]))
    assert (steps, tokens) == (2, 4 + 10)  # anchor 4 accepts 3 (skips 5), anchor 40 accepts 9 (skips 41)


def test_chunked_logits_equal_unchunked_with_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight, labels, teacher = torch.randn(50, 16), torch.randint(0, 50, (37,)), torch.randn(37, 16)
    results = []
    for chunk in (37, 5):
        hidden.grad = None
        nll, pred, kd = row_stats(hidden, weight, labels, teacher, chunk)
        (nll.sum() + 0.5 * kd.sum()).backward()
        results.append((nll.detach(), pred, kd.detach(), hidden.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    logits = hidden.detach() @ weight.t()
    torch.testing.assert_close(results[0][0], torch.nn.functional.cross_entropy(logits, labels, reduction="none"))


def test_block_loss_is_the_weighted_cross_entropy():
    torch.manual_seed(0)
    b, n, bs, h, v = 2, 3, 4, 8, 20
    hidden, weight = torch.randn(b, n * bs, h), torch.randn(v, h)
    labels = torch.randint(0, v, (b, n, bs))
    counted = torch.rand(b, n, bs) > 0.3
    counted[..., 0] = False
    loss, _, _ = block_loss(hidden, weight, labels, counted, kind="ce", gamma=2.0, alpha=0.5, kd_weight=0.0)
    ce = torch.nn.functional.cross_entropy((hidden @ weight.t()).view(-1, v), labels.flatten(), reduction="none")
    w = position_weights(bs, 2.0) * counted
    torch.testing.assert_close(loss, (ce.view(b, n, bs) * w).sum())
    torch.testing.assert_close(normalizer(counted, "ce", 2.0), w.sum())


def test_anchors_lie_on_loss_mask_positions_and_are_redrawn_each_epoch():
    loss_mask = torch.zeros(200, dtype=torch.uint8)
    loss_mask[50:90] = 1
    loss_mask[150:200] = 1
    seen = []
    for epoch in range(3):
        anchors, valid = sample_anchors(loss_mask, 16, anchor_generator(seed=1, epoch=epoch, index=4))
        assert valid.all() and (anchors[1:] > anchors[:-1]).all()
        assert loss_mask[anchors].all() and (anchors <= 198).all()
        seen.append(anchors.tolist())
    assert seen[0] != seen[1]
    again, _ = sample_anchors(loss_mask, 16, anchor_generator(seed=1, epoch=0, index=4))
    assert again.tolist() == seen[0]
    few = torch.zeros(30, dtype=torch.uint8)
    few[[3, 10, 29]] = 1  # the last position has nothing after it to predict
    anchors, valid = sample_anchors(few, 5, anchor_generator(0, 0, 0))
    assert anchors[valid].tolist() == [3, 10] and valid.tolist() == [True, True, False, False, False]
    # The held-out pass takes every anchor of the answers' beginnings, in order.
    anchors, valid = first_anchors(loss_mask, 45)
    assert valid.all() and anchors.tolist() == list(range(50, 90)) + list(range(150, 155))
    anchors, valid = first_anchors(few, 5)
    assert anchors[valid].tolist() == [3, 10] and valid.tolist() == [True, True, False, False, False]


def test_global_batch_is_the_same_however_it_is_split():
    one = BatchPlan(num_records=40, world_size=1, micro_batch_size=4, grad_accum=2, seed=3)
    two = BatchPlan(num_records=40, world_size=2, micro_batch_size=2, grad_accum=2, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == 5
    for step in range(5):
        whole = {i for mb in one.micro_batches(1, step, 0)[:2] for i, _ in mb}
        split = {i for r in range(2) for mb in two.micro_batches(1, step, r)[:2] for i, _ in mb}
        assert whole == split and len(whole) == 8
    resumed = two.micro_batches(1, 3, 1)
    assert resumed == two.micro_batches(1, 0, 1)[3 * 2:]


def padded_positions(plan: BatchPlan, sizes: list[int], epoch: int) -> int:
    """What the epoch's micro-batches pad to: each one's rows x its longest row."""
    return sum(len(mb) * max(sizes[i] for i, _ in mb) for r in range(plan.world_size)
               for mb in plan.micro_batches(epoch, 0, r))


def test_grouped_batches_take_the_same_records_once_with_less_padding():
    g = torch.Generator().manual_seed(0)
    sizes = (torch.rand(203, generator=g) ** 3 * 2000 + 20).long().tolist()  # ShareGPT-like: most short
    kw = {"num_records": 203, "world_size": 2, "micro_batch_size": 4, "grad_accum": 2, "seed": 5}
    plain, grouped = BatchPlan(**kw), BatchPlan(**kw, group_windows=4, sizes=sizes)
    for epoch in (0, 1):
        order, base = grouped.order(epoch).tolist(), plain.order(epoch).tolist()
        assert order == grouped.order(epoch).tolist()  # a function of (seed, epoch)
        used = grouped.steps_per_epoch * grouped.global_batch  # 12 steps of 16: the same 192 records, the rest after
        assert sorted(order[:used]) == sorted(base[:used]) and order[used:] == base[used:]
        window = 4 * grouped.global_batch  # records move only within their window of 4 global batches
        for start in range(0, used, window):
            assert sorted(order[start:start + window]) == sorted(base[start:start + window])
        # a global batch is a run of the window sorted by size: its rows are alike, whichever rank reads them
        for step in range(grouped.steps_per_epoch):
            rows = order[step * 16:(step + 1) * 16]
            assert [sizes[i] for i in rows] == sorted((sizes[i] for i in rows), reverse=True)
        assert padded_positions(grouped, sizes, epoch) < 0.6 * padded_positions(plain, sizes, epoch)
    assert grouped.order(0).tolist() != grouped.order(1).tolist()
    assert grouped.micro_batches(1, 5, 1) == grouped.micro_batches(1, 0, 1)[5 * 2:]  # resume mid-epoch


def test_dump_dirs_with_other_layers_or_conventions_are_refused(tmp_path):
    from dflashkit.dump.format import FORMAT_VERSION, save_dump_record, write_meta
    from dflashkit.model.layers import CONVENTION

    for name, layers, convention in (("a", [1, 3], CONVENTION), ("b", [1, 4], CONVENTION), ("c", [1, 3], "hf index")):
        directory = tmp_path / name
        directory.mkdir()
        write_meta(directory, {
            "format": FORMAT_VERSION, "model": "m", "backend": "hf", "dtype": "float32", "hidden_size": 4,
            "num_hidden_layers": 6, "target_layer_ids": layers, "layer_id_convention": convention,
            "final_state": "pre_norm", "max_seq_len": 16, "length_policy": "skip", "chat_template_sha256": "0"})
        save_dump_record(directory, {"input_ids": torch.arange(5), "hidden_states": torch.zeros(5, 4),
                                     "aux_hidden_states": torch.zeros(5, 8), "conversation_id": "c",
                                     "loss_mask": torch.tensor([0, 0, 1, 1, 1], dtype=torch.uint8)})
    meta, paths = read_dump_dirs([str(tmp_path / "a")])
    assert meta["target_layer_ids"] == [1, 3] and len(paths) == 1
    with pytest.raises(ValueError, match="target_layer_ids"):
        read_dump_dirs([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(ValueError, match="layer ids follow 'hf index'"):
        read_dump_dirs([str(tmp_path / "c")])
