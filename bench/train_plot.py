"""Plot a training run's metrics.jsonl: loss, mean top-1 accuracy and anchor-mean tau per step, and accuracy by slot.

    python bench/train_plot.py RUN/train/metrics.jsonl docs/training_smollm2.png --title "..."

Needs matplotlib (not a dflashkit dependency: `pip install matplotlib` where you plot).
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics")
    parser.add_argument("png")
    parser.add_argument("--title", default="")
    parser.add_argument("--smooth", type=int, default=5, help="moving average over this many logged rows")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    with open(args.metrics, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row  # after a resume the last row of a step wins
    steps = sorted(rows)

    def smooth(key):
        values = [rows[s][key] for s in steps]
        k = args.smooth
        return [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1])
                for i in range(len(values))]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, smooth("loss"))
    axes[0].set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    axes[1].plot(steps, smooth("acc"), label="top-1 accuracy (all slots)")
    axes[1].plot(steps, smooth("tau_anchor_mean"), label="tau, mean over anchors")
    axes[1].set(xlabel="step", title="accuracy and acceptance length")
    axes[1].legend()
    for frac in (0.1, 0.5, 1.0):
        s = steps[max(0, int(len(steps) * frac) - 1)]
        per_pos = rows[s]["acc_per_pos"]
        axes[2].plot(range(1, len(per_pos) + 1), per_pos, marker="o", label=f"step {s}")
    axes[2].set(xlabel="slot k in block", ylabel="top-1 accuracy", title="accuracy by slot")
    axes[2].legend()
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png} ({len(steps)} logged steps)")


if __name__ == "__main__":
    main()
