"""The dump contract the trainer relies on: what validates, what is refused, and the layer-id arithmetic."""
import json

import pytest
import torch

from dflashkit.dump import format as fmt
from dflashkit.model.layers import check_target_layer_ids, default_target_layer_ids, num_hidden_layers
from dflashkit.shards import shard_name


def make_record(cid="c1", t=6, h=4, n=2, mask=None, dtype=torch.float32):
    return {
        "input_ids": torch.arange(t, dtype=torch.int64),
        "hidden_states": torch.randn(t, h, dtype=dtype),
        "aux_hidden_states": torch.randn(t, n * h, dtype=dtype),
        "loss_mask": torch.tensor(mask if mask is not None else [0, 0, 1, 1, 0, 1], dtype=torch.uint8),
        "conversation_id": cid,
    }


def make_meta(**over):
    meta = {
        "format": fmt.FORMAT_VERSION, "model": "m", "backend": "hf", "dtype": "float32", "hidden_size": 4,
        "num_hidden_layers": 8, "target_layer_ids": [1, 5], "layer_id_convention": "x", "final_state": "pre_norm",
        "max_seq_len": 16, "length_policy": "skip", "chat_template_sha256": "0" * 64,
    }
    return {**meta, **over}


def test_roundtrip_and_meta_checks(tmp_path):
    path = fmt.save_dump_record(tmp_path, make_record())
    assert path.name == "c1.pt"
    rec = fmt.load_dump_record(path, make_meta())
    assert rec["loss_mask"].tolist() == [0, 0, 1, 1, 0, 1]
    with pytest.raises(fmt.DumpFormatError, match="disagrees with meta"):
        fmt.load_dump_record(path, make_meta(hidden_size=8))
    with pytest.raises(fmt.DumpFormatError, match="dtype"):
        fmt.load_dump_record(path, make_meta(dtype="bfloat16"))
    with pytest.raises(fmt.DumpFormatError, match="max_seq_len"):
        fmt.load_dump_record(path, make_meta(max_seq_len=4))


@pytest.mark.parametrize("mask,reason", [([0] * 6, "all zeros"), ([1] * 6, "all ones"), ([0, 2, 1, 0, 0, 0], "other")])
def test_degenerate_masks_refused(mask, reason):
    with pytest.raises(fmt.DumpFormatError, match=reason):
        fmt.validate_dump_record(make_record(mask=mask))


def test_wrong_shapes_and_keys_refused():
    rec = make_record()
    rec["aux_hidden_states"] = torch.randn(6, 7)
    with pytest.raises(fmt.DumpFormatError, match="aux_hidden_states"):
        fmt.validate_dump_record(rec)
    rec = make_record()
    rec["extra"] = 1
    with pytest.raises(fmt.DumpFormatError, match="unexpected"):
        fmt.validate_dump_record(rec)
    rec = make_record()
    rec["input_ids"] = rec["input_ids"].int()
    with pytest.raises(fmt.DumpFormatError, match="int64"):
        fmt.validate_dump_record(rec)


def test_torn_or_renamed_file_is_an_error(tmp_path):
    good = fmt.save_dump_record(tmp_path, make_record())
    torn = tmp_path / "c2.pt"
    torn.write_bytes(good.read_bytes()[:100])
    with pytest.raises(fmt.DumpFormatError, match="not a loadable"):
        fmt.load_dump_record(torn)
    renamed = tmp_path / "c3.pt"
    renamed.write_bytes(good.read_bytes())
    with pytest.raises(fmt.DumpFormatError, match="file name"):
        fmt.load_dump_record(renamed)
    (tmp_path / ".c4.pt.abc.tmp").write_bytes(b"partial")
    assert [p.name for p in fmt.list_dump_records(tmp_path)] == ["c1.pt", "c2.pt", "c3.pt"]


def test_meta_refuses_a_different_dump_and_sums_markers(tmp_path):
    fmt.write_meta(tmp_path, make_meta())
    for k in range(2):
        (tmp_path / f"{shard_name(k, 2)}.done.json").write_text(json.dumps(
            {"shard_id": k, "counts": {"written": 3, "errors": k}, "tokens": {"total": 10, "loss": 4}}))
    meta = fmt.read_meta(tmp_path)
    assert meta["counts"] == {"written": 6, "errors": 1} and meta["tokens"] == {"total": 20, "loss": 8}
    assert meta["shards_done"] == [0, 1]
    with pytest.raises(fmt.DumpFormatError, match="different dump"):
        fmt.write_meta(tmp_path, make_meta(target_layer_ids=[1, 4]))


def test_default_layer_ids_and_wrapped_configs():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(30, 5) == [1, 8, 14, 20, 27]
    assert default_target_layer_ids(30, 1) == [15]
    assert num_hidden_layers({"text_config": {"num_hidden_layers": 62, "hidden_size": 6144}, "hidden_size": 1}) == 62
    with pytest.raises(ValueError, match="increasing"):
        check_target_layer_ids([5, 1], 30)
    with pytest.raises(ValueError, match="lie in"):
        check_target_layer_ids([1, 29], 30)


def test_views_of_a_bigger_buffer_are_saved_compactly(tmp_path):
    """A backend slicing [T, n+1, H] capture buffers must not write the whole buffer into each record."""
    rec = make_record(t=6, h=4, n=2)
    big = torch.randn(6, 3, 4)
    rec["aux_hidden_states"] = big[:, :-1].reshape(6, -1)  # a view: its storage is the whole buffer
    assert rec["aux_hidden_states"].untyped_storage().nbytes() == big.numel() * 4
    path = fmt.save_dump_record(tmp_path, rec)
    again = fmt.load_dump_record(path)
    assert torch.equal(again["aux_hidden_states"], rec["aux_hidden_states"])
    assert again["aux_hidden_states"].untyped_storage().nbytes() == 6 * 8 * 4
