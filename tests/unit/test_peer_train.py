"""bench/peers/specforge_train.py: SpecForge's own trainer (`specforge train`, offline DFlash) runs on our SmolLM2 dump
converted to its feature files, and the draft it trains is our draft weight for weight: our exported folder loads, and
on the same weights, inputs and block mask our forward gives SpecForge's. Needs specforge installed (bench/peers/
installs it apart from our environment); skipped without it. Runs on the CPU (SpecForge's gloo/DDP path)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("specforge.cli")
pytest.importorskip("specforge.modeling.draft.dflash")

from tests.helpers.train import MASK_TOKEN_ID

REPO = Path(__file__).resolve().parents[2]


def script():
    spec = importlib.util.spec_from_file_location("specforge_train", REPO / "bench" / "peers" / "specforge_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conversion_is_specforges_offline_sample(smollm2_dump, tmp_path):
    from specforge.algorithms.common.dflash_family_data import normalize_offline_sample
    from specforge.runtime.data_plane.feature_store import load_feature_file

    from dflashkit.dump import list_dump_records, load_dump_record, read_meta

    counts = script().convert(smollm2_dump, tmp_path, torch.bfloat16, max_length=256, limit=2)
    assert counts["converted"] == 2 and counts["skipped_no_consecutive_supervised"] == 0
    meta = read_meta(smollm2_dump)
    for path in list_dump_records(smollm2_dump)[:2]:
        ours = load_dump_record(path, meta)
        sample = normalize_offline_sample(load_feature_file(str(tmp_path / f"{path.stem}.ckpt")), max_len=256)
        assert sample["hidden_states"].shape == (1, min(len(ours["input_ids"]), 256), 3 * 576) and sample["hidden_states"].dtype == torch.bfloat16
        assert torch.equal(sample["input_ids"][0], ours["input_ids"][:256])
        assert torch.equal(sample["loss_mask"][0], ours["loss_mask"][:256].long())
        assert torch.equal(sample["hidden_states"][0], ours["aux_hidden_states"][:256].bfloat16())


def test_specforge_trains_two_steps_and_its_draft_is_ours(smollm2_dump, tmp_path, capsys):
    from safetensors.torch import load_file
    from specforge.algorithms.common.dflash_family_model import create_dflash_sdpa_mask
    from specforge.export.checkpoint_io import resolve_training_state
    from specforge.modeling.auto import AutoDraftModel

    from dflashkit.export import load_draft
    from dflashkit.model.masks import block_inputs, dense_mask

    argv = ["--dump", str(smollm2_dump), "--out", str(tmp_path), "--mask-token-id", str(MASK_TOKEN_ID),
            "--steps", "2", "--global-batch", "2", "--num-layers", "1", "--block-size", "4",
            "--intermediate-size", "128", "--max-length", "256", "--attention", "sdpa", "--num-workers", "0",
            "--limit", "4"]
    assert script().main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["data"]["converted"] == 4 and row["steps_logged"] == 2 and [r["step"] for r in row["log"]] == [1, 2]
    assert all(math.isfinite(x) and x > 0 for x in row["losses"])
    assert row["log"][0]["lr"] == pytest.approx(6e-4)  # 4% warmup of 2 steps rounds to none: the peak at step 1

    ours = load_draft(row["draft"]).eval()
    assert ours.config.target_layer_ids == [1, 14, 27] and ours.config.mask_token_id == MASK_TOKEN_ID
    theirs = AutoDraftModel.from_pretrained(str(tmp_path / "specforge-hf"), torch_dtype=torch.float32).eval()
    theirs.config._attn_implementation = "sdpa"
    # our folder holds exactly the weights SpecForge's trainer checkpointed, under the same names
    trained = resolve_training_state(str(tmp_path / "specforge" / "train" / "sf-dflash-step2"))["draft_state_dict"]
    state = load_file(str(Path(row["draft"]) / "model.safetensors"))
    assert set(state) == set(trained)
    for name, t in trained.items():
        assert torch.equal(state[name], t.cpu()), name

    # One batch through both forwards: 40 context tokens, 3 blocks of 4 at anchors 5, 17, 30.
    g = torch.Generator().manual_seed(0)
    s, block = 40, 4
    target_hidden = torch.randn(1, s, 3 * 576, generator=g)
    input_ids = torch.randint(0, 49152, (1, s), generator=g)
    anchors = torch.tensor([[5, 17, 30]])
    ids, positions = block_inputs(input_ids, anchors, block, MASK_TOKEN_ID)
    embeds = torch.randn(1, ids.shape[1], 576, generator=g)
    mask = dense_mask(anchors, s, block)
    their_mask = create_dflash_sdpa_mask(anchor_positions=anchors, block_keep_mask=torch.ones_like(anchors).bool(),
                                         S=s, block_size=block, device=torch.device("cpu"))
    assert torch.equal(mask, their_mask.bool().expand_as(mask))
    with torch.no_grad():
        a = ours(target_hidden, embeds, torch.arange(s)[None], positions, mask)
        b = theirs(position_ids=torch.cat([torch.arange(s)[None], positions], 1), noise_embedding=embeds,
                   target_hidden=target_hidden, attention_mask=mask)
    assert a.shape == b.shape == (1, 12, 576)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
