"""PNG plots of an eval report. matplotlib is optional: without it the report is written and the plots are skipped."""
from __future__ import annotations

import logging
from pathlib import Path

from dflashkit.io import iter_jsonl

log = logging.getLogger(__name__)


def training_curve(metrics_jsonl: str | Path) -> list[dict]:
    """The trainer's metrics.jsonl rows, the last row per step (a resumed run logs some steps twice)."""
    rows = {row["step"]: row for _, row in iter_jsonl(metrics_jsonl) if "step" in row}
    return [rows[s] for s in sorted(rows)]


def write_plots(report: dict, out_dir: str | Path, training_rows: list[dict] | None = None,
                heldout_rows: list[dict] | None = None) -> list[Path]:
    """`heldout_rows`: the trainer's heldout.jsonl (data.heldout_records), drawn as points over the training curve."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (the JSON report has every figure)")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, section in (("ours", report.get("ours")), ("vLLM", report.get("vllm"))):
        if section and section["overall"]["per_position"]:
            pp = section["overall"]["per_position"]
            ax.plot(range(1, len(pp) + 1), pp, marker="o", label=name)
    ax.set(xlabel="draft position k", ylabel="P(draft k accepted)", ylim=(0, 1.02),
           title="Per-position acceptance (T=0)")
    ax.legend()
    written.append(_save(fig, out_dir / "per_position_acceptance.png"))

    cats = sorted(report["ours"]["by_category"])
    fig, ax = plt.subplots(figsize=(max(6, len(cats) * 0.9), 4))
    width = 0.4
    for i, (name, section) in enumerate((("ours", report.get("ours")), ("vLLM", report.get("vllm")))):
        if section:
            taus = [section["by_category"].get(c, {}).get("tau") or 0 for c in cats]
            ax.bar([j + i * width for j in range(len(cats))], taus, width, label=name)
    ax.set_xticks([j + width / 2 for j in range(len(cats))], cats, rotation=30, ha="right")
    ax.set(ylabel="tau (tokens per target forward)", title="Acceptance length by category")
    ax.legend()
    written.append(_save(fig, out_dir / "tau_by_category.png"))

    if training_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in training_rows]
        ax.plot(steps, [r["loss"] for r in training_rows], color="tab:blue")
        ax.set(xlabel="step", ylabel="loss (log scale)", yscale="log", title="Training")
        ax.yaxis.label.set_color("tab:blue")
        held = heldout_rows or []
        if held:
            ax.plot([r["step"] for r in held], [r["loss"] for r in held], "o--", color="tab:blue", label="held-out")
            ax.legend(loc="upper center")
        if "tau_anchor_mean" in training_rows[0]:
            twin = ax.twinx()
            twin.plot(steps, [r["tau_anchor_mean"] for r in training_rows], color="tab:orange", alpha=0.7)
            twin.set_ylabel("tau: anchor mean (line), served, held-out (points)", color="tab:orange")
            if held:
                twin.plot([r["step"] for r in held], [r["tau"] for r in held], "s--", color="tab:orange")
        written.append(_save(fig, out_dir / "training_loss.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
