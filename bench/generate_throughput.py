#!/usr/bin/env python3
"""Generate-stage client overhead: our shard runner vs a plain async openai loop, on one server, side by side.

Both send the same single-turn prompts (MT-Bench turn 1) with the same concurrency, max_tokens and temperature 0, so
they ask the server for the same work; runs alternate (plain, ours, plain, ours, ...) so drift hits both alike.
Prints completion tokens/s of each run and the ratio ours/plain of the medians (goal: >= 0.97).

    python bench/generate_throughput.py --rounds 3 --prompts 80 --concurrency 16 --max-tokens 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

from dflashkit import serve
from dflashkit.generate.run import parse_args, run_shard
from dflashkit.io import iter_jsonl
from dflashkit.prepare import prepare

REPO = Path(__file__).resolve().parent.parent
# Prefix caching off: both clients send the same prompts, and the second must not get the first's cache.
CPU_ARGS = [*serve.CPU_VLLM_ARGS, "--no-enable-prefix-caching"]


async def plain_loop(server, prompts: list[str], concurrency: int, max_tokens: int) -> int:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)
    sem = asyncio.Semaphore(concurrency)

    async def one(text: str) -> int:
        async with sem:
            r = await client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": text}],
                                                     max_tokens=max_tokens, temperature=0.0, seed=0)
            return r.usage.completion_tokens

    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    await client.close()
    return tokens


def ours(server, input_path: Path, concurrency: int, max_tokens: int) -> int:
    os.environ["OPENAI_API_KEY"] = server.api_key  # how worker.sh hands the key to server_generate.py
    out = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    args = parse_args(["--input", str(input_path), "--output-dir", str(out), "--model", server.model,
                       "--base-url", f"{server.url}/v1", "--concurrency", str(concurrency), "--max-tokens",
                       str(max_tokens), "--temperature", "0", "--seed", "0", "--no-progress"])
    assert run_shard(args) == 0
    return sum(t["completion_tokens"] for _, r in iter_jsonl(next(out.glob("*.jsonl"))) for t in r["generation"]["turns"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=80)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    paths = prepare()
    questions = [r for _, r in iter_jsonl(paths["mtbench"])][: args.prompts]
    prompts = [q["messages"][0]["content"] for q in questions]
    work = Path(tempfile.mkdtemp(prefix="bench-gen-in-"))
    input_path = work / "turn1.jsonl"
    input_path.write_text("".join(json.dumps({"id": q["id"], "messages": [q["messages"][0]]}) + "\n"
                                  for q in questions))
    with serve.running_server("vllm", str(paths["model"]), "smollm2", work / "server.log", extra_args=CPU_ARGS,
                              env=serve.CPU_VLLM_ENV, timeout=600) as server:
        asyncio.run(plain_loop(server, prompts[:4], 4, 8))  # warm-up
        rates = {"plain": [], "ours": []}
        for r in range(args.rounds):
            for name in ("plain", "ours"):
                t0 = time.perf_counter()
                if name == "plain":
                    tokens = asyncio.run(plain_loop(server, prompts, args.concurrency, args.max_tokens))
                else:
                    tokens = ours(server, input_path, args.concurrency, args.max_tokens)
                rate = tokens / (time.perf_counter() - t0)
                rates[name].append(rate)
                print(f"round {r} {name:5s} {tokens} completion tokens, {rate:.1f} tok/s", flush=True)
    plain, mine = statistics.median(rates["plain"]), statistics.median(rates["ours"])
    print(f"median tok/s: plain {plain:.1f}, ours {mine:.1f}; ratio ours/plain = {mine / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
