"""The table and the plot of a bench/curve_run.sh run: for every run, its data size, steps, training time, tokens/s,
held-out served tau (the trainer's heldout.jsonl at each checkpoint) and MT-Bench served tau (our eval, merged).

    mkdir R && tar -xJf results.tar.xz -C R && python bench/curve_report.py R --png docs/curve_smollm2.png

R holds the script's logs/ and runs/. Prints a Markdown table and writes one JSON line per run to R/curve.jsonl; with
--png, plots tau against training conversations for the DFlash curve (and DSpark beside it). Several R (runs of one
recipe on the same held-out set, e.g. a later run's larger size) give one table and one curve. Needs matplotlib for
the plot only (not a dflashkit dependency).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def timings(path: Path) -> dict[str, tuple[int, int]]:
    """run name -> (train start, train end) in epoch seconds, from logs/timings.txt."""
    start, spans = {}, {}
    for line in path.read_text().splitlines() if path.exists() else []:
        t, _, what = line.partition(" ")
        m = re.match(r"train-(start|end) (\S+)", what)
        if m and m.group(1) == "start":
            start[m.group(2)] = int(t)
        elif m and m.group(2) in start:
            spans[m.group(2)] = (start[m.group(2)], int(t))
    return spans


def sizes(path: Path) -> dict[str, int]:
    """size label -> records, from logs/curve-data.txt (`.../train-N.jsonl: R records`)."""
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        m = re.search(r"train-(\d+)\.jsonl: (\d+) records", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def run_row(run: Path, spans: dict, records: dict) -> dict:
    metrics = read_jsonl(run / "train" / "metrics.jsonl")
    heldout = read_jsonl(run / "train" / "heldout.jsonl")
    label = run.name.rsplit("-", 1)[-1]
    row = {"run": run.name, "kind": run.name.split("-", 1)[0], "records": records.get(label),
           "steps": metrics[-1]["step"] if metrics else None}
    if run.name in spans:
        row["train_min"] = round((spans[run.name][1] - spans[run.name][0]) / 60, 1)
    steady = [m for m in metrics[2:] if "tokens_per_s" in m]  # the first logged intervals hold compilation
    if steady:
        row["tokens_per_s"] = round(statistics.median(m["tokens_per_s"] for m in steady))
        row["step_s"] = round(statistics.median(m["step_time_s"] for m in steady), 3)
    if heldout:
        row["heldout_tau"] = round(heldout[-1]["tau"], 3)
        row["heldout_tau_by_step"] = {h["step"]: round(h["tau"], 3) for h in heldout}
    merged = run / "eval" / "merged.json"
    if merged.exists():
        overall = json.loads(merged.read_text())["overall"]
        row["mtbench_tau"], row["mtbench_steps"] = round(overall["tau"], 3), overall["steps"]
    return row


def table(rows: list[dict]) -> str:
    head = ("| run | records | steps | training (min, card shared) | tokens/s (median) | held-out served tau "
            "(by checkpoint) | MT-Bench served tau (80) |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        by_step = ", ".join(f"{v}" for v in r.get("heldout_tau_by_step", {}).values())
        lines.append(f"| {r['run']} | {r['records'] or ''} | {r['steps'] or ''} | {r.get('train_min', '')} | "
                     f"{r.get('tokens_per_s', '')} | {r.get('heldout_tau', '')} ({by_step}) | "
                     f"{r.get('mtbench_tau', '')} |")
    return "\n".join(lines)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("dflash", "o"), ("dspark", "s")):
        runs = sorted((r for r in rows if r["kind"] == kind and r["records"]), key=lambda r: r["records"])
        for key, style in (("mtbench_tau", "-"), ("heldout_tau", "--")):
            pts = [(r["records"], r[key]) for r in runs if key in r]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker,
                        label=f"{kind}, {'MT-Bench (80)' if key == 'mtbench_tau' else 'held-out ShareGPT (256)'}")
    ax.set_xscale("log")
    ax.set_xlabel("training records (conversations, one epoch)")
    ax.set_ylabel("served tau (tokens per target step)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="the unpacked results.tar.xz (logs/, runs/)")
    p.add_argument("--png", type=Path)
    args = p.parse_args()
    rows = []
    for results in args.results:
        spans, records = timings(results / "logs" / "timings.txt"), sizes(results / "logs" / "curve-data.txt")
        mine = [run_row(run, spans, records) for run in sorted((results / "runs").iterdir()) if run.is_dir()]
        (results / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
        rows += mine
    rows.sort(key=lambda r: (r["kind"] != "dflash", r["records"] or 0, r["run"]))
    print(table(rows))
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
