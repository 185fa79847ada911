"""The generate stage against real vLLM (CPU) servers on SmolLM2: worker.sh end to end, resume, failures, quoting."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from dflashkit.io import iter_jsonl
from tests.helpers.procs import kill_when, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "worker.sh"
GENERATE = REPO / "server_generate.py"
MODES = ["enabled", "disabled", "adaptive"]


def jsonl(path: Path) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)] if path.exists() else []


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def prompt_dir(prepared, tmp_path_factory) -> Path:
    """6 two-turn MT-Bench questions + 6 short real ShareGPT conversations, as two files of one input directory."""
    root = tmp_path_factory.mktemp("prompts")
    mtbench = jsonl(prepared["mtbench"])[:6]
    sharegpt = [r for r in jsonl(prepared["sharegpt"])[:200] if len(json.dumps(r)) < 1500][:6]
    write_jsonl(root / "a_mtbench.jsonl", mtbench)
    write_jsonl(root / "b_sharegpt.jsonl", sharegpt)
    return root


def tokenize_count(server, messages, kwargs) -> int:
    body = {"model": server.model, "messages": messages, "add_generation_prompt": True}
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    r = httpx.post(f"{server.url}/tokenize", json=body, headers={"Authorization": f"Bearer {server.api_key}"})
    r.raise_for_status()
    return r.json()["count"]


def run_worker(env, *extra, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(WORKER), *extra], env=env, capture_output=True, text=True, timeout=timeout)


def test_worker_two_shards_thinking_modes(prompt_dir, tmp_path, worker_env, vllm_server):
    out = tmp_path / "gen"
    key = secrets.token_urlsafe(24)
    # The chat template travels through VLLM_SERVE_EXTRA_ARGS from a path with spaces: the server only starts if the
    # quoted argument arrived as one word.
    spaced = tmp_path / "dir with spaces" / "thinking template.jinja"
    spaced.parent.mkdir()
    shutil.copy(REPO / "configs/templates/smollm2-thinking.jinja", spaced)
    base = worker_env()
    env = worker_env(
        INPUT=str(prompt_dir), OUTPUT_DIR=str(out), NUM_SHARDS="2", THINKING_MODES=",".join(MODES),
        MAX_TOKENS="12", TEMPERATURE="0", SEED="1", API_KEY=key,
        VLLM_SERVE_EXTRA_ARGS=base["VLLM_SERVE_EXTRA_ARGS"].rsplit("--chat-template", 1)[0]
        + f"--chat-template '{spaced}'",
    )
    # Shard 1 runs two servers in its task, as small-TP models do on an 8-GPU node; the client spreads over both.
    for shard, servers in (("0", "1"), ("1", "2")):
        res = run_worker({**env, "SHARD_ID": shard, "SERVERS_PER_NODE": servers}, "--", "--no-progress")
        assert res.returncode == 0, res.stderr[-3000:]
    for i in range(2):
        server_log = (out / "logs" / f"server-local_1-{i}.log").read_text()
        assert "POST /v1/chat/completions" in server_log

    # A requeued or resubmitted task of a finished shard exits at once, without starting a server.
    t0 = time.monotonic()
    again = run_worker({**env, "SHARD_ID": "0"})
    assert again.returncode == 0 and "shard already done" in again.stderr
    assert "starting vllm server" not in again.stderr and time.monotonic() - t0 < 30

    inputs = jsonl(prompt_dir / "a_mtbench.jsonl") + jsonl(prompt_dir / "b_sharegpt.jsonl")
    records = []
    for shard in range(2):
        marker = json.loads((out / f"shard-{shard:05d}-of-00002.done.json").read_text())
        c = marker["counts"]
        assert c["input"] == sum(1 for i in range(len(inputs)) if i % 2 == shard)
        assert c["written"] + c["skipped"] + c["errors"] == c["input"] and c["written"] == c["input"]
        shard_records = jsonl(out / f"shard-{shard:05d}-of-00002.jsonl")
        assert {r["generation"]["index"] % 2 for r in shard_records} == {shard}
        records += shard_records

    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == len(inputs)
    # Modes follow the global index, so the split is even over the whole input whatever the shard count.
    assert all(r["thinking_mode"] == MODES[r["generation"]["index"] % 3] for r in records)
    assert Counter(r["thinking_mode"] for r in records) == Counter({m: 4 for m in MODES})
    # Extra input fields survive; every user turn got a fresh reply.
    by_id = {r["id"]: r for r in records}
    assert by_id["mtbench-81"]["category"] == "writing"
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and len(r["generation"]["turns"]) == roles.count("user")

    # The kwargs reached the chat template: the server's prompt token count for the first turn equals /tokenize of
    # the same messages with the recorded kwargs, and differs from the count without them.
    for r in records:
        first = r["messages"][: [m["role"] for m in r["messages"]].index("user") + 1]
        kwargs = r["generation"]["chat_template_kwargs"]
        assert kwargs == {"thinking_mode": r["thinking_mode"]}
        with_kwargs = tokenize_count(vllm_server, first, kwargs)
        assert r["generation"]["turns"][0]["prompt_tokens"] == with_kwargs
        if r["thinking_mode"] != "adaptive":
            assert with_kwargs > tokenize_count(vllm_server, first, None)

    # The per-job key never reaches a log or an output file.
    for path in out.rglob("*"):
        if path.is_file():
            assert key not in path.read_text(errors="replace"), path


def test_sharegpt_output_and_per_record_errors(vllm_server, tmp_path):
    long_prompt = "tell me more " * 1500  # ~4500 tokens: over --max-model-len 4096, so the server answers 400
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "ok", "source": "unit", "conversations": [{"from": "human", "value": "Say hi."},
                                                         {"from": "gpt", "value": "old reply"}]},
        {"id": "no-user", "conversations": [{"from": "gpt", "value": "only me"}]},
        {"id": "too-long", "messages": [{"role": "user", "content": long_prompt}]},
    ])
    out = tmp_path / "gen"
    env = {**os.environ, "OPENAI_API_KEY": vllm_server.api_key}
    res = subprocess.run([sys.executable, str(GENERATE), "--input", str(inp), "--output-dir", str(out), "--model",
                          vllm_server.model, "--base-url", f"{vllm_server.url}/v1", "--output-format", "sharegpt",
                          "--max-tokens", "8", "--no-progress"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    [rec] = jsonl(out / "shard-00000-of-00001.jsonl")
    assert rec["id"] == "ok" and rec["source"] == "unit" and "messages" not in rec
    assert [t["from"] for t in rec["conversations"]] == ["human", "gpt"]
    assert rec["conversations"][1]["value"] != "old reply" and rec["thinking_mode"] is None
    errors = {e["id"]: e for e in jsonl(out / "shard-00000-of-00001.errors.jsonl")}
    assert errors["no-user"]["kind"] == "skipped" and errors["no-user"]["reason"] == "no_user_turn"
    assert errors["too-long"]["kind"] == "error" and errors["too-long"]["reason"] == "http_400"
    marker = json.loads((out / "shard-00000-of-00001.done.json").read_text())
    assert marker["counts"] == {"input": 3, "written": 1, "skipped": 1, "errors": 1}
    assert "too-long" in res.stderr and "http_400" in res.stderr  # one clear line naming the record


def test_resume_after_kill(vllm_server, prepared, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": f"q{i}", "messages": [{"role": "user", "content": f"Write a sentence about the number {i}."}]}
        for i in range(8)])
    out = tmp_path / "gen"
    shard = out / "shard-00000-of-00001.jsonl"
    cmd = [sys.executable, str(GENERATE), "--input", str(inp), "--output-dir", str(out), "--model",
           vllm_server.model, "--base-url", f"{vllm_server.url}/v1", "--max-tokens", "24", "--concurrency", "1",
           "--no-progress"]
    env = {**os.environ, "OPENAI_API_KEY": vllm_server.api_key}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: len(jsonl(shard)) >= 2, timeout=120, every=0.2)
    before = len(jsonl(shard))
    assert 2 <= before < 8, "the kill must land mid-shard"
    assert not (out / "shard-00000-of-00001.done.json").exists()
    with open(shard, "a") as f:  # what a crash in the middle of a write leaves
        f.write('{"id": "q7", "messages": [{"role": "us')

    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torn last line" in res.stderr
    ids = [r["id"] for r in jsonl(shard)]
    assert sorted(ids) == [f"q{i}" for i in range(8)] and len(ids) == len(set(ids))
    assert shard.read_text().endswith("\n")
    marker = json.loads((out / "shard-00000-of-00001.done.json").read_text())
    assert marker["counts"] == {"input": 8, "written": 8, "skipped": 0, "errors": 0}

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already done" in again.stderr
    assert [r["id"] for r in jsonl(shard)] == ids


def _server_processes(name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"api_server .*--served-model-name {name}"], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def test_startup_timeout_stops_the_server(prompt_dir, tmp_path, worker_env):
    name = f"timeout-{secrets.token_hex(4)}"
    env = worker_env(INPUT=str(prompt_dir), OUTPUT_DIR=str(tmp_path / "gen"), SERVER_STARTUP_TIMEOUT="3",
                     SERVED_MODEL_NAME=name)
    t0 = time.monotonic()
    res = run_worker(env)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "not healthy after 3s" in res.stderr
    assert _server_processes(name) == []


def test_sigterm_to_the_worker_alone_stops_it_during_startup(prompt_dir, tmp_path, worker_env):
    """Slurm signals the whole job, but an operator may `kill` just the worker: it must not wait out the startup."""
    name = f"term-{secrets.token_hex(4)}"
    env = worker_env(INPUT=str(prompt_dir), OUTPUT_DIR=str(tmp_path / "gen"), SERVED_MODEL_NAME=name)
    proc = subprocess.Popen(["bash", str(WORKER)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for(lambda: _server_processes(name), timeout=60)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    code = proc.wait(timeout=90)
    assert code == 143 and time.monotonic() - t0 < 45, proc.stdout.read()[-2000:]
    assert _server_processes(name) == []


def test_server_dies_at_startup_and_extra_args_are_never_executed(prompt_dir, tmp_path, worker_env):
    markers = [tmp_path / f"pwned{i}" for i in range(3)]
    hostile = (f"--no-such-flag ; touch {markers[0]} $(touch {markers[1]}) `touch {markers[2]}` "
               "'$HOME' \"&&\" id")
    env = worker_env(INPUT=str(prompt_dir), OUTPUT_DIR=str(tmp_path / "gen"), VLLM_SERVE_EXTRA_ARGS=hostile)
    t0 = time.monotonic()
    res = run_worker(env)
    assert res.returncode != 0 and time.monotonic() - t0 < 120
    assert "exited before becoming healthy" in res.stderr
    # vLLM's own argument parser saw the words exactly as written: nothing expanded, nothing run. (That a quoted
    # argument with spaces arrives as one word is shown by the chat-template path in the two-shard test.)
    # (vLLM takes the lone ";" as its positional model tag, so the message starts after it.)
    assert f"touch {markers[0]} $(touch {markers[1]}) `touch {markers[2]}` $HOME && id" in res.stderr
    assert not any(m.exists() for m in markers)


def test_server_death_while_generating(prompt_dir, tmp_path, worker_env):
    """The server is killed mid-shard: the worker fails within 60 s; a second worker run (a fresh server) resumes
    the shard, keeps what was written, and completes it with every conversation exactly once."""
    n = 6
    name = f"dies-{secrets.token_hex(4)}"
    key = secrets.token_urlsafe(24)
    big = write_jsonl(tmp_path / "many.jsonl", [
        {"id": f"c{i}", "messages": [{"role": "user", "content": f"Count slowly to {i + 50}."}]} for i in range(n)])
    env = worker_env(INPUT=str(big), OUTPUT_DIR=str(tmp_path / "gen"), SERVED_MODEL_NAME=name, API_KEY=key,
                     MAX_TOKENS="16", CONCURRENCY="2")
    shard = tmp_path / "gen" / "shard-00000-of-00001.jsonl"
    log = tmp_path / "worker.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(WORKER), "--", "--no-progress"], env=env, stdout=f, stderr=f)
    deadline = time.monotonic() + 300
    while not (shard.exists() and shard.read_bytes().count(b"\n") >= 1) and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]  # kill once a conversation is on disk: mid-shard
        time.sleep(0.2)
    # No process shows the key on its command line.
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert key.encode() not in cmdline.read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    [server_pid, *_] = sorted(_server_processes(name))
    os.kill(server_pid, signal.SIGKILL)
    t0 = time.monotonic()
    code = proc.wait(timeout=120)
    assert code != 0 and time.monotonic() - t0 < 60
    text = log.read_text()
    assert "died while generating" in text
    assert not (tmp_path / "gen" / "shard-00000-of-00001.done.json").exists()
    assert _server_processes(name) == []
    assert key not in text

    kept = [obj["id"] for obj in jsonl(shard)]
    assert 1 <= len(kept) < n
    again = run_worker(env, "--", "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {len(kept)} conversations already in" in again.stdout + again.stderr
    ids = [obj["id"] for obj in jsonl(shard)]
    assert ids[:len(kept)] == kept, "the conversations written before the death are kept as they were"
    assert sorted(ids) == sorted(f"c{i}" for i in range(n)), "every conversation exactly once"
    marker = json.loads((tmp_path / "gen" / "shard-00000-of-00001.done.json").read_text())
    assert marker["counts"] == {"input": n, "written": n, "skipped": 0, "errors": 0}
    assert _server_processes(name) == []
