"""bench/curve_data.py: nested training sets and one held-out set; later records (--more) extend the curve without
changing the held-out set or any training set that fit in the first records."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def curve_data():
    spec = importlib.util.spec_from_file_location("curve_data", REPO / "bench" / "curve_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def shard(path: Path, ids: range) -> str:
    path.mkdir(parents=True)
    (path / "shard-00000-of-00001.jsonl").write_text("".join(json.dumps({"id": f"r{i}"}) + "\n" for i in ids))
    return str(path)


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_more_records_extend_the_curve_and_leave_the_earlier_sets_as_they_were(tmp_path, capsys):
    main = curve_data()
    first = shard(tmp_path / "first", range(40))
    later = shard(tmp_path / "later", range(30, 100))  # a later run's shard resumes the first one's: r30-r39 again
    assert main(["--inputs", first, "--heldout", "8", "--sizes", "10", "all", "--out", str(tmp_path / "a")]) == 0
    assert main(["--inputs", first, "--more", later, "--heldout", "8", "--sizes", "10", "32", "all",
                 "--out", str(tmp_path / "b")]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert ids(b / "heldout.jsonl") == ids(a / "heldout.jsonl")
    assert ids(b / "train-10.jsonl") == ids(a / "train-10.jsonl") and ids(b / "train-32.jsonl") == ids(a / "train-32.jsonl")
    assert ids(b / "train-92.jsonl")[:32] == ids(a / "train-32.jsonl")
    assert sorted(ids(b / "train-92.jsonl")[32:]) == sorted(f"r{i}" for i in range(40, 100))
    assert set(ids(b / "heldout.jsonl")).isdisjoint(ids(b / "train-92.jsonl"))
    assert "train-92.jsonl: 92 records" in capsys.readouterr().out


def test_later_shards_that_hold_each_others_records_add_each_id_once(tmp_path):
    """Two later shards where the second resumes the first (as every kept ShareGPT shard holds the earlier one's
    conversations) give each new id once: the ninth curve run trained 4,833 conversations twice without this."""
    main = curve_data()
    first = shard(tmp_path / "first", range(20))
    kept = shard(tmp_path / "kept", range(10, 50))
    resumed = shard(tmp_path / "resumed", range(10, 60))
    assert main(["--inputs", first, "--more", kept, resumed, "--heldout", "4", "--sizes", "all",
                 "--out", str(tmp_path / "c")]) == 0
    train = ids(tmp_path / "c" / "train-56.jsonl")
    assert len(train) == len(set(train)) == 56
    assert set(train) | set(ids(tmp_path / "c" / "heldout.jsonl")) == {f"r{i}" for i in range(60)}
