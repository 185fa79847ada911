"""bench/smollm2_step.py's reading of the trainer's log: recompilations counted by the logged step they follow."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def bench():
    spec = importlib.util.spec_from_file_location("smollm2_step", REPO / "bench" / "smollm2_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recompiles_are_counted_by_the_logged_step_before_them():
    # The two line shapes as they come: torch's TORCH_LOGS=recompiles record and the trainer's metrics line.
    log = "\n".join([
        "V1201 22:27:01.1 123 torch/_dynamo/guards.py:3361] [0/1] [__recompiles] Recompiling function forward in "
        "/repo/dflashkit/model/draft.py:88",
        "2026-12-01 22:27:09,895 INFO [rank 0] dflashkit.train.metrics: step 10 | loss 34.5813 | acc 0.038",
        "V1201 22:27:10.2 123 torch/_dynamo/guards.py:3361] [0/2] [__recompiles] Recompiling function forward in "
        "/repo/dflashkit/model/draft.py:88",
        "    triggered by the following guard failure(s):",
        "V1201 22:27:10.3 123 torch/_dynamo/guards.py:3361] [3/1] [__recompiles] Recompiling function chunk_loss",
        "2026-12-01 22:27:11,000 INFO [rank 0] dflashkit.train.metrics: step 20 | loss 33.1 | acc 0.041",
    ])
    assert bench().recompiles_after_step(log) == {0: 1, 10: 2}
