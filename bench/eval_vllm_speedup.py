"""Wall-clock speedup of a DFlash draft under vLLM against plain decoding and prompt-lookup (ngram) speculation.

    python bench/eval_vllm_speedup.py --target MODEL --draft RUN/export/draft --prompts mtbench.jsonl --limit 20 \
        --max-tokens 256 [--ngram 15] [--extra-args "--dtype float32 --enforce-eager --distributed-executor-backend uni"]

One server per configuration, all running at once on the same machine; the same token-id prompts at T=0, one
request at a time: each prompt goes to every configuration in turn (the order rotates from prompt to prompt), so a
change in the machine's load hits all configurations alike and the ratios stay fair on a shared machine. Prints
tokens/s, the speedup over plain decoding, tau from vLLM's counters, and how many outputs equal plain decoding's.
Ratios come from one run; absolute numbers mean something only on the GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from dflashkit.cli import exit_on_sigterm
from dflashkit.eval.prompts import load_prompts
from dflashkit.eval.run import summarize_vllm
from dflashkit.eval.vllm_metrics import VllmClient
from dflashkit.serve import glue_value, running_server, split_extra_args


def run_interleaved(configs: list[tuple[str, dict | None]], args, prompts, log_dir: Path) -> list[dict]:
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, spec in configs:
            extra = split_extra_args(args.extra_args) + (["--speculative-config", json.dumps(spec)] if spec else [])
            server = stack.enter_context(running_server("vllm", args.target, "bench", log_dir / f"{name}.log",
                                                        extra_args=extra, timeout=args.startup_timeout))
            clients[name] = VllmClient(server.url, server.api_key, server.model)
            clients[name].complete(prompts[0].prompt_ids, 8)  # warm-up
        seconds = {name: 0.0 for name, _ in configs}
        outputs = {name: [] for name, _ in configs}
        per_prompt = {name: {} for name, spec in configs if spec}  # prompt id -> (output, counter delta)
        for i, p in enumerate(prompts):
            for name, spec in configs[i % len(configs):] + configs[: i % len(configs)]:
                before = clients[name].counters() if spec else None
                start = time.perf_counter()
                outputs[name].append(clients[name].complete(p.prompt_ids, args.max_tokens))
                seconds[name] += time.perf_counter() - start
                if spec:  # counters are read outside the timed request
                    per_prompt[name][p.id] = (outputs[name][-1], clients[name].counters() - before)
            print(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(f"{n} {seconds[n]:.0f} s" for n, _ in configs),
                  file=sys.stderr, flush=True)
    spec_stats = {name: summarize_vllm(per_prompt[name], prompts) for name in per_prompt}
    results = []
    for name, _ in configs:
        tokens = sum(map(len, outputs[name]))
        results.append({"name": name, "tokens": tokens, "seconds": seconds[name],
                        "tokens_per_s": tokens / seconds[name], "outputs": outputs[name],
                        "tau": spec_stats[name]["overall"]["tau"] if name in spec_stats else 1.0,
                        "tau_by_category": {c: v["tau"] for c, v in spec_stats[name]["by_category"].items()}
                        if name in spec_stats else {}})
    return results


def main() -> int:
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # a killed run stops its servers
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True, help="exported draft folder")
    p.add_argument("--prompts", required=True, help="prompt records (.jsonl), first turns")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--per-category", type=int, default=None, help="at most this many prompts per category")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ngram", type=int, default=15, help="ngram speculative tokens (0: skip ngram)")
    p.add_argument("--extra-args", default="", help="vLLM server flags for every configuration")
    p.add_argument("--startup-timeout", type=float, default=900)
    args = p.parse_args(glue_value(sys.argv[1:], "--extra-args"))  # `--extra-args --enforce-eager` too
    block = json.loads((Path(args.draft) / "config.json").read_text())["block_size"]
    prompts = load_prompts(args.prompts, AutoTokenizer.from_pretrained(args.target), limit=args.limit,
                           per_category=args.per_category)
    configs = [("plain", None)]
    if args.ngram:
        configs.append((f"ngram-{args.ngram}", {"method": "ngram", "num_speculative_tokens": args.ngram,
                                                 "prompt_lookup_max": 4, "prompt_lookup_min": 2}))
    configs.append((f"dflash-{block - 1}", {"method": "dflash", "model": str(Path(args.draft).resolve()),
                                            "num_speculative_tokens": block - 1}))
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        results = run_interleaved(configs, args, prompts, Path(tmp))
    plain = results[0]
    print(f"{len(prompts)} prompts, max_tokens {args.max_tokens}, T=0, one request at a time, configurations interleaved")
    print(f"{'config':<12} {'tokens':>7} {'tok/s':>8} {'speedup':>8} {'tau':>6} {'same as plain':>14}")
    for r in results:
        same = sum(a == b for a, b in zip(r["outputs"], plain["outputs"]))
        print(f"{r['name']:<12} {r['tokens']:>7} {r['tokens_per_s']:>8.2f} "
              f"{r['tokens_per_s'] / plain['tokens_per_s']:>7.2f}x {r['tau']:>6.2f} {same:>9}/{len(prompts)}")
    for r in results:
        if r["tau_by_category"]:
            print(f"tau by category, {r['name']}: " + ", ".join(f"{c} {t:.2f}" for c, t in r["tau_by_category"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
