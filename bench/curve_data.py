"""Nested training sets and one fixed held-out set from generate shards, for a tau-vs-data curve (issue 17).

Every record line of the inputs (generate output dirs or .jsonl files) is shuffled with a fixed seed; the first
`--heldout` become heldout.jsonl, and train-S.jsonl holds the next S for each size S, so every smaller set is a prefix
of the larger ones and all runs are scored on the same held-out text (`data.online.heldout_inputs`). `--more` adds
records made later (shuffled too; each id once, and ids already in `--inputs` are left out) after the rest of `--inputs`: the held-out
set and every training set of up to that many records stay exactly as they were without them, so a larger size
extends an earlier curve.

    python bench/curve_data.py --inputs gen-sharegpt gen-synth --heldout 256 --sizes 5000 10000 all --out curve
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from dflashkit.dump.records import generated_files


def read_lines(specs: list[str]) -> list[bytes]:
    return [line for spec in specs for path in generated_files(spec)
            for line in path.read_bytes().splitlines(keepends=True) if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--more", nargs="*", default=[], help="later records, after the rest of --inputs (new ids only)")
    p.add_argument("--heldout", type=int, default=256)
    p.add_argument("--sizes", nargs="+", required=True, help="training set sizes; 'all': every record left")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    lines = read_lines(args.inputs)
    known = {json.loads(line)["id"] for line in lines}
    more = []
    for line in read_lines(args.more):  # the first copy of each new id: a later shard holds the earlier ones too
        cid = json.loads(line)["id"]
        if cid not in known:
            known.add(cid)
            more.append(line)
    random.Random(args.seed).shuffle(lines)
    random.Random(args.seed).shuffle(more)
    heldout, rest = lines[:args.heldout], lines[args.heldout:] + more
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout.jsonl").write_bytes(b"".join(heldout))
    for size in args.sizes:
        n = len(rest) if size == "all" else int(size)
        if n > len(rest):
            raise SystemExit(f"curve_data: {n} training records asked for, {len(rest)} left after the held-out set")
        (args.out / f"train-{n}.jsonl").write_bytes(b"".join(rest[:n]))
        print(f"{args.out}/train-{n}.jsonl: {n} records")
    print(f"{args.out}/heldout.jsonl: {len(heldout)} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
