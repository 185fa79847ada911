"""The step's memory, counted as bench/step_memory.py counts it (fake tensors, every storage while it is alive):
an unpadded micro-batch's fused layers are not copied for the draft, the gradient-in-forward loss's backward holds
its fp32 products one chunk at a time, a padded one's are fused before they are padded, and none of it changes a
value beyond float rounding."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dflashkit.model.dspark import DSparkConfig
from dflashkit.train import data, loss
from tests.helpers.train import tiny_config
from tests.unit.test_train_perf import batch, trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def step_memory():
    spec = importlib.util.spec_from_file_location("step_memory_bench", REPO / "bench" / "step_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copied_features(batch: dict, key: str) -> torch.Tensor:
    """padded_features as it was: always a zero-padded copy."""
    b, t = batch["input_ids"].shape
    packed = batch[key]
    return packed.new_zeros(b * t, packed.shape[-1]).index_copy_(0, batch["token_index"], packed).view(b, t, -1)


def counted_bytes(step_memory, b: dict, run) -> int:
    """Bytes that `run(fake batch)` leaves alive beyond the batch itself."""
    with FakeTensorMode(allow_non_fake_inputs=True) as fake, step_memory.LiveBytes(["-"]) as live:
        fb = {k: fake.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        for v in fb.values():
            if isinstance(v, torch.Tensor):
                live.track(v, "batch")
        held = live.now
        out = run(fb)
        live.sweep()
        assert out is not None
        return live.now - held


def test_unpadded_features_are_the_batch_itself_padded_ones_a_copy(step_memory):
    cfg = tiny_config()
    width = cfg.num_fused_layers * cfg.hidden_size
    full, short = batch(cfg, lengths=(128, 128)), batch(cfg, lengths=(128, 100))  # padded_length: 128 both
    for b in (full, short):
        assert torch.equal(data.padded_features(b, "aux_hidden_states"), copied_features(b, "aux_hidden_states"))
    view = data.padded_features(full, "aux_hidden_states")
    assert view.untyped_storage().data_ptr() == full["aux_hidden_states"].untyped_storage().data_ptr()
    # Counted the bench's way: the copy was 2 x 128 x width fp32; the view is no new storage.
    padded = 2 * 128 * width * 4
    assert counted_bytes(step_memory, full, lambda fb: copied_features(fb, "aux_hidden_states")) == padded
    assert counted_bytes(step_memory, full, lambda fb: data.padded_features(fb, "aux_hidden_states")) == 0
    assert counted_bytes(step_memory, short, lambda fb: data.padded_features(fb, "aux_hidden_states")) == padded


def padded_context(batch: dict):
    """data.context_features as it was: the fused layers always zero-padded to [b, T, n*H] before the draft's fc."""
    return copied_features(batch, "aux_hidden_states"), None


def kind_trainer(kind: str):
    """(draft config, trainer) of the tiny test draft of `kind`."""
    cfg = tiny_config()
    if kind == "dflash":
        return cfg, trainer(cfg)
    cfg = DSparkConfig(**dataclasses.asdict(cfg), markov_rank=8)
    return cfg, trainer(cfg, model={"kind": "dspark", "markov_rank": 8})


def trained(kind: str, lengths: tuple, steps: int = 3):
    cfg, t = kind_trainer(kind)
    b = batch(cfg, lengths=lengths, label_width=t.label_width)
    losses = [t.read(t.step([b], lr=1e-2))["loss"] for _ in range(steps)]
    return losses, {k: v.detach().clone() for k, v in t.model.state_dict().items()}


@pytest.mark.parametrize("kind", ["dflash", "dspark"])
def test_packed_context_trains_as_the_padded_copy_did(monkeypatch, kind):
    """Unpadded: the same bitwise (a view, no index). Padded: the fc over the real rows only, padded after it, gives
    the padded copy's losses and weights to float rounding (the matmuls run over fewer rows)."""
    for lengths, exact in (((128, 128), True), ((128, 100, 37), False)):
        new = trained(kind, lengths)
        with monkeypatch.context() as m:
            m.setattr(data, "context_features", padded_context)
            old = trained(kind, lengths)
        (losses_new, state_new), (losses_old, state_old) = new, old
        if exact:
            assert losses_new == losses_old and all(torch.equal(state_new[k], state_old[k]) for k in state_new)
        else:
            assert losses_new == pytest.approx(losses_old, rel=1e-5)
            assert all(torch.allclose(state_new[k], state_old[k], rtol=1e-4, atol=1e-6) for k in state_new)


