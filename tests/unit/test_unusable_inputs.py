"""Issue #20 item 6: an empty, missing or entirely unreadable input is a failure with one line, and leaves nothing that
looks like progress (no marker, no empty shard files, no meta.json); an empty input completes only when asked to."""
from __future__ import annotations

import json

import pytest

from dflashkit.dump.run import main as dump_main
from dflashkit.generate.run import main as generate_main
from dflashkit.shards import ShardFiles

LATIN1 = "caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1")  # not UTF-8


def inputs(tmp_path) -> dict:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_bytes(b"\n".join(b'{"id": "%d", "text": "' % i + LATIN1 + b'"}' for i in range(3)) + b"\n")
    return {"empty": empty, "missing": tmp_path / "nope.jsonl", "foreign": foreign}


def generate(inp, out, *extra) -> int:
    # No server: every case here is decided before a request would be sent.
    return generate_main(["--input", str(inp), "--output-dir", str(out), "--model", "m", "--no-progress",
                          "--base-url", "http://127.0.0.1:9/v1", *extra])


def dump(inp, out, *extra) -> int:
    return dump_main(["--backend", "hf", "--model", "unused", "--input", str(inp), "--output-dir", str(out),
                      "--chat-template", "smollm2-thinking-train", "--no-progress", *extra])


@pytest.mark.parametrize("stage", [generate, dump])
@pytest.mark.parametrize("case", ["empty", "missing", "foreign"])
def test_an_unusable_input_fails_and_leaves_nothing(tmp_path, caplog, stage, case):
    out = tmp_path / "out"
    assert stage(inputs(tmp_path)[case], out) == 1
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert left == [], f"{case} input left {left}"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(inputs(tmp_path)[case].name) in errors[0], errors


def test_an_empty_input_completes_only_when_allowed(tmp_path):
    out = tmp_path / "out"
    assert generate(inputs(tmp_path)["empty"], out, "--allow-empty-input") == 0
    marker = json.loads(ShardFiles(out, 0, 1).done.read_text())
    assert marker["counts"] == {"input": 0, "written": 0, "skipped": 0, "errors": 0}
