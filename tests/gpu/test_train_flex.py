"""On CUDA: the flex_attention path computes what the dense SDPA reference computes, and a bf16 training step runs."""
from __future__ import annotations

import pytest
import torch

from dflashkit.model import DFlashConfig, DFlashDraft
from dflashkit.model.masks import dense_mask, flex_block_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def config() -> DFlashConfig:
    return DFlashConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=32, intermediate_size=512, vocab_size=1000, target_layer_ids=[1, 3, 5],
                        num_target_layers=8, mask_token_id=999, block_size=16)


def inputs(cfg, b=2, s=700, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(b, s, 3 * cfg.hidden_size, generator=g)
    anchors = torch.stack([torch.randperm(s - 1, generator=g)[:n].sort().values for _ in range(b)])
    embeds = torch.randn(b, n * cfg.block_size, cfg.hidden_size, generator=g)
    block_pos = (anchors.unsqueeze(-1) + torch.arange(cfg.block_size)).flatten(1)
    return [t.cuda() for t in (aux, anchors, embeds, block_pos)]


def test_flex_block_mask_is_the_dense_rule():
    from torch.nn.attention.flex_attention import create_mask

    aux, anchors, _, _ = inputs(config())
    s, bs = aux.shape[1], 16
    block_mask = flex_block_mask(anchors, s, bs)
    q_len, kv_len = anchors.shape[1] * bs, s + anchors.shape[1] * bs
    dense = create_mask(block_mask.mask_mod, anchors.shape[0], None, q_len, kv_len, device="cuda")
    assert torch.equal(dense, dense_mask(anchors, s, bs))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_flex_forward_and_backward_match_dense(dtype, tol):
    torch.manual_seed(0)
    cfg = config()
    model = DFlashDraft(cfg).cuda()
    aux, anchors, embeds, block_pos = inputs(cfg)
    b, s = anchors.shape[0], aux.shape[1]
    ctx_pos = torch.arange(s, device="cuda").expand(b, s)
    results = []
    for mask in (dense_mask(anchors, s, cfg.block_size), flex_block_mask(anchors, s, cfg.block_size)):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(aux, embeds, ctx_pos, block_pos, mask)
        out.float().square().mean().backward()
        results.append((out.float(), model.fc.weight.grad.clone(), model.layers[0].self_attn.q_proj.weight.grad.clone()))
    for dense, flex in zip(*results):
        torch.testing.assert_close(flex, dense, atol=tol, rtol=tol)
