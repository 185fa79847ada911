"""The flex_attention BlockMask's tile tables, worked out from the anchors (masks.tile_classes), are create_block_mask's
for the same rule evaluated densely, and its mask_mod is the dense rule. create_block_mask runs on the CPU, so this
needs no GPU; the attention itself on a GPU: tests/gpu/test_train_flex.py."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from dflashkit.model import masks

TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
          "full_q_num_blocks", "full_q_indices")


def anchors(b: int, s: int, n: int, seed: int) -> torch.Tensor:
    """Sorted real anchors, then padding blocks at anchor 0 (a row with fewer loss positions than n), as the loader
    hands them over."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(b):
        real = n if r == 0 else int(torch.randint(1, n + 1, (1,), generator=g))
        picked = torch.randperm(s - 1, generator=g)[:real].sort().values
        rows.append(torch.cat([picked, torch.zeros(n - real, dtype=torch.long)]))
    return torch.stack(rows)


def densely_built(a: torch.Tensor, s: int, bs: int):
    """create_block_mask's BlockMask for the same mask_mod (itself held to the dense rule below)."""
    n = a.shape[1]
    return create_block_mask(masks.mask_mod(a, s, bs), B=a.shape[0], H=None, Q_LEN=n * bs, KV_LEN=s + n * bs,
                             device="cpu")


# The training shape (64 anchors of 16 over a 2,048 context: tiles all whole), tiles cut by the end of Q and of KV,
# block sizes that do not divide a tile (DSpark's 15), a context shorter than one tile, held-out's many anchors.
@pytest.mark.parametrize("b, s, n, bs", [(4, 2048, 64, 16), (5, 300, 20, 16), (3, 1000, 30, 15), (3, 700, 17, 7),
                                         (2, 100, 9, 16), (2, 1500, 256, 16)])
def test_tile_tables_are_create_block_masks(b, s, n, bs):
    for seed in range(3):
        a = anchors(b, s, n, seed)
        ours, reference = masks.flex_block_mask(a, s, bs), densely_built(a, s, bs)
        for name in TABLES:
            assert torch.equal(getattr(ours, name).long(), getattr(reference, name).long()), (name, seed)
        assert ours.shape == reference.shape and ours.BLOCK_SIZE == reference.BLOCK_SIZE
        assert torch.equal(create_mask(ours.mask_mod, b, None, n * bs, s + n * bs, device="cpu"),
                           masks.dense_mask(a, s, bs))
