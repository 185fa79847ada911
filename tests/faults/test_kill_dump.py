"""SIGKILL of the dump (HF backend, SmolLM2) at seeded random points. After each kill every `.pt` under its final
name loads and validates (a partial file is never taken for a finished one) and there is no marker, or (the kill
landed after the marker, in the dump's exit) the whole shard is there; the rerun resumes the finished records, writes
the rest, and the result equals an uninterrupted dump record for record, bit for bit."""
from __future__ import annotations

import json
import os
import random
import sys
from functools import partial
from pathlib import Path

import torch
from faultlib import SEED, Stage, inject_kill, report, rounds

from dflashkit.dump import list_dump_records, load_dump_record, read_meta
from dflashkit.dump.format import RECORD_KEYS
from dflashkit.dump.run import main as dump_main
from dflashkit.prepare import model_dir
from tests.helpers.dumps import good_records, write_shard

REPO = Path(__file__).resolve().parents[2]
N = 4  # a CPU dumps one SmolLM2 record in seconds; the long run adds rounds, not records
DONE = "shard-00000-of-00001.done.json"


def args(gen: Path, out: Path) -> list[str]:
    return ["--model", str(model_dir()), "--input", str(gen), "--output-dir", str(out), "--chat-template",
            "smollm2-thinking-train", "--max-seq-len", "512", "--no-progress"]


def records_equal(out: Path, expected: dict, meta: dict | None) -> list[str]:
    """Every record under a final name loads and validates; those of `expected` equal it bitwise. Their names."""
    files = list_dump_records(out)
    for path in files:
        rec = load_dump_record(path, meta)
        assert all(torch.equal(rec[k], expected[path.name][k]) for k in RECORD_KEYS[:4]), path.name
    return [p.name for p in files]


def whole_shard(out: Path, expected: dict) -> None:
    """What a done-marker promises: the counts reconcile, every record is there and equals the reference."""
    counts = json.loads((out / DONE).read_text())["counts"]
    assert counts["input"] == N and counts["written"] + counts["skipped"] + counts["errors"] == N, counts
    assert counts["written"] == N and sorted(records_equal(out, expected, read_meta(out))) == sorted(expected)


def test_kill_dump_at_random_points(prepared, tmp_path):
    gen = write_shard(tmp_path / "generate", good_records(0, N))
    reference = tmp_path / "reference"
    assert dump_main(args(gen, reference), backend="hf") == 0
    expected = {p.name: load_dump_record(p) for p in list_dump_records(reference)}
    assert len(expected) == N
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    stage = Stage(progress=lambda out: len(list_dump_records(out)), done=lambda out: (out / DONE).exists(),
                  complete=partial(whole_shard, expected=expected))
    faults = checked = lost = duplicated = partial_seen = late = 0
    for r in range(rounds("dump")):
        rng = random.Random(SEED * 1_000_003 + 7919 + r)
        out = tmp_path / f"round{r}"
        cmd = [sys.executable, str(REPO / "compute_hidden_states_hf.py"), *args(gen, out)]
        for _ in range(rng.randint(1, 2)):
            late += inject_kill(cmd, env, stage, out, rng, (0, N - 1), 0.5, tmp_path / "dump.log")
            faults += 1
            partial_seen += len(list(out.glob(".*.tmp"))) if out.exists() else 0
            meta = read_meta(out) if (out / "meta.json").exists() else None
            records_equal(out, expected, meta)  # whatever is under a final name is complete
        before = len(list_dump_records(out)) if out.exists() else 0
        assert dump_main(args(gen, out), backend="hf") == 0
        meta = read_meta(out)
        assert meta["counts"]["written"] == N and meta["counts"]["resumed"] == before
        names = records_equal(out, expected, meta)
        checked += len(names)
        lost += len(set(expected) - set(names))
        duplicated += len(names) - len(set(names))
        assert sorted(names) == sorted(expected)
    report("kill_dump", rounds=rounds("dump"),
           faults_injected=faults, records_checked=checked, lost=lost, duplicated=duplicated,
           temp_files_left_by_kills=partial_seen, late_kill_points_redrawn=late)
    assert faults >= 1
