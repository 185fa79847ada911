"""Wall-clock speedup of a DFlash draft under vLLM against plain decoding and prompt-lookup (ngram) speculation.

    python bench/eval_vllm_speedup.py --target MODEL --draft RUN/export/draft --prompts mtbench.jsonl --limit 20 \
        --max-tokens 256 [--ngram 15] [--extra-args "--dtype float32 --enforce-eager --distributed-executor-backend uni"]

One server per configuration, started in turn on the same machine; the same token-id prompts one request at a time at
T=0 (after one warm-up request). Prints tokens/s, the speedup over plain decoding, tau from vLLM's counters, and how
many outputs equal plain decoding's. Ratios come from one run; absolute numbers mean something only on the GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from dflashkit.eval.prompts import load_prompts
from dflashkit.eval.vllm_metrics import VllmClient
from dflashkit.serve import running_server, split_extra_args


def measure(name: str, spec: dict | None, args, prompts, log_dir: Path) -> dict:
    extra = split_extra_args(args.extra_args) + (["--speculative-config", json.dumps(spec)] if spec else [])
    with running_server("vllm", args.target, "bench", log_dir / f"{name}.log", extra_args=extra,
                        timeout=args.startup_timeout) as server:
        client = VllmClient(server.url, server.api_key, server.model)
        client.complete(prompts[0].prompt_ids, 8)  # warm-up
        before = client.counters() if spec else None
        outputs, start = [], time.perf_counter()
        for p in prompts:
            outputs.append(client.complete(p.prompt_ids, args.max_tokens))
        elapsed = time.perf_counter() - start
        tau = (client.counters() - before).stats()["tau"] if spec else 1.0
    tokens = sum(map(len, outputs))
    print(f"{name}: {tokens} tokens in {elapsed:.1f} s", file=sys.stderr, flush=True)
    return {"name": name, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed, "tau": tau,
            "outputs": outputs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True, help="exported draft folder")
    p.add_argument("--prompts", required=True, help="prompt records (.jsonl), first turns")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ngram", type=int, default=15, help="ngram speculative tokens (0: skip ngram)")
    p.add_argument("--extra-args", default="", help="vLLM server flags for every configuration")
    p.add_argument("--startup-timeout", type=float, default=900)
    args = p.parse_args()
    block = json.loads((Path(args.draft) / "config.json").read_text())["block_size"]
    prompts = load_prompts(args.prompts, AutoTokenizer.from_pretrained(args.target), limit=args.limit)
    configs = [("plain", None)]
    if args.ngram:
        configs.append((f"ngram-{args.ngram}", {"method": "ngram", "num_speculative_tokens": args.ngram,
                                                 "prompt_lookup_max": 4, "prompt_lookup_min": 2}))
    configs.append((f"dflash-{block - 1}", {"method": "dflash", "model": str(Path(args.draft).resolve()),
                                            "num_speculative_tokens": block - 1}))
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        results = [measure(name, spec, args, prompts, Path(tmp)) for name, spec in configs]
    plain = results[0]
    print(f"{len(prompts)} prompts, max_tokens {args.max_tokens}, T=0, one request at a time")
    print(f"{'config':<12} {'tokens':>7} {'tok/s':>8} {'speedup':>8} {'tau':>6} {'same as plain':>14}")
    for r in results:
        same = sum(a == b for a, b in zip(r["outputs"], plain["outputs"]))
        print(f"{r['name']:<12} {r['tokens']:>7} {r['tokens_per_s']:>8.2f} "
              f"{r['tokens_per_s'] / plain['tokens_per_s']:>7.2f}x {r['tau']:>6.2f} {same:>9}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
