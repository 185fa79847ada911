"""A shard: the unit of work of every sharded stage (generate, dump), and what status and rerun read about it.

Files of shard k of n in a stage's output dir (docs/FORMATS.md):
  shard-0000k-of-0000n.jsonl         the records (generate; the dump writes one `<id>.pt` per record instead)
  shard-0000k-of-0000n.errors.jsonl  one line per record not written: id, stage, kind, reason, detail
  shard-0000k-of-0000n.done.json     the done-marker, written last, only when written + skipped + errors == input

A marker also says what the shard was made from (`made_from`: the upstream done-markers' sha256, or the input file's):
when the upstream changes, the shard is stale and a rerun redoes it. Standard library and dflashkit.io only, so the
login node (status, rerun) and both stages share it without their clients.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .io import JsonlAppender, atomic_write_json, read_json, sha256_file

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_RETRYABLE = 75  # EX_TEMPFAIL: some records failed for a reason a rerun may fix; no marker
KINDS = ("skipped", "error", "retryable")  # skipped: the input breaks a rule; error: a permanent failure

T = TypeVar("T")


def shard_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id:05d}-of-{num_shards:05d}"


@dataclasses.dataclass(frozen=True)
class ShardFiles:
    """The paths of shard `shard_id` of `num_shards` in `directory`."""
    directory: Path
    shard_id: int
    num_shards: int

    @property
    def name(self) -> str:
        return shard_name(self.shard_id, self.num_shards)

    @property
    def records(self) -> Path:
        return Path(self.directory) / f"{self.name}.jsonl"

    @property
    def errors(self) -> Path:
        return Path(self.directory) / f"{self.name}.errors.jsonl"

    @property
    def done(self) -> Path:
        return Path(self.directory) / f"{self.name}.done.json"


# ---- which shard this process is -----------------------------------------------------------------------------------

def add_shard_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-shards", type=int, default=None, help="default: from the Slurm array, else 1")
    parser.add_argument("--shard-id", type=int, default=None, help="default: from the Slurm array, else 0")


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


def resolve_shard(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill args.shard_id / args.num_shards from the flags or the Slurm array; parser.error on a bad combination."""
    if args.num_shards is not None and args.num_shards < 1:
        parser.error(f"--num-shards must be >= 1, not {args.num_shards}")
    if args.shard_id is None:
        slurm = slurm_shard_defaults(args.num_shards)
        args.shard_id, slurm_count = slurm if slurm else (0, 1)
        args.num_shards = args.num_shards or slurm_count
    elif args.num_shards is None:
        parser.error("--shard-id needs --num-shards")
    if not 0 <= args.shard_id < args.num_shards:
        parser.error(f"--shard-id {args.shard_id} is outside [0, {args.num_shards})")


# ---- counting and error lines ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class ShardCounts:
    """Every record of a shard's input ends in exactly one of written / skipped / errors (retryable: no marker)."""
    input: int = 0
    written: int = 0
    skipped: int = 0
    errors: int = 0
    retryable: int = 0

    def balanced(self) -> bool:
        return self.written + self.skipped + self.errors == self.input

    def marker_counts(self) -> dict[str, int]:
        return {"input": self.input, "written": self.written, "skipped": self.skipped, "errors": self.errors}


class ErrorLog:
    """The shard's errors file, rewritten by each attempt (everything not written is attempted again), and the
    counter of each failure kind. `fail` writes the one line and logs it."""

    def __init__(self, path: Path, stage: str, counts: ShardCounts, logger: logging.Logger):
        self.stage, self.counts, self.log = stage, counts, logger
        self.out = JsonlAppender(path, truncate=True)

    def __enter__(self) -> "ErrorLog":
        self.out.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.out.__exit__(*exc)

    def fail(self, rid: str, source: str, kind: str, reason: str, detail: str, **extra: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"error kind {kind!r} is not one of {KINDS}")
        self.out.write({"id": rid, **extra, "source": source, "stage": self.stage, "kind": kind, "reason": reason,
                        "detail": detail})
        field = "errors" if kind == "error" else kind
        setattr(self.counts, field, getattr(self.counts, field) + 1)
        level = logging.WARNING if kind == "skipped" else logging.ERROR
        self.log.log(level, "conversation %s (%s) %s: %s: %s", rid, source, kind, reason, detail[:300])


