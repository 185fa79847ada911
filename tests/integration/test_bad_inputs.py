"""The bad-input corpus (tests/data/bad/) through the real generate stage (session vLLM server) and the dump (HF
backend, in-process): every bad record gets exactly one error line and one log line naming its id and reason, every
other record is processed, and the counts reconcile. Server-side failures: a 4xx (max_tokens beyond the context) is a
permanent per-record error; a timeout and a 5xx are retryable (exit 75, no marker) and a rerun finishes the shard.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dflashkit.dump import list_dump_records, load_dump_record, read_meta
from dflashkit.dump.run import main as dump_main
from dflashkit.io import iter_jsonl
from dflashkit.prepare import model_dir

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BAD = REPO / "tests" / "data" / "bad"
GENERATE = REPO / "server_generate.py"
SHARD = "shard-00000-of-00001"

# prompts.jsonl line -> (kind, reason) for every line that must not be written; every other record line is written.
PROMPT_FAILURES = {
    2: ("skipped", "bad_json"), 3: ("skipped", "bad_encoding"), 4: ("skipped", "bad_type"),
    5: ("skipped", "missing_key"), 6: ("skipped", "no_user_turn"), 7: ("skipped", "no_user_turn"),
    8: ("skipped", "unknown_role"), 9: ("skipped", "bad_type"), 10: ("skipped", "non_text_content"),
    11: ("skipped", "ambiguous"), 12: ("skipped", "bad_type"), 13: ("skipped", "bad_type"),
    14: ("skipped", "bad_type"), 15: ("skipped", "missing_key"), 16: ("skipped", "duplicate_id"),
    23: ("error", "http_400"),  # ~4500 tokens: over the server's --max-model-len 4096
}
PROMPT_WRITTEN = {1: "good-plain", 17: "non-alternating", 18: "../../escape", 19: "dir/sub/name", 20: "nul\0byte",
                  21: "..", 22: "x" * 300, 24: "7", 26: None}  # line -> the input's own id (None: none given)
# generated.jsonl line -> (kind, reason); line 1 is the one good record.
GENERATED_FAILURES = {
    2: ("skipped", "bad_json"), 3: ("skipped", "bad_encoding"), 4: ("skipped", "missing_key"),
    5: ("skipped", "missing_key"), 6: ("skipped", "bad_id"), 7: ("skipped", "bad_id"), 8: ("skipped", "bad_id"),
    9: ("skipped", "bad_id"), 10: ("skipped", "bad_type"), 11: ("skipped", "unknown_role"),
    12: ("skipped", "role_order"), 13: ("skipped", "empty"), 14: ("skipped", "no_assistant_turn"),
    15: ("skipped", "missing_key"), 16: ("skipped", "duplicate_id"), 17: ("skipped", "too_long"),
    18: ("skipped", "bad_type"),
}


def jsonl(path: Path) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)] if path.exists() else []


def generate(server_url: str, api_key: str, model: str, inp: Path, out: Path, *extra: str, umask: int = 0o022):
    cmd = [sys.executable, str(GENERATE), "--input", str(inp), "--output-dir", str(out), "--model", model,
           "--base-url", f"{server_url}/v1", "--max-tokens", "8", "--temperature", "0", "--no-progress", *extra]
    return subprocess.run(cmd, env={**os.environ, "OPENAI_API_KEY": api_key}, capture_output=True, text=True,
                          timeout=600, preexec_fn=lambda: os.umask(umask), check=False)


def error_log_lines(stderr: str, cid: str) -> list[str]:
    return [line for line in stderr.splitlines() if f"conversation {cid} (" in line]


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def assert_not_world_writable(root: Path) -> None:
    """The stages' output files stay 0644 even under a permissive umask (the corpus runs use umask 0)."""
    loose = {str(p): oct(p.stat().st_mode & 0o777) for p in files_under(root) if p.stat().st_mode & 0o022}
    assert loose == {}, f"group/world-writable output files: {loose}"


