"""The shard runner's bookkeeping without a forward pass (every record of these shards is bad, so no backend starts):
errors file, done-marker counts, meta.json, a rerun of a finished shard, sharding by generation.index, and refusing to
write a different dump into the same directory."""
import json

import pytest
from transformers import AutoTokenizer

from dflashkit.dump import format as fmt
from dflashkit.dump.run import main
from dflashkit.prepare import model_dir
from dflashkit.shards import ShardFiles
from tests.helpers.dumps import bad_records, write_shard


def dump(gen, out, *extra):
    return main(["--backend", "hf", "--model", str(model_dir()), "--input", str(gen), "--output-dir", str(out),
                 "--chat-template", "smollm2-thinking-train", "--max-seq-len", "512", "--no-progress", *extra])


def test_shards_of_bad_records_finish_with_counts_and_reasons(tmp_path):
    bad = bad_records(0)  # generation.index 0..4
    gen = write_shard(tmp_path / "gen", [rec for rec, _ in bad.values()])
    out = tmp_path / "dump"
    for shard in (0, 1):
        assert dump(gen, out, "--num-shards", "2", "--shard-id", str(shard)) == 0
    lines = {}
    for shard in (0, 1):
        for line in ShardFiles(out, shard, 2).errors.read_text().splitlines():
            x = json.loads(line)
            lines[x["id"]] = (x["reason"], shard)
    # every record in exactly one shard: the one its generation.index names
    assert {cid: reason for cid, (reason, _) in lines.items()} == {cid: r for cid, (_, r) in bad.items()}
    assert all(bad[cid][0]["generation"]["index"] % 2 == shard for cid, (_, shard) in lines.items()
               if "generation" in bad[cid][0])
    meta = fmt.read_meta(out)
    assert meta["counts"] == {"input": 5, "written": 0, "skipped": 5, "errors": 0, "resumed": 0}
    assert meta["shards_done"] == [0, 1] and meta["target_layer_ids"] == [1, 8, 14, 20, 27]
    marker = json.loads(ShardFiles(out, 0, 2).done.read_text())
    assert marker["counts"]["input"] == len([1 for _, s in lines.values() if s == 0])
    assert dump(gen, out, "--num-shards", "2", "--shard-id", "0") == 0  # done: nothing to do


def test_a_different_dump_into_the_same_dir_is_refused(tmp_path):
    gen = write_shard(tmp_path / "gen", [bad_records(0)["bad-empty"][0]])
    out = tmp_path / "dump"
    assert dump(gen, out) == 0
    before = (out / "meta.json").read_text()
    assert dump(gen, out, "--num-shards", "2", "--shard-id", "1", "--target-layer-ids", "1,2") == 1
    assert (out / "meta.json").read_text() == before and not ShardFiles(out, 1, 2).done.exists()
    assert dump(tmp_path / "missing", tmp_path / "other") == 1 and not (tmp_path / "other").exists()


def test_no_template_to_render_stops_with_one_line(tmp_path):
    """No --chat-template and a tokenizer without one: the shard cannot build a loss mask and says so before
    writing anything."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tok")
    gen = write_shard(tmp_path / "gen", [bad_records(0)["bad-empty"][0]])
    with pytest.raises(SystemExit) as e:
        main(["--backend", "hf", "--model", str(model_dir()), "--tokenizer", str(tmp_path / "tok"), "--input",
              str(gen), "--output-dir", str(tmp_path / "dump"), "--no-progress"])
    assert e.value.code == "dump: the tokenizer has no chat_template: name a template (--chat-template)"
    assert not (tmp_path / "dump").exists()
