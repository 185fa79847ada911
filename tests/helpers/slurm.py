"""The test cluster (.ci/slurm/setup.sh) from the tests' side: is it up, `dflashkit` as a subprocess, a run's
status, waiting until a run settles, Slurm's accounting of a job, a stage's records."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from dflashkit.io import iter_jsonl
from dflashkit.recipe import ROOT

DEMO = ROOT / "configs" / "smollm2-demo.yaml"


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client tools are not installed (run `bash .ci/slurm/setup.sh` as root)"
    proc = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix,alloc", "-o", "%N"], capture_output=True, text=True,
                          check=False)
    nodes = set(proc.stdout.split())
    if proc.returncode != 0 or len(nodes) < 2:
        return f"no 2-node Slurm cluster up (sinfo: {proc.stdout.strip() or proc.stderr.strip()})"
    return None


def dflashkit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dflashkit.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"dflashkit {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def status(run_dir: Path) -> dict:
    return json.loads(dflashkit("status", str(run_dir), "--json", check=False).stdout)


def shard_states(st: dict, stage: str) -> list[str]:
    return [s["state"] for s in st["stages"][stage]["shards"]]


def settled(run_dir: Path) -> dict | None:
    """The run's status once no job of it is queued or running. Polls squeue (cheap: the cores are shared with the
    servers under test), then asks `dflashkit status` once."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ids = ",".join(sub["job_id"] for stage in manifest["stages"].values() for sub in stage["submissions"])
    queued = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i"], capture_output=True, text=True, check=False)
    if queued.returncode == 0 and queued.stdout.strip():  # non-zero: ids the controller has already forgotten
        return None
    st = status(run_dir)
    active = [s for stage in st["stages"].values() for s in stage["shards"] if s["state"] in ("running", "pending")]
    return None if active else st


def sacct_job(job_id: str) -> dict:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,Start,End,Reason"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line]
    return {r[0]: {"state": r[1].split()[0], "start": r[2], "end": r[3], "reason": r[4]} for r in rows}


def records(out_dir: Path) -> dict[str, dict]:
    recs: dict[str, dict] = {}
    for path in sorted(out_dir.glob("shard-*-of-*.jsonl")):
        if path.name.endswith(".errors.jsonl"):
            continue
        for _, rec in iter_jsonl(path):
            assert rec["id"] not in recs, f"{rec['id']} appears twice"
            recs[rec["id"]] = rec
    return recs
