"""`dflashkit check-dump DIR...`: load and validate every record of dump dirs before a long training run.

Each `<id>.pt` is loaded the way the trainer loads it (`load_dump_record` against the dir's meta.json, tensors
memory-mapped), several at a time. One line per unreadable record (file: reason), then one summary line per dir.
Exit codes: 0 every record is readable; 1 some are not (the trainer would skip them, up to data.max_bad_records);
2 a dir cannot be checked at all (no meta.json, or it is not a dump dir).
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .format import DumpFormatError, list_dump_records, load_dump_record, read_meta

EXIT_OK, EXIT_BAD_RECORDS, EXIT_UNUSABLE = 0, 1, 2


def check_record(path: Path, meta: dict) -> str | None:
    """None when the record loads and validates, else why not (the message names the file)."""
    try:
        load_dump_record(path, meta, mmap=True, dequantize=False)
    except (DumpFormatError, OSError) as e:
        return str(e)
    return None


def check_dump_dir(directory: str | os.PathLike, workers: int) -> tuple[int, list[str]]:
    """(records checked, the reasons of the bad ones, in file order)."""
    meta = read_meta(directory)
    paths = list_dump_records(directory)
    # Threads: torch.load spends its time in file reads and unpickling C code, and no process pool start-up.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda p: check_record(p, meta), paths))
    return len(paths), [r for r in reasons if r is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflashkit check-dump", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="dump dirs (meta.json + <id>.pt)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="records checked at once")
    args = p.parse_args(argv)
    status = EXIT_OK
    for directory in args.dirs:
        try:
            checked, bad = check_dump_dir(directory, max(1, args.workers))
        except (DumpFormatError, OSError) as e:
            print(f"check-dump: {directory}: {e}", file=sys.stderr)
            status = EXIT_UNUSABLE
            continue
        for reason in bad:
            print(reason)
        print(f"{directory}: {checked} records, {checked - len(bad)} readable, {len(bad)} bad")
        if bad and status == EXIT_OK:
            status = EXIT_BAD_RECORDS
    return status


if __name__ == "__main__":
    sys.exit(main())
