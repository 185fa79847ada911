"""`model.init_from_target_layers`: a fresh run starts draft layer i as target decoder layer ids[i], read from the
target's safetensors (one file or shards with an index; Qwen3 with QK-norm, Llama without); the rest keeps the seeded
init; a bad list or a draft shaped unlike the target is a one-line user error; a resumed run does not copy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dflashkit import cli
from dflashkit.config import ConfigError, from_dict
from dflashkit.model import TargetHead
from dflashkit.train import loop
from dflashkit.train.config import TrainConfig
from dflashkit.train.distributed import Dist
from dflashkit.train.loop import Trainer, draft_config, train
from tests.helpers.train import metrics, recipe

DIMS = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "tie_word_embeddings": False}
META = {"target_layer_ids": [0, 2, 4], "hidden_size": 64, "num_hidden_layers": 6, "final_state": "pre_norm"}
LAYER_TENSORS = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight", "post_attention_layernorm.weight"]


def tiny_target(path: Path, kind: str = "qwen3", shard: bool = False) -> dict[str, torch.Tensor]:
    """A random tiny target saved as HF does (sharded with an index when `shard`); returns its state dict, with the
    norms randomized so a copied norm is told from the draft's ones."""
    torch.manual_seed(1)
    model = (Qwen3ForCausalLM(Qwen3Config(**DIMS)) if kind == "qwen3" else LlamaForCausalLM(LlamaConfig(**DIMS)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size="100KB" if shard else "5GB")
    assert (path / "model.safetensors.index.json").exists() == shard
    return {k: v.clone() for k, v in model.state_dict().items()}


def build(target: Path, ids: list[int], resuming: bool = False, **model) -> Trainer:
    cfg = from_dict(TrainConfig, {"target_model": str(target), "output_dir": "unused", "data": {"dump_dirs": ["x"]},
                                  "model": {"num_layers": 2, "block_size": 4, "mask_token_id": 127,
                                            "init_from_target_layers": ids, **model}})
    return Trainer(cfg, Dist(), "pre_norm", draft_config(cfg, META), TargetHead.from_pretrained(target),
                   resuming=resuming)


@pytest.mark.parametrize("kind,shard", [("qwen3", True), ("qwen3", False), ("llama", False)])
def test_draft_layers_start_as_the_chosen_target_layers(tmp_path, kind, shard, caplog):
    target = tmp_path / "target"
    weights = tiny_target(target, kind, shard)
    with caplog.at_level("INFO", logger="dflashkit.train.loop"):
        init = build(target, [4, 1]).model.state_dict()
    assert "layers.0 <- target layer 4, layers.1 <- target layer 1" in caplog.text
    default = build(target, []).model.state_dict()
    names = LAYER_TENSORS + (["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if kind == "qwen3" else [])
    for i, t in enumerate([4, 1]):
        for name in names:
            assert torch.equal(init[f"layers.{i}.{name}"], weights[f"model.layers.{t}.{name}"]), (i, name)
            assert not torch.equal(init[f"layers.{i}.{name}"], default[f"layers.{i}.{name}"]), (i, name)
    if kind == "llama":  # no QK-norm in the target: the draft's stay at their init
        for i in (0, 1):
            assert torch.equal(init[f"layers.{i}.self_attn.q_norm.weight"], torch.ones(16))
            assert torch.equal(init[f"layers.{i}.self_attn.k_norm.weight"], torch.ones(16))
    copied = {f"layers.{i}.{n}" for i in (0, 1) for n in names}
    rest = sorted(set(init) - copied)
    assert "fc.weight" in rest and "hidden_norm.weight" in rest and "norm.weight" in rest
    for name in rest:  # the seeded init, as without the option (the final norm: the target's, as always)
        assert torch.equal(init[name], default[name]), name
    assert torch.equal(init["norm.weight"], weights["model.norm.weight"])


def test_dspark_heads_keep_their_init(tmp_path):
    target = tmp_path / "target"
    weights = tiny_target(target)
    init = build(target, [5, 0], kind="dspark", markov_rank=8).model.state_dict()
    default = build(target, [], kind="dspark", markov_rank=8).model.state_dict()
    assert torch.equal(init["layers.1.mlp.down_proj.weight"], weights["model.layers.0.mlp.down_proj.weight"])
    heads = [k for k in init if not k.startswith("layers.")]
    assert any(k.startswith("markov_head.") for k in heads)
    assert all(torch.equal(init[k], default[k]) for k in heads)


def test_a_list_that_does_not_fit_is_a_user_error(tmp_path):
    target = tmp_path / "target"
    tiny_target(target)
    with pytest.raises(ConfigError, match=r"has 3 ids, model.num_layers is 2"):
        build(target, [0, 1, 2])
    with pytest.raises(ConfigError, match=r"layer ids must be >= 0"):
        build(target, [0, -1])
    with pytest.raises(ConfigError, match=r"\[6\] outside the target's 6 decoder layers \(0..5\)"):
        build(target, [0, 6])
    with pytest.raises(ConfigError, match=r"\[6\] outside"):  # checked on resume too
        build(target, [0, 6], resuming=True)
    # A draft whose dims were overridden away from the target's: the mismatching tensor is named.
    with pytest.raises(ConfigError, match=r"target model.layers.3.mlp.gate_proj.weight is \[96, 64\], draft "
                                          r"layers.0.mlp.gate_proj.weight is \[80, 64\]"):
        build(target, [3, 4], intermediate_size=80)


def test_a_target_layer_with_tensors_the_draft_lacks_is_refused(tmp_path):
    target = tmp_path / "target"
    model = Qwen3ForCausalLM(Qwen3Config(**DIMS, attention_bias=True))  # biases the draft's layers do not have
    model.save_pretrained(target)
    with pytest.raises(ConfigError, match=r"model.layers.2.self_attn.k_proj.bias, .* no counterpart in draft layers.0"):
        build(target, [2, 3])


def test_the_cli_says_a_bad_list_on_one_line(tmp_path, capsys):
    assert cli.main(["train", "--config", str(Path(__file__).parents[2] / "configs/train/smollm2-quality.yaml"),
                     "target_model=m", f"output_dir={tmp_path}/t", f"data.dump_dirs=[{tmp_path}]",
                     "model.init_from_target_layers=[27,28]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dflashkit train: model: model.init_from_target_layers [27, 28] "
                                                   "has 2 ids, model.num_layers is"), err


def test_a_resumed_run_loads_its_checkpoint_and_copies_nothing(smollm2_dump, tmp_path, monkeypatch):
    calls = []
    real = loop.copy_target_layers
    monkeypatch.setattr(loop, "copy_target_layers", lambda *a: calls.append(a[2]) or real(*a))
    common = {"model__intermediate_size": None, "model__init_from_target_layers": [20], "checkpoint_every": 1,
              "optim__epochs": 1}
    assert train(recipe(smollm2_dump, tmp_path, optim__max_steps=1, **common), resume=False) == 0
    assert calls == [[20]]
    assert train(recipe(smollm2_dump, tmp_path, optim__max_steps=2, **common), resume=True) == 0
    assert calls == [[20]]  # not again: the resumed run took its layers from the checkpoint
    assert sorted(metrics(tmp_path)) == [1, 2]
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 2
