"""One set of acceptance figures from several `dflashkit eval` reports over disjoint prompt slices (bench/quality_run.sh
runs one eval per GPU). Each step's accepted count is recovered from the histograms, so the merged tau and
per-position acceptance are those of one eval over all the prompts. "overall" covers the MT-Bench categories only:
the held-out training prompts (category "heldout") are another distribution and stay a category of their own.

    python bench/merge_eval_reports.py OUT.json REPORT.json [REPORT.json ...]
"""
from __future__ import annotations

import json
import sys

from dflashkit.eval.prompts import HELDOUT_CATEGORY
from dflashkit.eval.spec import acceptance_stats


def merge(reports: list[dict]) -> dict:
    num_drafted = reports[0]["config"]["num_drafted"]
    steps: dict[str, list[int]] = {}
    for report in reports:
        for category, stats in report["ours"]["by_category"].items():
            steps.setdefault(category, []).extend(a for a, n in enumerate(stats["histogram"]) for _ in range(n))
    mtbench = [a for category, acc in steps.items() if category != HELDOUT_CATEGORY for a in acc]
    return {"reports": len(reports), "num_drafted": num_drafted, "overall": acceptance_stats(mtbench, num_drafted),
            "by_category": {c: acceptance_stats(acc, num_drafted) for c, acc in sorted(steps.items())}}


def main(out: str, *paths: str) -> None:
    reports = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            reports.append(json.load(f))
    merged = merge(reports)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1)
    print(f"MT-Bench tau {merged['overall']['tau']:.3f} over {merged['overall']['steps']} steps; " + ", ".join(
        f"{c} {s['tau']:.2f}" for c, s in merged["by_category"].items()))


if __name__ == "__main__":
    main(*sys.argv[1:])
