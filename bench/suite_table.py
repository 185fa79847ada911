"""Markdown tables (one per preset) from the JSON rows of bench/gpu_suite.sh's log; with a peer's rows (bench/peers/)
or SmolLM2 recipe runs (bench/smollm2_step.py) in it, their comparison tables and BENCHMARKS.md's figures too.

    python bench/suite_table.py OUT/gpu_suite.log
"""
from __future__ import annotations

import json
import sys

HEADER = ("| card | mode | options | micro-batch | step time | tokens/s per GPU | tokens/s total | MFU (989) | "
          "MFU (measured peak) | peak memory | command |\n|---|---|---|---|---|---|---|---|---|---|---|")


def options(r: dict) -> str:
    parts = [r["attention"], r["precision"]]
    if "step" in r:  # the recipe's `step` (fast: compiled, lm_head gradient in forward)
        parts.append(f"{r['step']} step")
    else:  # rows logged before the `step` key
        parts += ["compile"] * r["compile"] + ["lm_head grad in forward"] * r.get("lm_head_grad_in_forward", False)
    parts += ["act. ckpt"] * r["activation_checkpointing"]
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


PEER_HEADER = ("| preset | micro-batch | step | step time | peak memory | MFU (measured peak) | speed vs peer | "
               "memory vs peer |\n|---|---|---|---|---|---|---|---|")
RECIPE_HEADER = ("| run | tokens/s after warm-up | slowest / fastest interval | peak memory | vs before |\n"
                 "|---|---|---|---|---|")


def peer_tables(ours: list[dict], peers: list[dict], recipe: list[dict]) -> None:
    """Ours (each step kind) against the peer's step on the same preset and micro-batch: speed = peer step time /
    ours, memory = ours / peer's; the SmolLM2 recipe runs against the one named "before"; the figures."""
    figures = {}
    for peer in peers:
        if "step_time_s" not in peer:
            print(f"\n{peer['row']}: {peer.get('error') or peer.get('stderr_tail') or peer}")
            continue
        print(f"\n{peer['preset']}, ours vs {peer['peer']} {peer['version']} (same run, same GPU)\n\n{PEER_HEADER}")
        mine = [r for r in ours if r.get("preset") == peer["preset"] and r.get("micro_batch") == peer["micro_batch"]
                and "step_time_s" in r]
        for r in mine + [peer]:
            speed = peer["step_time_s"] / r["step_time_s"]
            memory = r["peak_mem_gib"] / peer["peak_mem_gib"] if peer["peak_mem_gib"] else None  # None: the CPU
            name = f"{peer['peer']} (bf16 weights, fp32 masters)" if r is peer else f"ours, {r['step']}"
            mfu = f"{r['mfu_measured_peak']:.1%}" if r["mfu_measured_peak"] else ""
            print(f"| {r['preset']} | {r['micro_batch']} | {name} | {r['step_time_s'] * 1e3:.0f} ms | "
                  f"{r['peak_mem_gib'] or 0:.1f} GiB | {mfu} | {speed:.2f}x | {memory or 0:.2f} |")
            if r is not peer and r["step"] == "fast":
                figures[f"default_step_vs_{peer['peer']}"] = round(speed, 2)
                figures[f"default_step_memory_vs_{peer['peer']}"] = round(memory, 2) if memory else None
    done = {r["row"]: r for r in recipe if r.get("tokens_per_s")}
    if recipe:
        print(f"\nSmolLM2 quality recipe, one GPU, end to end (bench/smollm2_step.py)\n\n{RECIPE_HEADER}")
        before = done.get("smollm2-before")
        for r in recipe:
            if r["row"] not in done:
                print(f"| {r['row']} | {r.get('skipped') or r.get('failed') or r.get('timeout_s')} | | | |")
                continue
            gain = r["tokens_per_s"] / before["tokens_per_s"] if before else None
            print(f"| {r['row']} | {r['tokens_per_s']:,} | {r['slowest_over_fastest']:.2f} | "
                  f"{r['peak_mem_gb']:.1f} GB | {f'{gain:.2f}x' if gain else ''} |")
            if r["row"] == "smollm2-after" and gain:
                figures["smollm2_step_tokens_per_s_gain"] = round(gain, 2)
    if figures:
        print("\nFigures:\n" + "\n".join(f"{k}: {v}" for k, v in figures.items()))


def main(path: str) -> None:
    by_preset: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(text) for text in f if text.startswith("{")]
    peers = [r for r in rows if r["row"].startswith("specforge")]
    recipe = [r for r in rows if r["row"].startswith("smollm2-")]
    rows = [r for r in rows if r not in peers and r not in recipe]
    for r in rows:
        by_preset.setdefault(r.get("preset") or r["row"].split("-")[0], []).append(r)
    for preset, rows in by_preset.items():
        print(f"\n{preset}\n\n{HEADER}")
        for r in rows:
            print(line(r))
    peer_tables(rows, peers, recipe)


if __name__ == "__main__":
    main(sys.argv[1])
