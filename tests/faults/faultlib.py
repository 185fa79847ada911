"""Shared by the fault tests: the run size (DFLASHKIT_FAULT_ROUNDS, DFLASHKIT_FAULT_SEED), the figures report, and
the judgement of a kill: did it interrupt the stage (a fault injected), or had the stage already finished?"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROUNDS = int(os.environ.get("DFLASHKIT_FAULT_ROUNDS", "1"))
SEED = int(os.environ.get("DFLASHKIT_FAULT_SEED", "0"))
# A kill point the stage outran (it finished, or was only tearing down) is drawn again, at most this many times in
# a row: that injected nothing, and every test must inject a fault. 1 in 8 kill points is late on a quiet 2-core box.
REDRAWS = 8


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


@dataclass(frozen=True)
class Stage:
    """What a kill test watches in a stage's output dir."""
    progress: Callable[[Path], int]  # records (a trainer: steps) on disk so far
    done: Callable[[Path], bool]  # its done-marker is there (a trainer: the final checkpoint)
    complete: Callable[[Path], None]  # asserts the whole output: every record there and valid, counts reconciled


def kill_at(cmd: list[str], env: dict, reached: Callable[[], bool], delay: float, log: Path,
            victim: Callable[[subprocess.Popen], int | None] | None = None, bound_s: float | None = None) -> int | None:
    """Run `cmd`, wait until `reached()` (or its exit), `delay` seconds more, then SIGKILL it, or the process
    `victim(proc)` names (e.g. one rank under torchrun; None: it is gone). Returns None when the kill was sent, else
    the exit status it reached first. After a kill `cmd` must end within `bound_s` seconds. stderr goes to `log` (a
    pipe nobody reads could fill up and stall the process)."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    while not reached() and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(delay)
    pid = (victim(proc) if victim else proc.pid) if proc.poll() is None else None
    if pid is None:
        return proc.wait()  # it finished, or is finishing, on its own
    os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(bound_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{cmd[:4]} still running {bound_s} s after the kill") from None
    return None


def interrupted(stage: Stage, out: Path, status: int | None, log: Path) -> bool:
    """The judgement of one kill. A stage writes its done-marker (a trainer: its final checkpoint) last, and the
    process stays alive a while after it, tearing down the interpreter: a SIGKILL then interrupts nothing. So a kill
    with no marker is a fault injected (True); a marker is allowed only with the stage's whole output, which
    `stage.complete` asserts, and is then no fault (False). A stage that exited before the kill must have exited 0,
    with its marker and whole output."""
    if status is not None:
        assert status == 0, f"exit {status} before the kill:\n{log.read_text(errors='replace')[-3000:]}"
        assert stage.done(out), "exited 0 without its done-marker"
    if not stage.done(out):
        return True
    stage.complete(out)
    return False


def inject_kill(cmd: list[str], env: dict, stage: Stage, out: Path, rng: random.Random, targets: tuple[int, int],
                max_delay: float, log: Path, **kill) -> int:
    """One fault: kill `cmd` once `stage.progress(out)` reaches a target drawn from `targets` (0: during startup),
    a random delay up to `max_delay` later, and judge it. A kill point the stage outran (its output checked whole)
    injected nothing: `out` is removed and a point drawn again, at most REDRAWS times in a row, so that every call
    injects a fault. Returns how many points were drawn again. `kill`: kill_at's `victim` and `bound_s`."""
    for late in range(REDRAWS):
        target, delay = rng.randint(*targets), rng.uniform(0, max_delay)
        status = kill_at(cmd, env, lambda: stage.progress(out) >= target, delay, log, **kill)  # noqa: B023
        if interrupted(stage, out, status, log):
            return late
        shutil.rmtree(out)
    raise AssertionError(f"{REDRAWS} kill points in a row landed after the stage had finished: nothing injected")