# ---- inputs ------------------------------------------------------------------------------------------------------

class UnusableInput(ValueError):
    """The whole input of a stage holds nothing to work on: a failure, not an empty success."""


def require_usable(items: Iterable[T], usable: Callable[[T], bool], what: str,
                   allow_empty: bool = False) -> Iterator[T]:
    """`items` unchanged, after checking that at least one is usable (read up to the first one before anything is
    written). An empty input raises UnusableInput unless `allow_empty`; an input of only unusable items (another
    encoding, not JSON) always does: either would otherwise leave a done-marker that looks like progress."""
    it = iter(items)
    head: list[T] = []
    for item in it:
        head.append(item)
        if usable(item):
            return itertools.chain(head, it)
    if not head:
        if allow_empty:
            return iter(())
        raise UnusableInput(f"{what} holds no records (pass --allow-empty-input if that is intended)")
    raise UnusableInput(f"{what}: none of its {len(head)} record(s) could be read (wrong encoding or not JSON?)")


# ---- done-markers and what they were made from --------------------------------------------------------------------

def fingerprint(source: str | os.PathLike | None) -> dict[str, str]:
    """What a stage reads, as {name: sha256}: the done-markers of an upstream stage's dir (each marker holds its
    shard's counts and content hash, so a redone shard has a new one), or the one input file."""
    if source is None:
        return {}
    path = Path(source)
    if path.is_file():
        return {path.name: sha256_file(path)}
    markers = sorted(path.glob("shard-*.done.json")) or sorted(path.glob("done.json"))
    return {p.name: sha256_file(p) for p in markers}


def write_done_marker(path: Path, stage: str, counts: dict[str, int] | None, made_from: dict[str, str],
                      **fields: Any) -> None:
    """The marker, atomically and last. Counts that do not add up are a bug in the stage: refuse to mark."""
    if counts is not None and counts["written"] + counts["skipped"] + counts["errors"] != counts["input"]:
        raise RuntimeError(f"{path.name}: counts do not add up: {counts}")
    atomic_write_json(path, {"stage": stage, **({"counts": counts} if counts is not None else {}), **fields,
                             "made_from": made_from, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def read_marker(path: Path) -> dict | None:
    try:
        marker = read_json(path)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_stale(marker: dict | None, current: dict[str, str]) -> bool:
    """A marker made from other upstream files than the ones there now. Markers from before `made_from` existed are
    taken as fresh: nothing says otherwise."""
    return marker is not None and "made_from" in marker and marker["made_from"] != current


def retire_marker(path: Path) -> None:
    """Take a stale marker out of the way (kept as `.stale.json` for the record) so its shard runs again."""
    if path.exists():
        os.replace(path, path.with_name(path.name.removesuffix(".json") + ".stale.json"))


# ---- logging -------------------------------------------------------------------------------------------------------

def setup_logging(quiet: Iterable[str] = ()) -> None:
    """One line per event on stderr, the same format in every stage's log; `quiet` loggers only warn."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


# ---- for shell stages (train.sbatch) --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`python -m dflashkit.shards fingerprint SRC` prints what a stage reads as JSON; `mark PATH --stage S
    --made-from JSON` writes a marker for a stage whose work is a shell script (train)."""
    import json

    p = argparse.ArgumentParser(prog="python -m dflashkit.shards")
    sub = p.add_subparsers(dest="cmd", required=True)
    fp = sub.add_parser("fingerprint")
    fp.add_argument("source")
    mk = sub.add_parser("mark")
    mk.add_argument("path")
    mk.add_argument("--stage", required=True)
    mk.add_argument("--made-from", default="{}", help="JSON printed by `fingerprint` when the stage started")
    mk.add_argument("--job-id", default="local")
    args = p.parse_args(argv)
    if args.cmd == "fingerprint":
        print(json.dumps(fingerprint(args.source), sort_keys=True))
        return EXIT_OK
    write_done_marker(Path(args.path), args.stage, None, json.loads(args.made_from), job_id=args.job_id)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
