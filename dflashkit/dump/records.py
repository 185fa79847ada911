"""Reading the generate stage's output (docs/FORMATS.md, "Generated conversations") for the dump.

Each record comes back with the exact chat_template_kwargs it was generated with (thinking-mode replay), and with its
shard key: `generation.index`, the global prompt index, which does not depend on the order the generate stage happened
to finish conversations in. A record that breaks the format becomes an error for that record only.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..formats import BadRecord, read_conversation, records_of_file
from ..io import safe_id

log = logging.getLogger("dflashkit.dump")


@dataclasses.dataclass
class GeneratedRecord:
    id: str
    position: int  # shard key: generation.index, else the position in the input
    source: str
    record: Any
    template_kwargs: dict
    error: BadRecord | None = None


def generated_files(path: str | Path) -> list[Path]:
    """Generate shard files of a directory (sorted; errors files excluded), or the one file given."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    files = sorted(p for p in path.glob("*.jsonl") if not p.name.endswith(".errors.jsonl"))
    if not files:
        raise FileNotFoundError(f"{path}: no generated .jsonl shard files inside")
    unfinished = [f.name for f in files if not f.with_name(f.name[: -len(".jsonl")] + ".done.json").exists()]
    if unfinished and any(f.name.startswith("shard-") for f in files):
        log.warning("generate shards without a done-marker (still running or failed?): %s", unfinished)
    return files


def record_messages(record: dict) -> list[dict]:
    """The conversation as chat-template messages; raises BadRecord (role order, empty reply, ...)."""
    turns = read_conversation(record)
    for i, t in enumerate(turns):
        if t.role == "assistant" and not t.content.strip():
            raise BadRecord("empty", f"assistant turn {i} is empty")
    return [{"role": t.role, "content": t.content} for t in turns]


def _template_kwargs(record: dict) -> dict:
    generation = record.get("generation")
    kwargs = generation.get("chat_template_kwargs") if isinstance(generation, dict) else None
    if not isinstance(kwargs, dict):
        raise BadRecord("missing_key", "generation.chat_template_kwargs is missing: cannot replay the thinking mode")
    return kwargs


def generated_record(source: str, obj: Any, line_error: BadRecord | None, position: int) -> GeneratedRecord:
    """One parsed line as a GeneratedRecord (its error set when the line breaks the format)."""
    generation = obj.get("generation") if isinstance(obj, dict) else None
    index = generation.get("index") if isinstance(generation, dict) else None
    key = index if isinstance(index, int) else position
    try:
        if line_error is not None:
            raise line_error
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise BadRecord("missing_key", "record has no string id")
        if safe_id(obj["id"]) != obj["id"]:
            raise BadRecord("bad_id", f"id {obj['id']!r} is not a safe id")
        return GeneratedRecord(obj["id"], key, source, obj, _template_kwargs(obj))
    except BadRecord as e:
        rid = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else source
        return GeneratedRecord(safe_id(rid), key, source, None, {}, e)


def iter_generated(path: str | Path) -> Iterator[GeneratedRecord]:
    position = 0
    for file in generated_files(path):
        # Line by line: a malformed line (a torn tail of an unfinished shard, bad bytes) is that record's error only.
        for source, obj, line_error in records_of_file(file, file.name):
            yield generated_record(source, obj, line_error, position)
            position += 1