def test_a_padded_batch_is_never_saved_n_layers_wide():
    """What the step keeps for backward: the batch's own packed rows, never a padded [b * T, n*H] copy of them (at
    the SmolLM2 recipe's micro-batch of 32 the padded layout was ~6x the real rows, bench/host_step.py)."""
    cfg = tiny_config()
    width = cfg.num_fused_layers * cfg.hidden_size
    b = batch(cfg, lengths=(128, 100, 37))
    t = trainer(cfg)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _, _ = t._loss(t._on_device(b))
    loss.backward()
    wide = [x for x in saved if x.shape[-1] == width]
    assert wide, "the fc saves its input"
    assert all(x.untyped_storage().data_ptr() == b["aux_hidden_states"].untyped_storage().data_ptr() for x in wide)
    assert not any(x.numel() >= 3 * 128 * width for x in saved)


def unchunked_backward(ctx, d_nll, d_pred, d_kd=None):
    """_RowStatsGradInForward.backward as it was: every row's fp32 products at once."""
    g_nll, g_kd = ctx.saved_tensors
    grad = d_nll.unsqueeze(-1) * g_nll
    if g_kd is not None:
        grad = grad + d_kd.unsqueeze(-1) * g_kd
    return grad.to(ctx.hidden_dtype), None, None, None, None, None


def row_grad(rows: int, h: int, v: int, chunk: int, kd: bool) -> torch.Tensor:
    """bf16 hidden rows' gradient through row_stats' gradient-in-forward path (nll, and KD with `kd`)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, h, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, v, (rows,), generator=g)
    teacher = torch.randn(rows, h, generator=g).to(torch.bfloat16) if kd else None
    scale = torch.rand(rows, generator=g)
    out = loss.row_stats(hidden, weight, labels, teacher, chunk, grad_in_forward=True)
    total = (scale * out[0]).sum() + ((1 - scale) * out[2]).sum() if kd else (scale * out[0]).sum()
    total.backward()
    return hidden.grad


@pytest.mark.parametrize("kd", [False, True])
def test_the_gradient_in_forward_backward_gives_the_same_values_bitwise(monkeypatch, kd):
    chunked = row_grad(37, 16, 50, chunk=8, kd=kd)
    monkeypatch.setattr(loss._RowStatsGradInForward, "backward", staticmethod(unchunked_backward))
    whole = row_grad(37, 16, 50, chunk=8, kd=kd)
    assert chunked.dtype == torch.bfloat16 and torch.equal(chunked, whole)


def backward_peak(step_memory, rows: int, h: int, chunk: int) -> int:
    """Bytes above what is alive before the backward, at its peak, in bench/step_memory.py's count."""
    with FakeTensorMode(), step_memory.LiveBytes(["-"]) as live:
        hidden = torch.empty(rows, h, dtype=torch.bfloat16).requires_grad_()
        weight, labels = torch.empty(64, h, dtype=torch.bfloat16), torch.zeros(rows, dtype=torch.long)
        nll = loss.row_stats(hidden, weight, labels, None, chunk, grad_in_forward=True)[0]
        total = nll.sum()
        live.sweep()
        before = live.peak = live.now
        total.backward()
        return live.peak - before


def test_the_gradient_in_forward_backward_holds_one_chunk_of_fp32_products(step_memory, monkeypatch):
    rows, h, chunk = 400, 32, 64
    chunked = backward_peak(step_memory, rows, h, chunk)
    monkeypatch.setattr(loss._RowStatsGradInForward, "backward", staticmethod(unchunked_backward))
    whole = backward_peak(step_memory, rows, h, chunk)
    # An fp32 [rows, H] product before; now [chunk_rows, H], two at the peak (the next chunk's is made while the
    # last one's is still referenced).
    assert whole - chunked == (rows - 2 * chunk) * h * 4


def test_step_memory_runs_at_a_small_preset(step_memory, monkeypatch):
    """The bench itself: each part of the step is counted, and the batch held on the device is the difference
    --batch-on-host makes."""
    for obj, name, value in step_memory.patches():
        monkeypatch.setattr(obj, name, value)
    rows = {}
    for host in (False, True):
        args = argparse.Namespace(preset="smollm2", micro_batch=2, activation_checkpointing=True, batch_on_host=host,
                                  top=100, row_lengths=None)
        rows[host] = step_memory.measure(args, "fast")
    device, on_host = rows[False], rows[True]
    assert set(device["phases"]) == {"draft forward", "loss forward", "loss backward", "draft backward"}
    assert device["total_at_peak_gib"] == max(p["total_at_peak_gib"] for p in device["phases"].values())
    assert device["held_before_gib"] > on_host["held_before_gib"]
    assert any(r["tensor"].startswith("batch aux_hidden_states") for r in device["at_peak"])
