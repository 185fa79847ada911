"""Compact answers: a generate shard without its prompts, xz-compressed, to keep answers across machines (about 0.3 KB
an answer) and rebuild the shard from them and the prompt file it was made from.

    python -m dflashkit.generate.answers pack GEN/shard-00000-of-00001.jsonl answers.jsonl.xz
    python -m dflashkit.generate.answers unpack answers.jsonl.xz --prompts prompts.jsonl --output-dir GEN

The file's first line is a header ({"format": "dflashkit.answers/1", "model", "dtype"}); then one line per
conversation: {"id", "index", "mode", "kwargs", "answers": [text per turn], "turns": [per-turn stats], "repairs"}.
`unpack` reads the prompt records as the generate stage does (same ids, indices and role rules) and writes the
records the shard held (docs/FORMATS.md) with a done-marker, so the dump reads them unchanged. Conversations of the
prompt file that the answers do not name are left out.
"""
from __future__ import annotations

import argparse
import json
import lzma
import sys
import time
from pathlib import Path

from ..formats import ASSISTANT, SYSTEM, USER, Turn, normalize_conversation, to_output_messages
from ..io import JsonlAppender, atomic_write_bytes, atomic_write_json, iter_jsonl, repair_jsonl_tail

FORMAT = "dflashkit.answers/1"


def pack(shard: Path, out: Path) -> int:
    """Write the compact form of a generate shard (a torn last line, left by a killed run, cut first); returns the
    number of conversations."""
    repair_jsonl_tail(shard)
    lines, header = [], None
    for _, rec in iter_jsonl(shard):
        gen = rec["generation"]
        if header is None:
            header = {"format": FORMAT, "model": gen["model"], "dtype": gen.get("dtype")}
        answers = [m["content"] for m in rec["messages"] if m["role"] == ASSISTANT]
        lines.append({"id": rec["id"], "index": gen["index"], "mode": rec["thinking_mode"],
                      "kwargs": gen["chat_template_kwargs"], "answers": answers, "turns": gen["turns"],
                      "repairs": gen["repairs"]})
    text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [header or {"format": FORMAT}, *lines])
    atomic_write_bytes(out, lzma.compress(text.encode()))
    return len(lines)


def read_answers(path: Path) -> tuple[dict, dict[str, dict]]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        header, *rows = [json.loads(line) for line in f if line.strip()]
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return header, {row["id"]: row for row in rows}


def rebuilt_turns(skeleton: list[Turn], answers: list[str]) -> list[Turn]:
    """The skeleton's turns with the answers after their user turns, up to the last answered one."""
    turns, left = [], list(answers)
    for turn in skeleton:
        if turn.role == USER and not left:
            break
        turns.append(turn)
        if turn.role == USER:
            turns.append(Turn(ASSISTANT, left.pop(0)))
    return turns


def unpack(answers: Path, prompts: str, output_dir: Path, system_prompt: str | None = None) -> int:
    from .inputs import iter_inputs

    header, rows = read_answers(answers)
    out = Path(output_dir) / "shard-00000-of-00001.jsonl"
    written = 0
    with JsonlAppender(out, truncate=True) as sink:
        for rec in iter_inputs(prompts):
            row = rows.get(rec.id)
            if row is None or rec.error is not None:
                continue
            skeleton, _ = normalize_conversation(rec.record)  # the repairs are in the answers
            if system_prompt and skeleton[0].role != SYSTEM:
                skeleton.insert(0, Turn(SYSTEM, system_prompt))
            if row["index"] != rec.index:
                raise ValueError(f"{rec.id}: index {rec.index} in {prompts}, {row['index']} in {answers}: "
                                 "not the prompt file these answers were made from")
            record = {k: v for k, v in rec.record.items() if k not in ("messages", "conversations")}
            if "id" in record and record["id"] != rec.id:
                record["source_id"] = record["id"]
            record["id"] = rec.id
            record["messages"] = to_output_messages(rebuilt_turns(skeleton, row["answers"]), "oai")
            record["thinking_mode"] = row["mode"]
            record["generation"] = {"model": header["model"], "chat_template_kwargs": row["kwargs"],
                                    "turns": row["turns"],
                                    "truncated": any(s["finish_reason"] == "length" for s in row["turns"]),
                                    "repairs": row["repairs"], "index": rec.index, "dtype": header["dtype"]}
            sink.write(record)
            written += 1
    if written != len(rows):
        raise ValueError(f"{answers}: {len(rows) - written} answered conversations are not in {prompts}")
    atomic_write_json(out.with_name("shard-00000-of-00001.done.json"), {
        "stage": "generate", "shard_id": 0, "num_shards": 1,
        "counts": {"input": written, "written": written, "skipped": 0, "errors": 0},
        "unpacked_from": str(answers), "dtype": header["dtype"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dflashkit.generate.answers", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="compress a generate shard's answers")
    a.add_argument("shard", type=Path)
    a.add_argument("out", type=Path)
    b = sub.add_parser("unpack", help="rebuild a generate shard from answers and their prompt file")
    b.add_argument("answers", type=Path)
    b.add_argument("--prompts", required=True)
    b.add_argument("--output-dir", type=Path, required=True)
    b.add_argument("--system-prompt", default=None, help="as given to the generate run, if it was")
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            print(f"{args.out}: {pack(args.shard, args.out)} conversations")
        else:
            print(f"{args.output_dir}: {unpack(args.answers, args.prompts, args.output_dir, args.system_prompt)} "
                  "conversations")
    except (OSError, ValueError, KeyError) as e:
        print(f"answers: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
