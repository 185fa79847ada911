import json

import pytest

from dflashkit.generate.inputs import iter_inputs, shard_of
from dflashkit.shards import slurm_shard_defaults


def write_jsonl(path, records):
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in records))


def msg(text):
    return {"messages": [{"role": "user", "content": text}]}


def test_global_index_runs_over_a_directory_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [msg("b0"), msg("b1")])
    write_jsonl(tmp_path / "a.jsonl", [msg("a0")])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text(json.dumps([msg("c0")]))
    (tmp_path / "notes.txt").write_text("ignored")
    recs = list(iter_inputs(str(tmp_path)))
    assert [r.record["messages"][0]["content"] for r in recs] == ["a0", "b0", "b1", "c0"]
    assert [r.index for r in recs] == [0, 1, 2, 3]
    assert [r.id for r in recs] == ["a-1", "b-1", "b-2", "sub_c-0-" + recs[3].id.split("-")[-1]]


def test_ids_from_records_are_sanitized_and_stable(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"id": "ok_1", **msg("x")}, {"question_id": 81, **msg("y")},
                       {"id": "../../etc/passwd", **msg("z")}])
    first = [r.id for r in iter_inputs(str(path))]
    assert first[:2] == ["ok_1", "81"]
    assert "/" not in first[2] and not first[2].startswith(".")
    assert first == [r.id for r in iter_inputs(str(path))]


def test_bad_lines_and_duplicates_become_errors_in_place(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"id": "a", **msg("x")}, b"{broken\n", b"\xff\xfe\n", {"id": "a", **msg("dup")}, msg("ok")])
    recs = list(iter_inputs(str(path)))
    assert [r.index for r in recs] == [0, 1, 2, 3, 4]
    assert [r.error.reason if r.error else None for r in recs] == [None, "bad_json", "bad_encoding",
                                                                   "duplicate_id", None]
    assert len({r.id for r in recs}) == 5  # even failed records keep a unique id for the errors file


def test_shards_partition_the_input():
    n = 7
    owners = [[s for s in range(3) if shard_of(i, 3) == s] for i in range(n)]
    assert all(len(o) == 1 for o in owners)


@pytest.mark.parametrize(
    "env, num_shards, expected",
    [
        ({}, None, None),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "15",
          "SLURM_ARRAY_TASK_COUNT": "16"}, None, (3, 16)),
        # An array that starts at 1.
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4",
          "SLURM_ARRAY_TASK_COUNT": "4"}, None, (0, 4)),
        # A rerun of a 16-shard run as a sparse array: the task id is the shard id.
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_MAX": "12",
          "SLURM_ARRAY_TASK_COUNT": "3"}, 16, (7, 16)),
    ],
)
def test_slurm_shard_defaults(env, num_shards, expected):
    assert slurm_shard_defaults(num_shards, env) == expected


def test_saved_datasets_folder_is_read_as_a_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)])
    ds.save_to_disk(str(tmp_path / "saved"))
    recs = list(iter_inputs(str(tmp_path / "saved")))
    assert [r.record["messages"][0]["content"] for r in recs] == ["q0", "q1", "q2"]
    assert [r.id for r in recs] == ["saved-0", "saved-1", "saved-2"]


def test_missing_input_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_inputs(str(tmp_path / "nope.jsonl")))
