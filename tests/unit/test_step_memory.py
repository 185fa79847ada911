"""The step's memory, counted as bench/step_memory.py counts it (fake tensors, every storage while it is alive)."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def step_memory():
    spec = importlib.util.spec_from_file_location("step_memory_bench", REPO / "bench" / "step_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
