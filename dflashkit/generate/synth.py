"""Prompts synthesized by the target itself: sample completions of the chat template's user header (everything the
template renders before a user turn's text), keep the finished, well-formed, new ones as prompt records.

    server_generate.py --synthesize 50000 --tokenizer MODEL_DIR --chat-template T.jinja --model NAME \
        --base-url URL --output-dir SYNTH                 # through the server's completions endpoint
    python -m dflashkit.generate.engine --synthesize 50000 --model MODEL_DIR --output-dir SYNTH   # on a GPU

Shard k of n writes SYNTH/prompts/shard-0000k-of-0000n.jsonl (records {"id": "synth-<seed>-<sample>", "messages":
[one user turn], "synthesis": {...}}, ready for `--input SYNTH/prompts`) and then its done-marker
SYNTH/shard-0000k-of-0000n.done.json with the counts of accepted and rejected samples. Sample i (of shard i % n) is
drawn with seed `--seed + i`, so a rerun makes the same prompts; the seed is in the id so that a later run with another
seed adds prompts whose ids cannot collide with the first run's. Deduplication is within a shard and against every
`--synth-exclude` set (e.g. the ShareGPT prompt set and an earlier run's prompts); texts are compared case- and
whitespace-insensitively.

Left alone, a small target writes one kind of user turn (SmolLM2: "I'm ..." and "Can ..." open 59% of them).
`--synth-openers FILE` (one opening per line, e.g. configs/synth/openers.txt) starts sample i's user turn with
opening i % n, which the model continues: the prompt is the opening and its continuation.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import time
from collections.abc import Iterable
from pathlib import Path

from ..config import UserError
from ..io import JsonlAppender, atomic_write_json
from ..shards import shard_name

SENTINEL = "\u2063DFLASHKIT_USER_TEXT\u2063"  # rendered in place of the user text, then cut off


def user_header(tokenizer, template: str | None, kwargs: dict) -> str:
    """What the chat template renders before a first user turn's text (its default system turn included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], chat_template=template,
                                         tokenize=False, add_generation_prompt=False, **kwargs)
    if SENTINEL not in text:
        raise ValueError("the chat template does not render the user turn's text")
    return text[:text.index(SENTINEL)]


