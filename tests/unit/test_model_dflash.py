"""The DFlash draft: config.json contract, exported weight names, the training mask, and that one multi-block pass
computes exactly what drafting each block on its own (as vLLM does at inference) computes."""
from __future__ import annotations

import copy

import pytest
import torch

from dflashkit.model import DFlashConfig, DFlashDraft
from dflashkit.model.masks import block_inputs, block_labels, dense_mask
from tests.helpers.train import tiny_config

# The layout of z-lab/Qwen3-4B-DFlash-b16's config.json (values as published).
ZLAB_QWEN3_4B = {
    "architectures": ["DFlashDraftModel"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "block_size": 16, "bos_token_id": 151643,
    "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]}, "dtype": "bfloat16",
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560, "initializer_range": 0.02,
    "intermediate_size": 9728, "layer_types": ["full_attention"] * 5, "max_position_embeddings": 40960,
    "max_window_layers": 5, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 5,
    "num_key_value_heads": 8, "num_target_layers": 36, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


def test_config_round_trips_the_zlab_layout():
    cfg = DFlashConfig.from_dict(ZLAB_QWEN3_4B)
    assert (cfg.block_size, cfg.mask_token_id, cfg.target_layer_ids) == (16, 151669, [1, 9, 17, 25, 33])
    assert cfg.to_dict() == ZLAB_QWEN3_4B
    assert DFlashConfig.from_dict(cfg.to_dict()) == cfg


def test_config_reads_rope_parameters_and_block_size_in_dflash_config():
    layout = copy.deepcopy(ZLAB_QWEN3_4B)
    del layout["rope_theta"], layout["rope_scaling"], layout["block_size"]
    layout["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e6, "factor": 4.0,
                                 "original_max_position_embeddings": 8192}
    layout["dflash_config"]["block_size"] = 10
    cfg = DFlashConfig.from_dict(layout)
    assert (cfg.rope_theta, cfg.rope_scaling["factor"], cfg.block_size) == (5e6, 4.0, 10)
    assert cfg.to_dict() == layout


@pytest.mark.parametrize("change, message", [
    (lambda c: c["dflash_config"].update(mask_token_id=151936), "mask_token_id"),
    (lambda c: c["dflash_config"].update(target_layer_ids=[1, 36]), "outside the target"),
    (lambda c: c.update(architectures=["Qwen3ForCausalLM"]), "not a DFlash draft"),
    (lambda c: c["dflash_config"].pop("target_layer_ids"), "target_layer_ids is missing"),
])
def test_config_refuses_inconsistent_drafts(change, message):
    layout = copy.deepcopy(ZLAB_QWEN3_4B)
    change(layout)
    with pytest.raises(ValueError, match=message):
        DFlashConfig.from_dict(layout)


def test_parameter_names_and_shapes_are_the_exported_layout():
    cfg = tiny_config()
    h, hd, nq, nkv, i = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, \
        cfg.intermediate_size
    expected = {"fc.weight": (h, 3 * h), "hidden_norm.weight": (h,), "norm.weight": (h,)}
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}."
        expected.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nq * hd, h), p + "self_attn.k_proj.weight": (nkv * hd, h),
            p + "self_attn.v_proj.weight": (nkv * hd, h), p + "self_attn.o_proj.weight": (h, nq * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    got = {k: tuple(v.shape) for k, v in DFlashDraft(cfg).state_dict().items()}
    assert got == expected


def test_dense_mask_equals_brute_force():
    torch.manual_seed(0)
    s, bs, n = 23, 4, 5
    anchors = torch.stack([torch.randint(0, s - 1, (n,)).sort().values for _ in range(3)])
    mask = dense_mask(anchors, s, bs)
    assert mask.shape == (3, 1, n * bs, s + n * bs)
    for b in range(3):
        for q in range(n * bs):
            for kv in range(s + n * bs):
                if kv < s:
                    allowed = kv < anchors[b, q // bs]
                else:
                    allowed = (kv - s) // bs == q // bs
                assert bool(mask[b, 0, q, kv]) == bool(allowed), (b, q, kv)


def test_blocks_and_labels():
    ids = torch.arange(100, 112).view(1, 12)
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1]])
    anchors, valid = torch.tensor([[3, 9, 0]]), torch.tensor([[True, True, False]])
    block_ids, pos = block_inputs(ids, anchors, 4, mask_token_id=7)
    assert block_ids.tolist() == [[103, 7, 7, 7, 109, 7, 7, 7, 100, 7, 7, 7]]
    assert pos.tolist() == [[3, 4, 5, 6, 9, 10, 11, 12, 0, 1, 2, 3]]
    labels, counted = block_labels(ids, loss_mask, anchors, valid, 4)
    assert labels[0, 0].tolist() == [103, 104, 105, 106]
    assert counted.tolist() == [[[False, True, True, True], [False, True, True, False], [False] * 4]]


