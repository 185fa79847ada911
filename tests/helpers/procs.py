"""Waiting on things and killing processes at a chosen moment: the loops the integration and fault tests share."""
from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, every: float = 0.2,
             proc: subprocess.Popen | None = None) -> T | None:
    """Poll `predicate` until it returns something true (returned), the timeout passes, or `proc` ends (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(every)
    return None


def wait_until(what: str, predicate: Callable[[], T], timeout: float = 420, every: float = 0.2,
               proc: subprocess.Popen | None = None) -> T:
    """`wait_for`, failing the test with what it waited for when it does not come."""
    value = wait_for(predicate, timeout, every, proc)
    if value:
        return value
    ended = proc is not None and proc.poll() is not None
    raise AssertionError(f"{'the process exited' if ended else f'timed out after {timeout:.0f}s'} waiting for {what}")


def kill_when(proc: subprocess.Popen, predicate: Callable[[], object], timeout: float, every: float = 0.02,
              sig: int = signal.SIGKILL) -> None:
    """Send `sig` to `proc` once `predicate` holds (or the timeout passes), and reap it."""
    wait_for(predicate, timeout, every, proc)
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait()