@pytest.fixture(scope="module")
def corpus_run(vllm_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "gen"
    res = generate(vllm_server.url, vllm_server.api_key, vllm_server.model, BAD / "prompts.jsonl", out, umask=0)
    return out, res


def test_generate_corpus_one_error_line_each_rest_written(corpus_run):
    out, res = corpus_run
    assert res.returncode == 0, res.stderr[-3000:]
    records = sum(1 for line in (BAD / "prompts.jsonl").read_bytes().splitlines() if line.strip())
    errors = jsonl(out / f"{SHARD}.errors.jsonl")
    by_line = {int(e["source"].rsplit(":", 1)[1]): e for e in errors}
    assert len(by_line) == len(errors), "one error line per failed record"
    assert {n: (e["kind"], e["reason"]) for n, e in by_line.items()} == PROMPT_FAILURES
    for e in errors:
        assert e["stage"] == "generate" and e["id"] and e["detail"]
        # ...and exactly one log line naming the record and its reason
        [line] = error_log_lines(res.stderr, e["id"])
        assert e["reason"] in line and e["source"] in line

    written = jsonl(out / f"{SHARD}.jsonl")
    ids = [r["id"] for r in written]
    assert len(ids) == len(set(ids)) == len(PROMPT_WRITTEN)
    assert not set(ids) & {e["id"] for e in errors}
    by_source_id = {r.get("source_id", r["id"]): r for r in written}
    for line, raw in PROMPT_WRITTEN.items():
        rec = by_source_id[raw] if raw is not None else next(r for r in written if r["id"] == f"prompts-{line}")
        # Ids are safe single path components; the original is kept when it had to change.
        assert "/" not in rec["id"] and "\0" not in rec["id"] and not rec["id"].startswith(".")
        assert len(rec["id"]) <= 128 and rec["messages"][-1]["role"] == "assistant"
    assert by_source_id["non-alternating"]["generation"]["repairs"], "the role repairs are recorded"
    assert [m["role"] for m in by_source_id["non-alternating"]["messages"]] == ["user", "assistant"] * 2
    assert by_source_id["7"]["messages"][0] == {"role": "system", "content": "Be brief.\n\nBe kind."}

    marker = json.loads((out / f"{SHARD}.done.json").read_text())
    c = marker["counts"]
    assert c == {"input": records, "written": len(PROMPT_WRITTEN), "skipped": 15, "errors": 1}
    assert c["written"] + c["skipped"] + c["errors"] == c["input"]
    # Nothing was written outside the output dir, whatever the ids said.
    assert {p.name for p in files_under(out)} == {f"{SHARD}.jsonl", f"{SHARD}.errors.jsonl", f"{SHARD}.done.json"}
    assert_not_world_writable(out)


def test_dump_of_corpus_output_and_bad_generated_records(corpus_run, tmp_path):
    out, res = corpus_run
    assert res.returncode == 0
    gen = tmp_path / "generate"
    gen.mkdir()
    shutil.copy(out / f"{SHARD}.jsonl", gen)
    shutil.copy(out / f"{SHARD}.done.json", gen)
    shutil.copy(BAD / "generated.jsonl", gen / "zz-generated.jsonl")  # sorted after the shard file
    dump = tmp_path / "dump"
    args = ["--model", str(model_dir()), "--input", str(gen), "--output-dir", str(dump), "--chat-template",
            "smollm2-thinking-train", "--max-seq-len", "512", "--no-progress"]
    old_umask = os.umask(0)
    try:
        assert dump_main(args, backend="hf") == 0
    finally:
        os.umask(old_umask)

    generated = jsonl(out / f"{SHARD}.jsonl")
    errors = jsonl(dump / f"{SHARD}.errors.jsonl")
    by_line = {int(e["source"].rsplit(":", 1)[1]): e for e in errors}
    assert all(e["source"].startswith("zz-generated.jsonl:") for e in errors)
    assert len(by_line) == len(errors)
    assert {n: (e["kind"], e["reason"]) for n, e in by_line.items()} == GENERATED_FAILURES
    meta = read_meta(dump)
    total = len(generated) + len(GENERATED_FAILURES) + 1
    skipped = sum(1 for k, _ in GENERATED_FAILURES.values() if k == "skipped")
    assert meta["counts"] == {"input": total, "written": len(generated) + 1, "skipped": skipped,
                              "errors": len(GENERATED_FAILURES) - skipped, "resumed": 0}
    # Every written record is a complete, valid file named by its safe id, inside the dump dir only.
    names = sorted(p.name for p in list_dump_records(dump))
    assert names == sorted([r["id"] + ".pt" for r in generated] + ["gen-good.pt"])
    for path in list_dump_records(dump):
        load_dump_record(path, meta)
    assert all(p.resolve().parent == dump.resolve() for p in files_under(dump))
    assert_not_world_writable(dump)


def test_max_tokens_beyond_the_context_is_a_permanent_error(vllm_server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "big-ask", "messages": [{"role": "user", "content": "Say hi."}]}) + "\n")
    res = generate(vllm_server.url, vllm_server.api_key, vllm_server.model, inp, tmp_path / "gen",
                   "--max-tokens", "100000")
    assert res.returncode == 0, res.stderr[-3000:]
    [err] = jsonl(tmp_path / "gen" / f"{SHARD}.errors.jsonl")
    assert (err["id"], err["kind"], err["reason"]) == ("big-ask", "error", "http_400")
    assert "max" in err["detail"].lower()  # the server's own reason travels in the detail
    assert len(error_log_lines(res.stderr, "big-ask")) == 1
    marker = json.loads((tmp_path / "gen" / f"{SHARD}.done.json").read_text())
    assert marker["counts"] == {"input": 1, "written": 0, "skipped": 0, "errors": 1}


