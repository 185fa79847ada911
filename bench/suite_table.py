"""Markdown tables (one per preset) from the JSON rows of bench/gpu_suite.sh's log.

    python bench/suite_table.py OUT/gpu_suite.log
"""
from __future__ import annotations

import json
import sys

HEADER = ("| card | mode | options | micro-batch | step time | tokens/s per GPU | tokens/s total | MFU (989) | "
          "MFU (measured peak) | peak memory | command |\n|---|---|---|---|---|---|---|---|---|---|---|")


def options(r: dict) -> str:
    parts = [r["attention"], r["precision"]]
    parts += ["compile"] * r["compile"] + ["act. ckpt"] * r["activation_checkpointing"]
    parts += ["lm_head grad in forward"] * r.get("lm_head_grad_in_forward", False)
    return ", ".join(parts)


def line(r: dict) -> str:
    if "step_time_s" not in r:  # OOM, timeout, failure or skipped
        status = "OOM" if r.get("oom") else next(k for k in ("timeout_s", "failed", "skipped") if k in r)
        return f"| | | {r['row']} | {r.get('micro_batch', '')} | {status} | | | | | | `{r.get('command', '')}` |"
    card = f"{r['gpus']} x {r['device'].replace('NVIDIA ', '')}"
    measured = (f"{r['mfu_measured_peak']:.1%} ({r['measured_peak_tflops']:.0f} TFLOP/s)"
                if r["measured_peak_tflops"] else "")
    return (f"| {card} | {r['mode']} | {options(r)} | {r['micro_batch']} | {r['step_time_s']:.3f} s | "
            f"{r['tokens_per_s_per_gpu']:,} | {r['tokens_per_s_total']:,} | {r['mfu']:.1%} | "
            f"{measured} | {r['peak_mem_gib']:.1f} GiB | "
            f"`{r['command']}` |")


def main(path: str) -> None:
    by_preset: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(text) for text in f if text.startswith("{")]
    for r in rows:
        by_preset.setdefault(r.get("preset") or r["row"].split("-")[0], []).append(r)
    for preset, rows in by_preset.items():
        print(f"\n{preset}\n\n{HEADER}")
        for r in rows:
            print(line(r))


if __name__ == "__main__":
    main(sys.argv[1])