def _key(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


class PromptFilter:
    """Accepts a sampled user turn once: finished (the model closed the turn), within the length bounds, free of the
    template's special tokens, not one phrase repeated, not seen before."""

    def __init__(self, min_chars: int, max_chars: int, special_tokens: Iterable[str], exclude: Iterable[str] = ()):
        self.min_chars, self.max_chars = min_chars, max_chars
        self.special = [s for s in special_tokens if s]
        self.seen = {_key(t) for t in exclude}
        self.rejected: collections.Counter = collections.Counter()

    def reason(self, text: str, finish_reason: str) -> str | None:
        words = text.split()
        if finish_reason != "stop":
            return "unfinished"
        if not self.min_chars <= len(text) <= self.max_chars:
            return "length"
        if any(s in text for s in self.special):
            return "special_token"
        if len(words) >= 30 and len(set(words)) < 0.3 * len(words):
            return "repetitive"
        if _key(text) in self.seen:
            return "duplicate"
        return None

    def accept(self, text: str, finish_reason: str) -> str | None:
        """The cleaned prompt text, or None (the reason is counted)."""
        text = text.strip()
        why = self.reason(text, finish_reason)
        if why:
            self.rejected[why] += 1
            return None
        self.seen.add(_key(text))
        return text


@dataclasses.dataclass(frozen=True)
class SynthPaths:
    prompts: Path
    done: Path

    @classmethod
    def of(cls, out_dir: Path, shard_id: int, num_shards: int) -> SynthPaths:
        name = shard_name(shard_id, num_shards)
        return cls(Path(out_dir) / "prompts" / f"{name}.jsonl", Path(out_dir) / f"{name}.done.json")


def prompt_record(seed: int, sample: int, text: str, model: str, temperature: float, top_p: float,
                  opener: str = "") -> dict:
    synthesis = {"model": model, "seed": seed, "sample": sample, "temperature": temperature, "top_p": top_p}
    return {"id": f"synth-{seed}-{sample:09d}", "messages": [{"role": "user", "content": text}],
            "synthesis": {**synthesis, "opener": opener} if opener else synthesis}


def read_openers(path: Path | None) -> list[str]:
    """--synth-openers: the openings, one a line (blank lines and `#` comments skipped); none: the bare header."""
    if path is None:
        return [""]
    openers = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    openers = [o for o in openers if o and not o.startswith("#")]
    if not openers:
        raise UserError(f"--synth-openers {path}: no opening in it")
    return openers


def of_sample(per_opener: list, sample: int):
    """Sample i's opening (or what was made from it, e.g. its header ids): opening i % n."""
    return per_opener[sample % len(per_opener)]


def excluded_texts(specs: list[str]) -> list[str]:
    """The user turns of prompt sets (files or dirs), to keep synthesized prompts apart from them."""
    from ..formats import raw_turns
    from .inputs import iter_inputs

    texts = []
    for rec in (rec for spec in specs for rec in iter_inputs(spec)):
        if rec.error is None:
            try:
                texts += [t.content for t in raw_turns(rec.record) if t.role == "user"]
            except ValueError:
                continue
    return texts


def make_filter(args: argparse.Namespace, tokenizer) -> PromptFilter:
    return PromptFilter(args.synth_min_chars, args.synth_max_chars, tokenizer.all_special_tokens,
                        excluded_texts(args.synth_exclude))


def write_done(paths: SynthPaths, args: argparse.Namespace, counts: dict, wall: float) -> None:
    atomic_write_json(paths.done, {"stage": "synthesize", "shard_id": args.shard_id, "num_shards": args.num_shards,
                                   "counts": counts, "wall_time_s": round(wall, 3),
                                   "args": {k: str(v) if isinstance(v, Path) else v
                                            for k, v in vars(args).items() if k != "base_url"},
                                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def shard_target(total: int, shard_id: int, num_shards: int) -> int:
    return total // num_shards + (shard_id < total % num_shards)


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--synthesize", type=int, metavar="N", default=None,
                   help="make N prompts (over all shards) by sampling the target's user turns, instead of answering")
    p.add_argument("--synth-temperature", type=float, default=1.0)
    p.add_argument("--synth-top-p", type=float, default=0.95)
    p.add_argument("--synth-max-tokens", type=int, default=256, help="a longer sample is rejected as unfinished")
    p.add_argument("--synth-min-chars", type=int, default=16)
    p.add_argument("--synth-max-chars", type=int, default=2000)
    p.add_argument("--synth-attempts", type=float, default=4.0, help="give up after N x this many samples")
    p.add_argument("--synth-exclude", nargs="+", default=[], metavar="PROMPTS",
                   help="prompt record sets (files or dirs) whose user turns count as already seen")
    p.add_argument("--synth-openers", type=Path, default=None, metavar="FILE",
                   help="openings of the user turn, one a line: sample i starts with opening i %% n (e.g. "
                        "configs/synth/openers.txt); default: the model writes the whole turn")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p)
    p.add_argument("--tokenizer", default=None, help="--synthesize: the served model's tokenizer (a folder or name)")
    p.add_argument("--chat-template", default=None, help="--synthesize: the .jinja file the server renders with "
                                                          "(default: the tokenizer's own)")


async def _sample(client, args, headers: list[list[int]], sample: int):
    response = await client.completions.create(
        model=args.model, prompt=of_sample(headers, sample), temperature=args.synth_temperature,
        top_p=args.synth_top_p,
        max_tokens=args.synth_max_tokens, seed=(args.seed or 0) + sample, timeout=args.request_timeout)
    choice = response.choices[0]
    return sample, choice.text, choice.finish_reason


def synthesize_shard(args: argparse.Namespace) -> int:
    """server_generate.py --synthesize: the same synthesis through the server's completions endpoint, in waves of
    --concurrency samples taken in sample order (so the kept prompts do not depend on which request returns first)."""
    import asyncio
    import logging
    import os

    import openai
    from transformers import AutoTokenizer

    log = logging.getLogger("dflashkit.generate.synth")
    paths = SynthPaths.of(Path(args.output_dir), args.shard_id, args.num_shards)
    if paths.done.exists():
        log.info("%s exists; nothing to do", paths.done)
        return 0
    if not args.tokenizer:
        log.error("--synthesize needs --tokenizer (the served model's tokenizer, to render the user header)")
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    template = Path(args.chat_template).read_text() if args.chat_template else None
    header_text = user_header(tokenizer, template, args.chat_template_kwargs)
    openers = read_openers(args.synth_openers)
    headers = [tokenizer(header_text + o, add_special_tokens=False)["input_ids"] for o in openers]
    target = shard_target(args.synthesize, args.shard_id, args.num_shards)
    limit = int(target * args.synth_attempts)
    keep = make_filter(args, tokenizer)

    async def run(sink: JsonlAppender) -> dict:
        key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
        clients = [openai.AsyncOpenAI(base_url=u, api_key=key, max_retries=args.max_retries) for u in args.base_url]
        accepted = samples = 0
        try:
            while accepted < target and samples < limit:
                wave = range(samples, min(limit, samples + args.concurrency, samples + 2 * (target - accepted)))
                results = await asyncio.gather(*(  # spread over the servers by position, as generate does
                    _sample(clients[k % len(clients)], args, headers, args.shard_id + k * args.num_shards)
                    for k in wave))
                for sample, text, finish in results:  # in sample order, up to the target: samples are judged
                    if accepted == target:
                        break
                    samples += 1
                    opener = of_sample(openers, sample)
                    text = keep.accept(opener + text, finish)
                    if text is not None:
                        accepted += 1
                        sink.write(prompt_record(args.seed or 0, sample, text, args.model, args.synth_temperature,
                                                 args.synth_top_p, opener))
        finally:
            for client in clients:
                await client.close()
        return {"accepted": accepted, "samples": samples, "rejected": dict(keep.rejected)}

    t0 = time.time()
    try:
        with JsonlAppender(paths.prompts, truncate=True) as sink:
            counts = asyncio.run(run(sink))
    except openai.OpenAIError as e:
        log.error("%s: the server failed: %s; rerun the shard", paths.prompts.name, str(e)[:300])
        return 75
    if counts["accepted"] < target:
        log.error("%s: only %d of %d prompts after %d samples (rejected: %s); no marker", paths.prompts.name,
                  counts["accepted"], target, counts["samples"], counts["rejected"])
        return 1
    write_done(paths, args, counts, time.time() - t0)
    log.info("%s: %d prompts from %d samples (rejected: %s)", paths.prompts.name, counts["accepted"],
             counts["samples"], counts["rejected"])
    return 0
