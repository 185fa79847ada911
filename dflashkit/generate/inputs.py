"""Reading prompt datasets: files, directories or `datasets` names, each record with its global index and stable id.

The global index is a record's position in the whole input (files of a directory in sorted name order, then line order).
It drives both the shard assignment (index % num_shards) and the thinking mode (index % len(modes)), so neither depends
on how many shards run. Ids come from the record (`id`, `conversation_id`, `question_id`) or, when absent, from the
source name and position; either way they go through `safe_id`, so they are stable across reruns and safe as file names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from ..formats import BadRecord
from ..io import safe_id

ID_KEYS = ("id", "conversation_id", "question_id")
INPUT_SUFFIXES = (".jsonl", ".json")


@dataclasses.dataclass
class InputRecord:
    index: int  # global position in the input
    id: str  # safe, unique conversation id
    source: str  # "file:line" or "dataset[i]", for error messages
    record: Any  # the parsed record, or None when `error` is set
    error: BadRecord | None = None


def _source_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no .jsonl or .json files inside")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{path}: no such file or directory")


def records_of_file(path: Path, label: str) -> Iterator[tuple[str, Any, BadRecord | None]]:
    """Yield (source, record, error). A malformed line becomes an error for that line only."""
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)  # a broken .json file cannot be split into records: the stage stops here
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json input must hold a list of records")
        for i, rec in enumerate(data):
            yield f"{label}[{i}]", rec, None
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield parse_line(raw, f"{label}:{lineno}")


def parse_line(raw: bytes, src: str) -> tuple[str, Any, BadRecord | None]:
    """(source, record, error) of one JSONL line."""
    try:
        return src, json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return src, None, BadRecord("bad_encoding", f"{src}: not UTF-8 ({e.reason} at byte {e.start})")
    except ValueError as e:
        return src, None, BadRecord("bad_json", f"{src}: {e}")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").exists() and (path / "dataset_info.json").exists()


def _raw_records(spec: str) -> Iterator[tuple[str, Any, BadRecord | None]]:
    path = Path(spec)
    if not path.exists() and path.suffix in INPUT_SUFFIXES:
        raise FileNotFoundError(f"{spec}: no such file")
    if _is_saved_dataset(path) or not path.exists():
        # A `datasets` folder written by save_to_disk, or a hub name (offline clusters mirror these; a failure to
        # resolve it says so clearly).
        import datasets  # only needed for this input kind

        ds = datasets.load_from_disk(spec) if path.exists() else datasets.load_dataset(spec, split="train")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        for i, rec in enumerate(ds):
            yield f"{path.name}[{i}]", dict(rec), None
        return
    files = _source_files(path)
    root = path if path.is_dir() else path.parent
    for f in files:
        yield from records_of_file(f, str(f.relative_to(root)))


def _default_id(source: str) -> str:
    # "dir/f.jsonl:17" -> "dir/f-17", "f.json[3]" / "name[3]" -> "f-3" / "name-3"; safe_id then makes it a file name.
    return re.sub(r"\.jsonl:|\.json\[|\[", "-", source).rstrip("]")


def iter_inputs(spec: str) -> Iterator[InputRecord]:
    """Every record of the input in global order. Duplicate ids are reported on their second occurrence."""
    seen: set[str] = set()
    for index, (source, record, error) in enumerate(_raw_records(spec)):
        raw_id = None
        if isinstance(record, dict):
            raw_id = next((record[k] for k in ID_KEYS if k in record and record[k] not in (None, "")), None)
        if isinstance(raw_id, (int, float)) and not isinstance(raw_id, bool):
            raw_id = str(raw_id)
        if raw_id is not None and not isinstance(raw_id, str):
            error = error or BadRecord("bad_type", f"{source}: id is {type(raw_id).__name__}")
            raw_id = None
        try:
            cid = safe_id(raw_id if raw_id is not None else _default_id(source))
        except ValueError as e:
            cid, error = safe_id(_default_id(source)), error or BadRecord("bad_id", f"{source}: {e}")
        if cid in seen:
            error = error or BadRecord("duplicate_id", f"{source}: id {cid!r} already used by an earlier record")
            cid = safe_id(f"{cid}@{index}")
        seen.add(cid)
        yield InputRecord(index, cid, source, record if error is None else None, error)


def shard_of(index: int, num_shards: int) -> int:
    return index % num_shards


def slurm_shard_defaults(num_shards: int | None, env=os.environ) -> tuple[int, int] | None:
    """(shard_id, num_shards) from a Slurm array task, or None outside one.

    With an explicit shard count the array task id is the shard id: that is how a rerun submits a sparse array
    (`--array=3,7`) of an n-shard run. Without one, the array itself defines the shards; arrays need not start at 0
    (`--array=1-16` gives shards 0..15).
    """
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = int(env["SLURM_ARRAY_TASK_ID"])
    if num_shards is not None:
        return task, num_shards
    lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    hi = int(env.get("SLURM_ARRAY_TASK_MAX", task))
    return task - lo, int(env.get("SLURM_ARRAY_TASK_COUNT", hi - lo + 1))


def resolve_shard(parser, args) -> None:
    """Fill args.shard_id / args.num_shards from the flags or the Slurm array; parser.error on a bad combination.

    Shared by every sharded stage (generate, dump), so all of them read the array the same way.
    """
    if args.shard_id is None:
        slurm = slurm_shard_defaults(args.num_shards)
        args.shard_id, slurm_count = slurm if slurm else (0, 1)
        args.num_shards = args.num_shards or slurm_count
    elif args.num_shards is None:
        parser.error("--shard-id needs --num-shards")
    if not 0 <= args.shard_id < args.num_shards:
        parser.error(f"--shard-id {args.shard_id} is outside [0, {args.num_shards})")
