"""Disk full during a write (a size-limited tmpfs): the stage fails non-zero within a bounded time with the OS's
reason, leaves nothing that looks done (no marker; every file under a final name complete), and once space is freed
(the tmpfs remounted bigger) a rerun finishes with every record exactly once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from faultlib import report
from test_kill_train import STEPS, losses, overrides

from dflashkit.dump import list_dump_records, load_dump_record, read_meta
from dflashkit.io import iter_jsonl
from dflashkit.prepare import model_dir
from dflashkit.train.checkpoint import latest_checkpoint
from tests.helpers.dumps import good_records, write_shard

REPO = Path(__file__).resolve().parents[2]
SHARD = "shard-00000-of-00001"


def grow(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The stage failed with exit 1 and said why in exactly one ERROR log line, without a traceback."""
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line]
    assert res.returncode == 1 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    return errors[0]


def test_generate_disk_full(vllm_server, small_disk, tmp_path):
    # The disk fills after ~3 records, while the reader still has more than the client's queue (4 x concurrency)
    # to hand out: a crashed writer must fail the shard, not leave the reader blocked on a full queue (it did).
    n = 12
    inp = tmp_path / "in.jsonl"
    padding = "Please answer briefly. " * 130  # ~3 kB per record, one shared prefix (cached by the server)
    inp.write_text("".join(json.dumps({"id": f"d{i}", "messages": [
        {"role": "user", "content": f"{padding}What is {i} plus one?"}]}) + "\n" for i in range(n)))
    disk = small_disk("8k")
    out = disk / "gen"
    cmd = [sys.executable, str(REPO / "server_generate.py"), "--input", str(inp), "--output-dir", str(out),
           "--model", vllm_server.model, "--base-url", f"{vllm_server.url}/v1", "--max-tokens", "4",
           "--temperature", "0", "--concurrency", "1", "--no-progress"]
    env = {**os.environ, "OPENAI_API_KEY": vllm_server.api_key}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode != 0
    assert "No space left on device" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not (out / f"{SHARD}.done.json").exists()

    grow(disk, "4m")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    ids = [obj["id"] for _, obj in iter_jsonl(out / f"{SHARD}.jsonl")]
    assert sorted(ids) == sorted(f"d{i}" for i in range(n))
    marker = json.loads((out / f"{SHARD}.done.json").read_text())
    assert marker["counts"] == {"input": n, "written": n, "skipped": 0, "errors": 0}
    report("disk_full_generate", faults_injected=1, records_checked=len(ids), lost=n - len(set(ids)),
           duplicated=len(ids) - len(set(ids)))


def test_dump_disk_full(prepared, small_disk, tmp_path):
    n = 6
    gen = write_shard(tmp_path / "generate", good_records(0, n))
    disk = small_disk("1m")  # one record is ~0.7 MB: the second cannot be written
    out = disk / "dump"
    cmd = [sys.executable, str(REPO / "compute_hidden_states_hf.py"), "--model", str(model_dir()), "--input",
           str(gen), "--output-dir", str(out), "--chat-template", "smollm2-thinking-train", "--max-seq-len", "512",
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    line = one_error_line(res)
    assert f"dump {SHARD}: [Errno 28] No space left on device: '{out}/conv-" in line and line.endswith(".pt'"), line
    assert not (out / f"{SHARD}.done.json").exists()
    assert not list(out.glob(".*.tmp")), "the failed write's temp file is removed"
    first = list_dump_records(out)
    for path in first:
        load_dump_record(path)

    grow(disk, "64m")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    meta = read_meta(out)
    assert meta["counts"]["written"] == n and meta["counts"]["resumed"] == len(first)
    names = [p.name for p in list_dump_records(out)]
    assert sorted(names) == sorted(f"conv-{i}.pt" for i in range(n))
    for path in list_dump_records(out):
        load_dump_record(path, meta)
    report("disk_full_dump", faults_injected=1, records_checked=len(names), lost=n - len(set(names)),
           duplicated=len(names) - len(set(names)))


def test_train_disk_full(smollm2_dump, small_disk, tmp_path):
    disk = small_disk("16m")  # a checkpoint is ~27 MB (weights 9 MB, AdamW state 18 MB): the first one cannot be written
    out = disk / "train"
    cmd = [sys.executable, str(REPO / "train_dflash.py"), "--resume", *overrides(smollm2_dump, out, 2)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    line = one_error_line(res)
    assert f"train stopped: [Errno 28] No space left on device: '{out}/checkpoints/step-00000002'" in line, line
    assert latest_checkpoint(out / "checkpoints") is None, "no checkpoint is marked complete"
    assert not list((out / "checkpoints").glob(".*")), "the partial checkpoint is removed (its space freed)"

    grow(disk, "128m")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    latest = latest_checkpoint(out / "checkpoints")
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == STEPS
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    report("disk_full_train", faults_injected=1, steps_checked=STEPS)


def test_train_metrics_disk_full(smollm2_dump, small_disk, tmp_path):  # noqa: F811
    # One 4 kB page: ~13 rows of metrics.jsonl fit, so it fills some 13 steps into a 16-step run, before the only
    # checkpoint (the last step's).
    steps = 16
    disk = small_disk("4k")
    out = disk / "train"
    cmd = [sys.executable, str(REPO / "train_dflash.py"), "--resume", *overrides(smollm2_dump, out, 1000),
           f"optim.max_steps={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    line = one_error_line(res)
    assert line.endswith(f"train stopped: [Errno 28] No space left on device: '{out}/metrics.jsonl'"), line
    data = (out / "metrics.jsonl").read_bytes()
    rows = [json.loads(x) for x in data.splitlines()]  # nothing torn: every line whole
    assert data.endswith(b"\n") and [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) < steps
    assert latest_checkpoint(out / "checkpoints") is None

    grow(disk, "128m")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(losses(out)) == list(range(1, steps + 1))
    report("disk_full_train_metrics", faults_injected=1, rows_before_full=len(rows), steps_checked=steps)
