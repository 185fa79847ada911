"""Step metrics to stdout (one log line), OUTPUT/metrics.jsonl and TensorBoard (when the package is installed);
held-out scores (data.heldout_records) to OUTPUT/heldout.jsonl, stdout and TensorBoard's heldout/ group.

After a resume, steps between the checkpoint and the kill are logged again; readers keep the last row per step.
"""
from __future__ import annotations

import logging
from pathlib import Path

from dflashkit.io import JsonlAppender

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, output_dir: Path, tensorboard: bool):
        self.jsonl = JsonlAppender(output_dir / "metrics.jsonl")
        self.heldout_path, self.heldout = output_dir / "heldout.jsonl", None  # opened at the first held-out score
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to stdout and metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        self.jsonl.write(row)
        log.info("step %d | loss %.4f | acc %.3f | anchor-mean tau %.2f | lr %.2e | grad %.2f | %.0f tok/s | "
                 "mem %.1f GB", row["step"], row["loss"], row["acc"], row["tau_anchor_mean"], row["lr"],
                 row["grad_norm"], row["tokens_per_s"], row["peak_mem_gb"])
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, row["step"])
            for k, value in enumerate(row["acc_per_pos"], start=1):
                self.tb.add_scalar(f"acc_per_pos/{k}", value, row["step"])

    def write_heldout(self, row: dict) -> None:
        if self.heldout is None:
            self.heldout = JsonlAppender(self.heldout_path)
        self.heldout.write(row)
        log.info("held-out at step %d | loss %.4f | acc %.3f | served tau %.2f | anchor-mean tau %.2f", row["step"],
                 row["loss"], row["acc"], row["tau"], row["tau_anchor_mean"])
        if self.tb is not None:
            for key in ("loss", "acc", "tau", "tau_anchor_mean"):
                self.tb.add_scalar(f"heldout/{key}", row[key], row["step"])

    def close(self) -> None:
        self.jsonl.close()
        if self.heldout is not None:
            self.heldout.close()
        if self.tb is not None:
            self.tb.close()
