"""Shared by the fault tests: the run size (DFLASHKIT_FAULT_ROUNDS, DFLASHKIT_FAULT_SEED) and the figures report."""
from __future__ import annotations

import json
import os

ROUNDS = int(os.environ.get("DFLASHKIT_FAULT_ROUNDS", "1"))
SEED = int(os.environ.get("DFLASHKIT_FAULT_SEED", "0"))


def rounds(stage: str) -> int:
    """Kill rounds for one stage: DFLASHKIT_FAULT_ROUNDS_<STAGE> (e.g. _DUMP, the slow one on a CPU), else ROUNDS."""
    return int(os.environ.get(f"DFLASHKIT_FAULT_ROUNDS_{stage.upper()}", ROUNDS))


def report(test: str, **figures) -> None:
    """One line of figures per test, for docs/RELIABILITY.md (only when DFLASHKIT_FAULT_REPORT is set)."""
    path = os.environ.get("DFLASHKIT_FAULT_REPORT")
    line = json.dumps({"test": test, "seed": SEED, **figures})
    print(line)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
