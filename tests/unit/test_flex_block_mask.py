"""The flex_attention BlockMask built a chunk of rows at a time (held-out batches: every anchor) is the one built at
once, and both are the dense rule. create_block_mask runs on the CPU, so this needs no GPU."""
from __future__ import annotations

import torch

from dflashkit.model import masks


def anchors(b=5, s=300, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(s - 1, generator=g)[:n].sort().values for _ in range(b)]), s


def test_chunked_block_mask_equals_the_whole(monkeypatch):
    from torch.nn.attention.flex_attention import create_mask

    a, s = anchors()
    bs = 16
    whole = masks.flex_block_mask(a, s, bs)
    q_len, kv_len = a.shape[1] * bs, s + a.shape[1] * bs
    monkeypatch.setattr(masks, "MASK_CHUNK_ELEMENTS", 2 * q_len * kv_len)  # 2 rows a chunk: chunks of 2, 2, 1
    chunked = masks.flex_block_mask(a, s, bs)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert chunked.shape == whole.shape and chunked.BLOCK_SIZE == whole.BLOCK_SIZE
    # Its mask_mod addresses the whole batch: row i of the rule is row i's anchors, the dense reference.
    assert torch.equal(create_mask(chunked.mask_mod, a.shape[0], None, q_len, kv_len, device="cpu"),
                       masks.dense_mask(a, s, bs))


def test_one_row_per_chunk_when_a_row_is_over_the_limit(monkeypatch):
    a, s = anchors(b=3, s=200, n=8)
    whole = masks.flex_block_mask(a, s, 16)
    monkeypatch.setattr(masks, "MASK_CHUNK_ELEMENTS", 1)
    assert torch.equal(masks.flex_block_mask(a, s, 16).to_dense(), whole.to_dense())