def test_timeout_is_retryable_and_a_rerun_finishes(vllm_server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": f"Count to {i}."}]})
                           + "\n" for i in range(3)))
    out = tmp_path / "gen"
    res = generate(vllm_server.url, vllm_server.api_key, vllm_server.model, inp, out,
                   "--request-timeout", "0.001", "--max-retries", "0")
    assert res.returncode == 75, res.stderr[-3000:]
    assert not (out / f"{SHARD}.done.json").exists()
    errors = jsonl(out / f"{SHARD}.errors.jsonl")
    assert sorted((e["id"], e["kind"], e["reason"]) for e in errors) == [(f"t{i}", "retryable", "timeout")
                                                                        for i in range(3)]
    assert all(len(error_log_lines(res.stderr, f"t{i}")) == 1 for i in range(3))
    assert "rerun the shard" in res.stderr

    again = generate(vllm_server.url, vllm_server.api_key, vllm_server.model, inp, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(r["id"] for r in jsonl(out / f"{SHARD}.jsonl")) == ["t0", "t1", "t2"]
    assert jsonl(out / f"{SHARD}.errors.jsonl") == []  # the errors file describes the last attempt
    assert json.loads((out / f"{SHARD}.done.json").read_text())["counts"]["written"] == 3


class _Always503(BaseHTTPRequestHandler):
    hits = 0

    def do_POST(self):
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error": {"message": "overloaded", "type": "server_error"}}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_5xx_is_retried_then_retryable(tmp_path):
    """A server that answers 503 (an overloaded or dying engine): the client retries it, then the shard exits 75."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        inp = tmp_path / "in.jsonl"
        inp.write_text(json.dumps({"id": "busy", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
        res = generate(f"http://127.0.0.1:{httpd.server_port}", "k", "m", inp, tmp_path / "gen", "--max-retries", "1")
    finally:
        httpd.shutdown()
    assert res.returncode == 75, res.stderr[-3000:]
    assert _Always503.hits == 2, "one try plus one retry"
    [err] = jsonl(tmp_path / "gen" / f"{SHARD}.errors.jsonl")
    assert (err["id"], err["kind"], err["reason"]) == ("busy", "retryable", "http_503")
    assert len(error_log_lines(res.stderr, "busy")) == 1
    assert not (tmp_path / "gen" / f"{SHARD}.done.json").exists()
