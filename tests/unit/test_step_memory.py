"""The step's memory, counted as bench/step_memory.py counts it (fake tensors, every storage while it is alive):
an unpadded micro-batch's fused layers are not copied for the draft, and the step's values do not change."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dflashkit.train import data
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


def test_an_unpadded_batch_trains_the_same_bitwise(monkeypatch):
    cfg = tiny_config()
    full = batch(cfg, lengths=(128, 128))
    results = []
    for features in (copied_features, data.padded_features):
        monkeypatch.setattr(data, "padded_features", features)
        t = trainer(cfg)
        losses = [t.read(t.step([full], lr=1e-2))["loss"] for _ in range(3)]
        results.append((losses, {k: v.detach().clone() for k, v in t.model.state_dict().items()}))
    (losses_a, state_a), (losses_b, state_b) = results
    assert losses_a == losses_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_step_memory_runs_at_a_small_preset(step_memory, monkeypatch):
    """The bench itself: each part of the step is counted, and the batch held on the device is the difference
    --batch-on-host makes."""
    for obj, name, value in step_memory.patches():
        monkeypatch.setattr(obj, name, value)
    rows = {}
    for host in (False, True):
        args = argparse.Namespace(preset="smollm2", micro_batch=2, activation_checkpointing=True, batch_on_host=host,
                                  top=100)
        rows[host] = step_memory.measure(args, "fast")
    device, on_host = rows[False], rows[True]
    assert set(device["phases"]) == {"draft forward", "loss forward", "loss backward", "draft backward"}
    assert device["total_at_peak_gib"] == max(p["total_at_peak_gib"] for p in device["phases"].values())
    assert device["held_before_gib"] > on_host["held_before_gib"]
    assert any(r["tensor"].startswith("batch aux_hidden_states") for r in device["at_peak"])
