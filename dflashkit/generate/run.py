"""One generate shard: read the input, regenerate this shard's conversations, write them exactly once.

Files of shard k of n in OUTPUT_DIR (docs/FORMATS.md):
  shard-0000k-of-0000n.jsonl         generated conversations, one per line, appended as they finish
  shard-0000k-of-0000n.errors.jsonl  one line per conversation not written (skipped or failed), with the reason
  shard-0000k-of-0000n.done.json     the done-marker, written last, holding the counts

A rerun skips the ids already in the shard file (after cutting a torn last line), retries everything else, and exits
at once when the done-marker exists. The marker is written only when every input conversation of the shard is
accounted for: written + skipped + errors == input. Conversations that failed for a retryable reason (connection,
timeout, 429, 5xx after the client's retries) leave the shard without a marker and the process exits non-zero, so the
scheduler sees the failure and a rerun picks them up.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from ..formats import (
    OUTPUT_KEY,
    SYSTEM,
    BadRecord,
    Turn,
    normalize_conversation,
    to_output_messages,
    unknown_thinking_modes,
)
from ..io import JsonlAppender, iter_jsonl, repair_jsonl_tail, sha256_file
from ..shards import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RETRYABLE,
    ErrorLog,
    ShardCounts,
    ShardFiles,
    UnusableInput,
    add_shard_flags,
    require_usable,
    resolve_shard,
    setup_logging,
    write_done_marker,
)
from . import synth
from .client import ConversationFailed, SamplingConfig, regenerate
from .inputs import InputRecord, iter_inputs, shard_of
from .settings import below_minimum, default

log = logging.getLogger("dflashkit.generate")


def thinking_mode_of(index: int, modes: list[str]) -> str | None:
    """The mode of the conversation with global index `index`: an even split over the whole dataset."""
    return modes[index % len(modes)] if modes else None


def template_kwargs_for(mode: str | None, args: argparse.Namespace) -> dict[str, Any]:
    kwargs = dict(args.chat_template_kwargs)
    if mode is not None:
        kwargs[args.thinking_mode_key] = args.thinking_mode_map.get(mode, mode)
    return kwargs


def output_record(rec: InputRecord, convo, stats, mode, kwargs, repairs, args) -> dict[str, Any]:
    out = {k: v for k, v in rec.record.items() if k not in ("messages", "conversations")}
    if "id" in out and out["id"] != rec.id:
        out["source_id"] = out["id"]
    out["id"] = rec.id
    out[OUTPUT_KEY[args.output_format]] = to_output_messages(convo, args.output_format)
    out["thinking_mode"] = mode
    out["generation"] = {
        "model": args.model,
        "chat_template_kwargs": kwargs,
        "turns": stats,
        "truncated": any(s["finish_reason"] == "length" for s in stats),
        "repairs": repairs,
        "index": rec.index,
    }
    return out


def done_ids(path: Path) -> set[str]:
    """Ids already in a shard file (its torn tail cut first). A duplicate means the file is corrupt: refuse it."""
    if not path.exists():
        return set()
    repair_jsonl_tail(path)
    ids: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        if obj["id"] in ids:
            raise RuntimeError(f"{path}:{lineno}: conversation {obj['id']!r} appears twice")
        ids.add(obj["id"])
    return ids


@dataclasses.dataclass
class GenerateCounts(ShardCounts):
    prompt_tokens: int = 0
    completion_tokens: int = 0


def readable(rec: InputRecord) -> bool:
    """A record that could at least be read as JSON (a bad one is counted; an input of only those is unusable)."""
    return rec.error is None or rec.error.reason not in ("bad_encoding", "bad_json")


async def _run_shard(args: argparse.Namespace, files: ShardFiles, already: set[str],
                     records) -> GenerateCounts:
    cfg = SamplingConfig(
        model=args.model, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
        seed=args.seed, timeout=args.request_timeout, max_retries=args.max_retries, on_length=args.on_length,
        think_open=args.think_tags[0], think_close=args.think_tags[1],
    )
    api_key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
    clients = [openai.AsyncOpenAI(base_url=u, api_key=api_key, max_retries=args.max_retries) for u in args.base_url]
    counts = GenerateCounts()
    queue: asyncio.Queue = asyncio.Queue(maxsize=args.concurrency * 4)
    bar = tqdm(desc=files.name, unit="conv", disable=args.no_progress,
               file=sys.stderr, mininterval=2.0)
    start = time.monotonic()

    with JsonlAppender(files.records) as out, ErrorLog(files.errors, "generate", counts, log) as errs:

        def fail(rec: InputRecord, exc: BadRecord | ConversationFailed, kind: str) -> None:
            errs.fail(rec.id, rec.source, kind, exc.reason, exc.detail, index=rec.index)

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                position, rec, skeleton, repairs = item
                mode = thinking_mode_of(rec.index, args.thinking_modes)
                kwargs = template_kwargs_for(mode, args)
                # By position within the shard: global indices of one shard share their residue mod num_shards, so
                # spreading by index would send a whole shard to one server when the counts share a factor.
                client = clients[position % len(clients)]
                try:
                    convo, stats = await regenerate(client, skeleton, cfg, kwargs)
                except ConversationFailed as e:
                    fail(rec, e, "retryable" if e.retryable else "error")
                else:
                    out.write(output_record(rec, convo, stats, mode, kwargs, repairs, args))
                    counts.written += 1
                    counts.prompt_tokens += sum(s["prompt_tokens"] or 0 for s in stats)
                    counts.completion_tokens += sum(s["completion_tokens"] or 0 for s in stats)
                bar.update(1)
                elapsed = max(time.monotonic() - start, 1e-9)
                bar.set_postfix(tok_s=f"{counts.completion_tokens / elapsed:.1f}", refresh=False)

        workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]

        async def put_or_raise(item) -> None:
            # A worker crashes only on a bug or an OS error (a full disk): raise that at once. Waiting on a full
            # queue that no worker reads any more would hang the shard forever.
            put = asyncio.ensure_future(queue.put(item))
            while True:
                crashed = [w for w in workers if w.done() and not w.cancelled() and w.exception()]
                if crashed:
                    put.cancel()
                    raise crashed[0].exception()
                if put.done():
                    return
                await asyncio.wait([put, *(w for w in workers if not w.done())], return_when=asyncio.FIRST_COMPLETED)
        for rec in records:
            if shard_of(rec.index, args.num_shards) != args.shard_id:
                continue
            counts.input += 1
            if rec.id in already:
                counts.written += 1
                bar.update(1)
                continue
            try:
                if rec.error is not None:
                    raise rec.error
                skeleton, repairs = normalize_conversation(rec.record)
                if args.system_prompt and skeleton[0].role != SYSTEM:
                    skeleton.insert(0, Turn(SYSTEM, args.system_prompt))
            except BadRecord as e:
                fail(rec, e, "skipped")
                bar.update(1)
                continue
            await put_or_raise((counts.input, rec, skeleton, repairs))
        for _ in workers:
            await put_or_raise(None)
        await asyncio.gather(*workers)
    bar.close()
    for c in clients:
        await c.close()
    return counts


def run_shard(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir)
    files = ShardFiles(output_dir, args.shard_id, args.num_shards)
    if files.done.exists():
        log.info("%s is already done (%s); nothing to do", files.name, files.done)
        return EXIT_OK
    # Read up to the first readable record before any file exists: a missing, empty or unreadable input leaves nothing.
    records = require_usable(iter_inputs(args.input), readable, f"input {args.input}", args.allow_empty_input)
    if args.max_conversations is not None:
        records = itertools.islice(records, args.max_conversations)
    output_dir.mkdir(parents=True, exist_ok=True)
    already = done_ids(files.records)
    if already:
        log.info("resuming: %d conversations already in %s", len(already), files.records)
    t0 = time.time()
    c = asyncio.run(_run_shard(args, files, already, records))
    wall = time.time() - t0
    summary = (f"input={c.input} written={c.written} skipped={c.skipped} errors={c.errors} "
               f"retryable={c.retryable} completion_tokens={c.completion_tokens} wall={wall:.1f}s")
    if c.retryable:
        log.error("%s incomplete: %s; rerun the shard to retry the failed conversations", files.records.name, summary)
        return EXIT_RETRYABLE
    if not c.balanced():
        log.error("%s counts do not add up: %s", files.records.name, summary)
        return EXIT_FAILED
    written_now = len(done_ids(files.records))
    if written_now != c.written:
        log.error("%s holds %d conversations but %d were counted", files.records, written_now, c.written)
        return EXIT_FAILED
    write_done_marker(
        files.done, "generate", c.marker_counts(), {},
        shard_id=args.shard_id, num_shards=args.num_shards,
        # Tokens of this attempt only: conversations resumed from an earlier attempt were counted there.
        tokens={"prompt": c.prompt_tokens, "completion": c.completion_tokens},
        # What the later stages were made from: a redone shard has another hash, so they show as stale.
        output_sha256=sha256_file(files.records),
        wall_time_s=round(wall, 3), args={k: v for k, v in vars(args).items() if k != "base_url"})
    log.info("%s done: %s", files.records.name, summary)
    return EXIT_OK


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    # Defaults: dflashkit/generate/settings.py, the one table worker.sh, the recipe and the docs are checked against.
    p = argparse.ArgumentParser(
        prog="server_generate.py",
        description="Regenerate the assistant turns of a prompt dataset shard against an OpenAI-compatible server.",
    )
    p.add_argument("--input", help=".jsonl/.json file, a directory of them, or a datasets name (all but with "
                                   "--synthesize)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", required=True, help="model name as served")
    p.add_argument("--base-url", action="append", default=None,
                   help="server URL ending in /v1; repeat to spread over several servers (default from "
                        "DFLASHKIT_BASE_URLS, comma-separated)")
    add_shard_flags(p)
    p.add_argument("--allow-empty-input", action="store_true",
                   help="an input with no records completes the shard (by default it is a failure)")
    p.add_argument("--thinking-modes", type=_csv, default=[],
                   help="comma list of enabled, disabled, adaptive (or names --thinking-mode-map maps), e.g. "
                        "enabled,disabled; conversation i uses modes[i %% n]")
    p.add_argument("--thinking-mode-key", default=default("THINKING_MODE_KEY"),
                   help="chat_template_kwargs key for the mode")
    p.add_argument("--thinking-mode-map", type=_json_object, default={},
                   help='JSON map from mode to the value sent, e.g. \'{"enabled": true, "disabled": false}\'')
    p.add_argument("--chat-template-kwargs", type=_json_object, default={}, help="JSON object sent with every request")
    p.add_argument("--think-tags", nargs=2,
                   default=[default("THINK_OPEN_TAG"), default("THINK_CLOSE_TAG")], metavar=("OPEN", "CLOSE"),
                   help="tags wrapping reasoning the server returned separately")
    p.add_argument("--output-format", choices=sorted(OUTPUT_KEY), default=default("OUTPUT_FORMAT"))
    p.add_argument("--on-length", choices=["keep", "drop"], default=default("ON_LENGTH"),
                   help="a reply cut by max_tokens: keep it (marked truncated) or drop the conversation")
    p.add_argument("--temperature", type=float, default=default("TEMPERATURE"))
    p.add_argument("--top-p", type=float, default=default("TOP_P"))
    p.add_argument("--max-tokens", type=int, default=default("MAX_TOKENS"))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system-prompt", default=None, help="added to conversations that have no system turn")
    p.add_argument("--max-conversations", type=int, default=None, help="read only the first N input records")
    p.add_argument("--concurrency", type=int, default=default("CONCURRENCY"))
    p.add_argument("--request-timeout", type=float, default=default("REQUEST_TIMEOUT"),
                   help="seconds per request")
    p.add_argument("--max-retries", type=int, default=default("MAX_RETRIES"),
                   help="retries on connection errors, 429 and 5xx")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--check-done", action="store_true",
                   help="only report: exit 0 if this shard's done-marker exists, else 1 (needs no server)")
    synth.add_server_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.base_url is None:
        urls = _csv(os.environ.get("DFLASHKIT_BASE_URLS", ""))
        if not urls and not args.check_done:
            p.error("--base-url is required (or set DFLASHKIT_BASE_URLS)")
        args.base_url = urls
    resolve_shard(p, args)
    if (args.input is None) == (args.synthesize is None):
        p.error("give --input (answer prompts) or --synthesize N (make prompts), not both")
    # A value no server could serve would fail every request, each retried as if it were the server's fault.
    for s in below_minimum(lambda s: getattr(args, s.key, None) if s.flag else None):
        p.error(f"{s.flag} must be >= {s.minimum}")
    unknown = set(args.thinking_mode_map) - set(args.thinking_modes)
    if unknown:
        p.error(f"--thinking-mode-map names modes not in --thinking-modes: {sorted(unknown)}")
    unknown = unknown_thinking_modes(args.thinking_modes, args.thinking_mode_map)
    if unknown:
        p.error(f"--thinking-modes: {unknown}")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging(quiet=("httpx", "httpx2", "openai"))  # one line per request drowns the shard's own log
    args = parse_args(argv)
    if args.check_done:
        return EXIT_OK if ShardFiles(Path(args.output_dir), args.shard_id, args.num_shards).done.exists() else 1
    log.info("resolved configuration: %s", json.dumps(vars(args), sort_keys=True, default=str))
    if args.synthesize is not None:
        return synth.synthesize_shard(args)
    try:
        return run_shard(args)
    except (OSError, UnusableInput) as e:  # a full disk, a missing or empty input: one line, exit 1
        log.error("%s: %s", ShardFiles(Path(args.output_dir), args.shard_id, args.num_shards).name, e)
        return EXIT_FAILED
