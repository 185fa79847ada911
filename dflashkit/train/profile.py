"""`profile.start` / `profile.steps`: torch.profiler over a few optimizer steps, to see where a step's time goes.

The loop labels its parts with torch.profiler.record_function (`train.next_batch`: the wait for the next
micro-batch; `train.step`; online, `online.target_forward`), so the table separates what the host spends launching
a part from what the GPU spends running it. Each rank writes output_dir/profile/rank{R}.json.gz (a Chrome trace:
open it in Perfetto) and rank{R}.txt (the ops and the labelled parts, by device time on CUDA, by host time on the
CPU). Outside the window a label costs next to nothing.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)
# The labelled parts (torch.profiler.record_function names), reported first in the table.
NEXT_BATCH, STEP, TARGET_FORWARD = "train.next_batch", "train.step", "online.target_forward"
LABELS = (NEXT_BATCH, STEP, TARGET_FORWARD)


class StepProfiler:
    """Profiles steps start .. start + steps - 1 (1-based, as logged); start 0: never."""

    def __init__(self, spec, out_dir: Path, rank: int, device: torch.device):
        self.first, self.last = spec.start, spec.start + spec.steps - 1
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self.cuda = device.type == "cuda"
        self.active, self.started, self.done = None, 0.0, 0

    def before(self, step: int) -> None:
        """Called before step `step` runs."""
        if self.first and step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.active = profile(activities=activities)
            self.active.__enter__()
            self.started = time.perf_counter()

    def after(self, step: int) -> None:
        """Called after step `step` ran: at the window's end, the trace and the table."""
        if self.active is not None:
            self.done = step - self.first + 1
            if step >= self.last:
                self.close()

    def close(self) -> None:
        """Waits for the GPU (the window's kernels belong to it), stops and writes; a run that ends inside the window
        (max_steps, an error) writes what it has."""
        if self.active is None:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.started
        prof, self.active = self.active, None
        prof.__exit__(None, None, None)
        try:
            self.write(prof, wall)
        except Exception as e:  # noqa: BLE001 - a diagnostic must not end a training run
            log.warning("profile: not written to %s: %s: %s", self.out_dir, type(e).__name__, e)

    def write(self, prof, wall: float) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}.json.gz"))
        ops = prof.key_averages()
        # The labelled parts first, per step: host time inside the label against the device time of what it launched
        # (a part whose host time exceeds its device time is bound by its launches, not by the GPU).
        steps = max(self.done, 1)
        lines = [f"steps {self.first}-{self.first + steps - 1}, rank {self.rank}: {wall / steps * 1e3:.1f} ms a step"]
        for op in ops:
            if op.key in LABELS:
                lines.append(f"{op.key}: {op.count / steps:g} a step, host {op.cpu_time_total / steps / 1e3:.1f} ms, "
                             f"device {op.device_time_total / steps / 1e3:.1f} ms a step")
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        lines.append(f"ops over the {steps} steps, by {sort}:")
        (self.out_dir / f"rank{self.rank}.txt").write_text(
            "\n".join(lines) + "\n" + ops.table(sort_by=sort, row_limit=60, max_name_column_width=70) + "\n")


def summary(out_dir: Path, rank: int = 0) -> list[str]:
    """The head of a written table: the window's ms a step and each labelled part's host vs device time."""
    table = out_dir / f"rank{rank}.txt"
    if not table.exists():  # the run's log says why it was not written
        return [f"{table}: not written"]
    lines = table.read_text().splitlines()
    return lines[:next(i for i, line in enumerate(lines) if line.startswith("ops over"))]
