"""Export: the folder vLLM/SGLang load (names, config keys, YaRN), the round trip into our model, the refusals."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from dflashkit.export import DraftMismatch, export_draft, load_draft, main, read_draft, resolve_checkpoint
from dflashkit.model import DFlashDraft
from dflashkit.model.masks import dense_mask
from tests.helpers.train import tiny_config


def write_target(path, **overrides):
    """A target config.json matching tiny_config(): 6 layers, hidden 64, vocab 128."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
              "vocab_size": 128, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
    config.update(overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def random_draft(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    model = DFlashDraft(cfg)
    with torch.no_grad():  # norms away from 1 so a lost norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return cfg, model


def draft_outputs(model, seed=1):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ctx_len, anchors = 20, torch.tensor([[7, 19]])
    hidden = torch.randn(1, ctx_len, cfg.num_fused_layers * cfg.hidden_size, generator=g)
    blocks = torch.randn(1, 2 * cfg.block_size, cfg.hidden_size, generator=g)
    block_pos = (anchors.unsqueeze(-1) + torch.arange(cfg.block_size)).view(1, -1)
    with torch.no_grad():
        return model(hidden, blocks, torch.arange(ctx_len)[None], block_pos,
                     dense_mask(anchors, ctx_len, cfg.block_size))


def test_round_trip_same_outputs_and_vllm_layout(tmp_path):
    cfg, model = random_draft()
    target = write_target(tmp_path / "target")
    out = export_draft(cfg, model.state_dict(), target, tmp_path / "draft")

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {"mask_token_id": cfg.mask_token_id, "target_layer_ids": cfg.target_layer_ids}
    assert config["tie_word_embeddings"] is False and config["num_target_layers"] == 6
    assert config["layer_types"] == ["full_attention"] * cfg.num_hidden_layers
    for key in ("block_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings", "vocab_size"):
        assert key in config, key
    names = set(load_file(out / "model.safetensors"))
    assert "fc.weight" in names and "hidden_norm.weight" in names and "norm.weight" in names
    assert "layers.0.self_attn.q_norm.weight" in names and "layers.1.mlp.down_proj.weight" in names
    assert not [n for n in names if n.startswith("model.") or "embed_tokens" in n or "lm_head" in n]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft", "target"]  # no temp dir left

    loaded = load_draft(out)
    assert torch.equal(draft_outputs(loaded), draft_outputs(model))


def test_dtype_cast_and_checkpoint_resolution(tmp_path):
    cfg, model = random_draft()
    target = write_target(tmp_path / "target")
    # A training output dir: checkpoints/latest.json names the step dir (the trainer's layout).
    step = tmp_path / "train" / "checkpoints" / "step-00000020"
    export_draft(cfg, model.state_dict(), target, step)
    (step.parent / "latest.json").write_text(json.dumps({"step": 20, "path": step.name}))
    assert resolve_checkpoint(tmp_path / "train") == step
    assert resolve_checkpoint(step.parent) == step
    _, state = read_draft(tmp_path / "train")
    out = export_draft(cfg, state, target, tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_yarn_rope_scaling(tmp_path):
    cfg, model = random_draft()
    target = write_target(tmp_path / "target")
    out = export_draft(cfg, model.state_dict(), target, tmp_path / "draft", yarn_factor=128,
                       yarn_original_max_position=8192)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 128.0, "original_max_position_embeddings": 8192}
    assert config["max_position_embeddings"] == 8192 * 128
    # transformers (what vLLM reads the config with) sees YaRN, and our model runs with it.
    assert load_draft(out).config.to_hf_config().rope_parameters["rope_type"] == "yarn"
    with pytest.raises(DraftMismatch, match="go together"):
        export_draft(cfg, model.state_dict(), target, tmp_path / "x", yarn_factor=4)


@pytest.mark.parametrize("target_overrides, cfg_overrides, message", [
    ({"num_hidden_layers": 4}, {}, r"target_layer_ids \[4\] are beyond the target's 4 decoder layers"),
    ({"hidden_size": 32}, {}, "hidden_size 64 != the target's 32"),
    ({"vocab_size": 100}, {}, "mask_token_id 127 is not a token id below the vocabulary size 100"),
    ({"max_position_embeddings": 4096}, {}, "max_position_embeddings 512 < the serving context 4096"),
])
def test_refuses_draft_that_does_not_fit_target(tmp_path, target_overrides, cfg_overrides, message):
    cfg, model = random_draft(**cfg_overrides)
    target = write_target(tmp_path / "target", **target_overrides)
    with pytest.raises(DraftMismatch, match=message):
        export_draft(cfg, model.state_dict(), target, tmp_path / "draft")
    assert not (tmp_path / "draft").exists()


def test_refuses_weights_that_do_not_fit_config(tmp_path):
    cfg, model = random_draft()
    target = write_target(tmp_path / "target")
    state = model.state_dict()
    narrow = dict(state, **{"fc.weight": torch.zeros(64, 128)})  # trained with 2 target layers, config says 3
    with pytest.raises(DraftMismatch, match=r"fc.weight is \[64, 128\], expected \[64, 192\]"):
        export_draft(cfg, narrow, target, tmp_path / "a")
    prefixed = {f"model.{k}": v for k, v in state.items()}
    with pytest.raises(DraftMismatch, match="unexpected tensors.*model.fc.weight"):
        export_draft(cfg, prefixed, target, tmp_path / "b")
    with pytest.raises(DraftMismatch, match="missing tensors: norm.weight"):
        export_draft(cfg, {k: v for k, v in state.items() if k != "norm.weight"}, target, tmp_path / "c")
    diverged = dict(state, **{"layers.0.mlp.up_proj.weight": torch.full_like(state["layers.0.mlp.up_proj.weight"],
                                                                          float("nan"))})
    with pytest.raises(DraftMismatch, match="layers.0.mlp.up_proj.weight holds NaN"):
        export_draft(cfg, diverged, target, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_existing_folder_needs_overwrite(tmp_path):
    cfg, model = random_draft()
    target = write_target(tmp_path / "target")
    export_draft(cfg, model.state_dict(), target, tmp_path / "draft")
    with pytest.raises(FileExistsError):
        export_draft(cfg, model.state_dict(), target, tmp_path / "draft")
    cfg2, model2 = random_draft(seed=5)
    export_draft(cfg2, model2.state_dict(), target, tmp_path / "draft", overwrite=True)
    assert torch.equal(draft_outputs(load_draft(tmp_path / "draft")), draft_outputs(model2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft", "target"]


def test_cli_exit_codes(tmp_path, caplog, capsys):
    cfg, model = random_draft()
    export_draft(cfg, model.state_dict(), write_target(tmp_path / "target"), tmp_path / "ckpt")
    small = write_target(tmp_path / "small", num_hidden_layers=3)
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--target", str(small), "--out", str(tmp_path / "x")]) == 2
    assert "beyond the target's 3 decoder layers" in caplog.text
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--target", str(tmp_path / "target"),
                 "--out", str(tmp_path / "ok")]) == 0
    assert '"num_speculative_tokens": 3' in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated weights", "random weights", "torn config"])
def test_a_damaged_draft_file_is_one_line_naming_it_and_exit_2(damage, tmp_path, caplog):
    cfg, model = random_draft()
    target = write_target(tmp_path / "target")
    ckpt = export_draft(cfg, model.state_dict(), target, tmp_path / "ckpt")
    name = "config.json" if damage == "torn config" else "model.safetensors"
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(os.urandom(200) if damage == "random weights" else data[:len(data) // 2])
    with pytest.raises(DraftMismatch, match=f"{ckpt / name}: not "):
        read_draft(ckpt)
    caplog.clear()
    assert main(["--checkpoint", str(ckpt), "--target", str(target), "--out", str(tmp_path / "x")]) == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert str(ckpt / name) in line and "\n" not in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_exported_draft_and_checkpoint_files_are_0644_whatever_the_umask(umask, tmp_path):
    from dflashkit.train.checkpoint import save_checkpoint
    from dflashkit.train.distributed import Dist

    cfg, model = random_draft()
    target = write_target(tmp_path / "target")
    old = os.umask(umask)
    try:
        out = export_draft(cfg, model.state_dict(), target, tmp_path / "draft")
        step = save_checkpoint(tmp_path / "ckpt", 1, model, torch.optim.AdamW(model.parameters()), Dist(), {"step": 1},
                               cfg.to_json_string(), keep=1)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
             for p in [*out.iterdir(), *step.iterdir(), step.parent / "latest.json"]}
    assert set(modes.values()) == {"0o644"}, modes
