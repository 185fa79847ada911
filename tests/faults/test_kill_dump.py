"""SIGKILL of the dump (HF backend, SmolLM2) at seeded random points. After each kill every `.pt` under its final
name loads and validates (a partial file is never taken for a finished one) and there is no marker; the rerun resumes
the finished records, writes the rest, and the result equals an uninterrupted dump record for record, bit for bit."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest_dump import good_records, write_shard
from faultlib import SEED, report, rounds

from dflashkit.dump import list_dump_records, load_dump_record, read_meta
from dflashkit.dump.format import RECORD_KEYS
from dflashkit.dump.run import main as dump_main
from dflashkit.prepare import model_dir

REPO = Path(__file__).resolve().parents[2]
N = 4  # a CPU dumps one SmolLM2 record in seconds; the long run adds rounds, not records
DONE = "shard-00000-of-00001.done.json"


def args(gen: Path, out: Path) -> list[str]:
    return ["--model", str(model_dir()), "--input", str(gen), "--output-dir", str(out), "--chat-template",
            "smollm2-thinking-train", "--max-seq-len", "512", "--no-progress"]


def test_kill_dump_at_random_points(prepared, tmp_path):
    gen = write_shard(tmp_path / "generate", good_records(0, N))
    reference = tmp_path / "reference"
    assert dump_main(args(gen, reference), backend="hf") == 0
    expected = {p.name: load_dump_record(p) for p in list_dump_records(reference)}
    assert len(expected) == N
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    faults = checked = lost = duplicated = partial_seen = 0
    for r in range(rounds("dump")):
        rng = random.Random(SEED * 1_000_003 + 7919 + r)
        out = tmp_path / f"round{r}"
        for _ in range(rng.randint(1, 2)):
            target = rng.randint(0, N - 1)
            proc = subprocess.Popen([sys.executable, str(REPO / "compute_hidden_states_hf.py"), *args(gen, out)],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while (len(list_dump_records(out)) if out.exists() else 0) < target and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.5))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            faults += 1
            assert not (out / DONE).exists()
            partial_seen += len(list(out.glob(".*.tmp"))) if out.exists() else 0
            meta = read_meta(out) if (out / "meta.json").exists() else None
            for path in list_dump_records(out) if out.exists() else []:
                load_dump_record(path, meta)  # whatever is under a final name is complete
        before = len(list_dump_records(out)) if out.exists() else 0
        assert dump_main(args(gen, out), backend="hf") == 0
        meta = read_meta(out)
        assert meta["counts"]["written"] == N and meta["counts"]["resumed"] == before
        files = list_dump_records(out)
        names = [p.name for p in files]
        checked += len(names)
        lost += len(set(expected) - set(names))
        duplicated += len(names) - len(set(names))
        assert sorted(names) == sorted(expected)
        for path in files:
            rec = load_dump_record(path, meta)
            assert all(torch.equal(rec[k], expected[path.name][k]) for k in RECORD_KEYS[:4]), path.name
    report("kill_dump", rounds=rounds("dump"),
           faults_injected=faults, records_checked=checked, lost=lost, duplicated=duplicated,
           temp_files_left_by_kills=partial_seen)
    assert faults >= 1
