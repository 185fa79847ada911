"""The kill judgement itself, on a toy stage (a few lines of Python, no model): it writes RECORDS record files, then
its done-marker, then lingers the way an interpreter's teardown does. A kill in that linger interrupted nothing and is
not a fault; a marker beside missing output fails the test that sees it."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from faultlib import REDRAWS, Stage, inject_kill, interrupted, kill_at

RECORDS = 3
TOY = """import pathlib, sys, time
out = pathlib.Path(sys.argv[1]); out.mkdir(exist_ok=True)
for i in range({n}):
    (out / f"r{{i}}.rec").write_text("x")
(out / "done").write_text("{n}")
time.sleep(float(sys.argv[2]))  # still alive after its marker: teardown
"""


def toy(out: Path, linger: float) -> list[str]:
    return [sys.executable, "-c", TOY.format(n=RECORDS), str(out), str(linger)]


def whole(out: Path) -> None:
    assert sorted(p.name for p in out.glob("*.rec")) == [f"r{i}.rec" for i in range(RECORDS)]
    assert (out / "done").read_text() == str(RECORDS)


STAGE = Stage(progress=lambda out: len(list(out.glob("*.rec"))), done=lambda out: (out / "done").exists(),
              complete=whole)


def test_a_kill_after_the_marker_with_the_whole_output_is_no_fault(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    status = kill_at(toy(out, 30), {}, lambda: STAGE.done(out), 0, log)
    assert status is None, "the kill landed in the linger"
    assert not interrupted(STAGE, out, status, log)


def test_a_marker_beside_missing_output_fails(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    status = kill_at(toy(out, 30), {}, lambda: STAGE.done(out), 0, log)
    (out / "r1.rec").unlink()
    with pytest.raises(AssertionError):
        interrupted(STAGE, out, status, log)


def test_a_stage_that_always_finishes_first_is_refused(tmp_path):
    never = (RECORDS + 1, RECORDS + 1)  # a kill point past the last record: the toy always exits first
    with pytest.raises(AssertionError, match=f"{REDRAWS} kill points in a row"):
        inject_kill(toy(tmp_path / "out", 0), {}, STAGE, tmp_path / "out", random.Random(0), never, 0, tmp_path / "log")
