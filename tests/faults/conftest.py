"""Fault-injection suite: SIGKILL at seeded random points, full disks. Every test here is marked `faults`.

The CI run is short (DFLASHKIT_FAULT_ROUNDS, default 1 kill round per stage); the long run documented in
docs/RELIABILITY.md is `DFLASHKIT_FAULT_ROUNDS=20 DFLASHKIT_FAULT_SEED=0 pytest tests/faults`. With
DFLASHKIT_FAULT_REPORT=FILE each test appends one JSON line of figures (faults injected, records checked, lost,
duplicated) to FILE.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: fault injection (kills, full disks); DFLASHKIT_FAULT_ROUNDS sets size")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/faults/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def small_disk(tmp_path):
    """A size-limited tmpfs (root only); yields a function mounting one of the given size at a fresh dir."""
    mounts = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {res.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