def _inputs(cfg, s=20, n=4, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(b, s, cfg.num_fused_layers * cfg.hidden_size, generator=g)
    anchors = torch.stack([torch.randperm(s - 1, generator=g)[:n].sort().values for _ in range(b)])
    embeds = torch.randn(b, n * cfg.block_size, cfg.hidden_size, generator=g)
    block_pos = (anchors.unsqueeze(-1) + torch.arange(cfg.block_size)).flatten(1)
    return aux, anchors, embeds, block_pos


def _run(model, aux, anchors, embeds, block_pos):
    b, s, _ = aux.shape
    ctx_pos = torch.arange(s).expand(b, s)
    return model(aux, embeds, ctx_pos, block_pos, dense_mask(anchors, s, model.config.block_size))


@torch.no_grad()
def test_multi_block_pass_equals_drafting_each_block_alone():
    """At inference vLLM holds K/V of the target context before the anchor and runs one block of queries over
    [context ; block] with no mask. The training pass must give each block exactly that."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DFlashDraft(cfg).eval()
    aux, anchors, embeds, block_pos = _inputs(cfg)
    out = _run(model, aux, anchors, embeds, block_pos)
    bs = cfg.block_size
    for b in range(aux.shape[0]):
        for j, a in enumerate(anchors[b].tolist()):
            rows = slice(j * bs, (j + 1) * bs)
            alone = model(aux[b:b + 1, :a], embeds[b:b + 1, rows], torch.arange(a)[None], block_pos[b:b + 1, rows],
                          torch.ones(1, 1, bs, a + bs, dtype=torch.bool))
            torch.testing.assert_close(out[b, rows], alone[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_block_output_ignores_context_from_its_anchor_on():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DFlashDraft(cfg).eval()
    aux, anchors, embeds, block_pos = _inputs(cfg)
    base = _run(model, aux, anchors, embeds, block_pos)
    bs, a = cfg.block_size, int(anchors[0, 1])
    later = aux.clone()
    later[0, a:] = torch.randn_like(later[0, a:]) * 10  # the anchor's own hidden state and everything after
    changed = _run(model, later, anchors, embeds, block_pos)
    for j in range(anchors.shape[1]):
        rows = slice(j * bs, (j + 1) * bs)
        if anchors[0, j] <= a:
            torch.testing.assert_close(changed[0, rows], base[0, rows])
    earlier = aux.clone()
    earlier[0, a - 1] += 1.0  # the last context position the block may see
    assert not torch.allclose(_run(model, earlier, anchors, embeds, block_pos)[0, bs:2 * bs], base[0, bs:2 * bs])


@torch.no_grad()
def test_padding_the_context_changes_nothing():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DFlashDraft(cfg).eval()
    aux, anchors, embeds, block_pos = _inputs(cfg)
    padded = torch.cat([aux, torch.randn(aux.shape[0], 7, aux.shape[2])], dim=1)
    torch.testing.assert_close(_run(model, padded, anchors, embeds, block_pos),
                               _run(model, aux, anchors, embeds, block_pos), atol=1e-5, rtol=1e-5)
