import json
import os
import subprocess
import sys

import pytest

from dflashkit.io import JsonlAppender, atomic_write_json, iter_jsonl, repair_jsonl_tail, safe_id


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(target.parent) == ["x.json"]
    assert oct(target.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("tail", [b'{"id": "c", "x": [1, 2', b'{"id": "c"}', b"garbage\n"])
def test_torn_tail_is_cut(tmp_path, tail):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n' + tail)
    removed = repair_jsonl_tail(path)
    assert removed == len(tail)
    assert [o["id"] for _, o in iter_jsonl(path)] == ["a", "b"]


def test_complete_file_untouched(tmp_path):
    path = tmp_path / "s.jsonl"
    data = b'{"id": "a"}\n{"id": "b"}\n'
    path.write_bytes(data)
    assert repair_jsonl_tail(path) == 0
    assert path.read_bytes() == data


def test_appender_repairs_then_appends(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "tor')
    with JsonlAppender(path) as f:
        f.write({"id": "c"})
    assert [o["id"] for _, o in iter_jsonl(path)] == ["a", "c"]


def test_iter_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2"):
        list(iter_jsonl(path))


def test_safe_id_keeps_clean_ids():
    assert safe_id("QWJhYvA_0") == "QWJhYvA_0"
    assert safe_id("mtbench-81.v2") == "mtbench-81.v2"


@pytest.mark.parametrize("raw", ["../etc/passwd", "a/b", "..", ".", ".hidden", "a\x00b", "dir/../x", "é", "a b"])
def test_safe_id_is_one_safe_component(raw):
    out = safe_id(raw)
    assert "/" not in out and "\x00" not in out and not out.startswith(".")
    assert out not in (".", "..") and len(out) <= 128
    assert all(c.isalnum() or c in "._-" for c in out)


def test_safe_id_keeps_distinct_ids_distinct():
    raws = ["a/b", "a_b", "a?b", "a b", "x" * 300, "x" * 301]
    assert len({safe_id(r) for r in raws}) == len(raws)
    with pytest.raises(ValueError):
        safe_id("")


def test_appender_on_a_full_file_system_names_the_file_and_leaves_whole_lines(tmp_path):
    # RLIMIT_FSIZE makes a write past 1000 bytes fail (EFBIG) the way a full disk does (ENOSPC): partway into a line.
    script = f"""
import json, resource, signal, sys
from dflashkit.io import JsonlAppender
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
out = JsonlAppender({str(tmp_path / "m.jsonl")!r})
try:
    for step in range(100):
        out.write({{"step": step, "pad": "x" * 300}})
except OSError as e:
    print(json.dumps([step, e.filename]))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    step, filename = json.loads(res.stdout)
    assert filename == str(tmp_path / "m.jsonl")
    data = (tmp_path / "m.jsonl").read_bytes()
    assert data.endswith(b"\n") and [json.loads(x)["step"] for x in data.splitlines()] == list(range(step))
