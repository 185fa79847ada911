"""fp8 dumps and dumps without the final state: the record contract, the round-trip error on real SmolLM2 states,
the bytes, and the trainer reading them (the dump script's own `--dtype float8_e4m3fn --no-final-state`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dflashkit.config import from_dict
from dflashkit.dump import format as fmt
from dflashkit.dump.run import main as dump_main
from dflashkit.prepare import model_dir
from dflashkit.train.config import TrainConfig
from dflashkit.train.loop import train
from tests.helpers.dumps import good_records, write_shard
from tests.helpers.train import MASK_TOKEN_ID

# The error bound FORMATS.md states: float8_e4m3fn keeps 3 mantissa bits (a relative rounding step of 2^-4 at most,
# 2^-5 on average), so each (token, layer) row's relative L2 error against bf16 stays under 4%.
ROW_RELATIVE_ERROR = 0.04


def row_errors(approx: torch.Tensor, exact: torch.Tensor, groups: int) -> torch.Tensor:
    t = exact.shape[0]
    a, e = approx.float().view(t, groups, -1), exact.float().view(t, groups, -1)
    return (a - e).norm(dim=-1) / e.norm(dim=-1).clamp(min=1e-12)


def test_fp8_round_trip_on_real_smollm2_states(smollm2_dump, tmp_path):
    """Every record of the real SmolLM2 dump (3 target layers + the final state), bf16 -> fp8 -> dequantized."""
    meta = fmt.read_meta(smollm2_dump)
    n = len(meta["target_layer_ids"])
    worst = 0.0
    for path in fmt.list_dump_records(smollm2_dump):
        rec = fmt.load_dump_record(path, meta)
        bf16 = fmt.to_storage(rec, "bfloat16", n, keep_final=True)
        fp8 = fmt.to_storage(rec, fmt.FP8, n, keep_final=True)
        assert fp8["aux_hidden_states"].dtype == torch.float8_e4m3fn and fp8["aux_scale"].shape == (len(rec["input_ids"]), n)
        back = fmt.load_dump_record(fmt.save_dump_record(tmp_path / "fp8", fp8), {**meta, "dtype": fmt.FP8})
        assert set(back) == set(fmt.RECORD_KEYS) and back["aux_hidden_states"].dtype == torch.bfloat16
        for key, groups in (("aux_hidden_states", n), ("hidden_states", 1)):
            errors = row_errors(back[key], bf16[key], groups)
            worst = max(worst, float(errors.max()))
        bytes_bf16 = fmt.save_dump_record(tmp_path / "bf16", bf16).stat().st_size
        bytes_fp8 = (tmp_path / "fp8" / path.name).stat().st_size
        # states at 1 byte + a 4-byte scale per 576 values, vs 2 bytes: just over half
        assert 0.45 < bytes_fp8 / bytes_bf16 < 0.56, (bytes_fp8, bytes_bf16)
    assert 0 < worst < ROW_RELATIVE_ERROR, worst


def test_fp8_and_final_state_free_records_follow_the_contract(tmp_path):
    rec = {"input_ids": torch.arange(6), "hidden_states": torch.randn(6, 4) * 30,
           "aux_hidden_states": torch.cat([torch.randn(6, 4) * 1e-3, torch.randn(6, 4) * 50], -1),
           "loss_mask": torch.tensor([0, 0, 1, 1, 0, 1], dtype=torch.uint8), "conversation_id": "c"}
    meta = {"format": fmt.FORMAT_VERSION, "model": "m", "backend": "hf", "dtype": fmt.FP8, "hidden_size": 4,
            "num_hidden_layers": 8, "target_layer_ids": [1, 5], "layer_id_convention": "x", "final_state": "none",
            "max_seq_len": 16, "length_policy": "skip", "chat_template_sha256": "0"}
    fmt.validate_meta(meta)
    stored = fmt.to_storage(rec, fmt.FP8, 2, keep_final=False)
    assert set(stored) == {"input_ids", "aux_hidden_states", "aux_scale", "loss_mask", "conversation_id"}
    path = fmt.save_dump_record(tmp_path, stored)
    raw = fmt.load_dump_record(path, meta, dequantize=False)
    assert raw["aux_hidden_states"].dtype == torch.float8_e4m3fn and raw["aux_scale"].shape == (6, 2)
    back = fmt.load_dump_record(path, meta)
    assert "aux_scale" not in back and "hidden_states" not in back
    # one scale per layer: the 1e-3 layer keeps its precision beside the 50x layer
    assert float(row_errors(back["aux_hidden_states"], rec["aux_hidden_states"], 2).max()) < ROW_RELATIVE_ERROR
    with pytest.raises(fmt.DumpFormatError, match="missing"):  # the meta says there is a final state
        fmt.load_dump_record(path, {**meta, "final_state": "pre_norm"})
    bad = {**stored, "aux_scale": stored["aux_scale"][:, :1]}
    with pytest.raises(fmt.DumpFormatError, match="aux_scale"):
        fmt.validate_dump_record(bad, meta)
    no_scale = {k: v for k, v in stored.items() if k != "aux_scale"}
    with pytest.raises(fmt.DumpFormatError, match="missing \\['aux_scale'\\]"):
        fmt.validate_dump_record(no_scale)


def dump(gen: Path, out: Path, *extra: str) -> None:
    assert dump_main(["--backend", "hf", "--model", str(model_dir()), "--input", str(gen), "--output-dir", str(out),
                      "--chat-template", "smollm2-thinking-train", "--max-seq-len", "512", "--target-layer-ids",
                      "1,14,27", "--no-progress", *extra]) == 0


def recipe(dump_dir: Path, out: Path, **loss) -> TrainConfig:
    return from_dict(TrainConfig, {
        "target_model": str(model_dir()), "output_dir": str(out), "tensorboard": False,
        "model": {"num_layers": 1, "block_size": 4, "mask_token_id": MASK_TOKEN_ID, "intermediate_size": 128},
        "data": {"dump_dirs": [str(dump_dir)], "num_anchors": 8, "micro_batch_size": 2, "num_workers": 0},
        "optim": {"max_steps": 2, "warmup_steps": 1}, "loss": loss, "checkpoint_every": 1000})


def test_the_dump_writes_fp8_without_the_final_state_and_the_trainer_reads_it(tmp_path):
    gen = write_shard(tmp_path / "gen", good_records(0, 4))
    dump(gen, tmp_path / "bf16", "--dtype", "bfloat16")
    dump(gen, tmp_path / "fp8", "--dtype", fmt.FP8, "--no-final-state")
    meta = fmt.read_meta(tmp_path / "fp8")
    assert meta["dtype"] == fmt.FP8 and meta["final_state"] == "none"
    for path in fmt.list_dump_records(tmp_path / "fp8"):
        exact = fmt.load_dump_record(tmp_path / "bf16" / path.name)
        rec = fmt.load_dump_record(path, meta)
        assert "hidden_states" not in rec and torch.equal(rec["input_ids"], exact["input_ids"])
        assert float(row_errors(rec["aux_hidden_states"], exact["aux_hidden_states"], 3).max()) < ROW_RELATIVE_ERROR
    assert train(recipe(tmp_path / "fp8", tmp_path / "train"), resume=False) == 0
    assert (tmp_path / "train" / "metrics.jsonl").read_text().count("\n") == 2
    with pytest.raises(ValueError, match="--no-final-state"):  # KD needs the final state
        train(recipe(tmp_path / "fp8", tmp_path / "kd", kd_weight=0.5), resume=False)


def test_fp8_batches_cross_as_fp8_and_dequantize_to_the_readers_states(tmp_path):
    """The loader keeps fp8 states and their scales (half the bytes to pin and copy); the step's dequantization gives
    the states `load_dump_record` gives, the final state too (KD), and a bad record's placeholder fits the batch."""
    from dflashkit.train import data

    gen = write_shard(tmp_path / "gen", good_records(0, 3))
    dump(gen, tmp_path / "fp8", "--dtype", fmt.FP8)
    meta = fmt.read_meta(tmp_path / "fp8")
    paths = fmt.list_dump_records(tmp_path / "fp8")
    paths.insert(1, tmp_path / "fp8" / "missing.pt")  # unreadable: the placeholder
    dataset = data.DumpDataset(paths, meta, 512, 8, seed=0, with_final=True)
    batch = data.collate([dataset[(i, 0)] for i in range(len(paths))], block_size=4)
    assert batch["aux_hidden_states"].dtype == torch.float8_e4m3fn and "aux_scale" in batch
    assert batch["bad"][1] and not any(batch["bad"][:1] + batch["bad"][2:])
    states = data.dequantized(batch)
    assert "aux_scale" not in states and "hidden_scale" not in states
    readable = [fmt.load_dump_record(p, meta) for p in paths if p.exists()]
    for key in ("aux_hidden_states", "hidden_states"):
        padded = data.padded_features(states, key)
        assert states[key].dtype == torch.bfloat16
        for row, rec in zip((0, 2, 3), readable):
            assert torch.equal(padded[row, : rec[key].shape[0]], rec[key]), (key, row)
    assert train(recipe(tmp_path / "fp8", tmp_path / "kd", kd_weight=0.5), resume=False) == 0
