"""Blocks and the training attention mask.

Training drafts N blocks per sequence in one pass. Block j starts at anchor a_j (a target-generated token) and is
`[x[a_j], mask, ..., mask]` at positions a_j .. a_j + B - 1; its slot k predicts x[a_j + k]. Keys are
`[context (S target positions) ; block_0 ; ... ; block_{N-1}]`, queries are the blocks. The rule, as at inference
(vLLM has the target's hidden states up to, not including, the anchor it just sampled):

    block j sees context position t  iff  t < a_j
    block j sees block i             iff  i == j   (bidirectional inside the block)

Two builders of that one rule: a dense bool mask for SDPA (CPU, and the reference the tests compare against) and a
flex_attention BlockMask (GPU), built once per batch and shared by every layer.
"""
from __future__ import annotations

import functools

import torch


def block_inputs(input_ids: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int):
    """Block token ids and positions, [b, N*B] each: `[x[a], mask x (B-1)]` at positions `a + 0..B-1`."""
    b, n = anchors.shape
    ids = torch.full((b, n, block_size), mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
    ids[:, :, 0] = torch.gather(input_ids, 1, anchors)
    positions = anchors.unsqueeze(-1) + torch.arange(block_size, device=anchors.device)
    return ids.view(b, n * block_size), positions.view(b, n * block_size)


def previous_tokens(input_ids: torch.Tensor, anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """[b, N*B]: x[a + k] for slot k of each block, the token before slot k's prediction (past the end: the last).
    DSpark's Markov head reads them, teacher-forced, in training (dspark.py)."""
    idx = (anchors.unsqueeze(-1) + torch.arange(block_size, device=anchors.device)).clamp(max=input_ids.shape[1] - 1)
    return torch.gather(input_ids, 1, idx.flatten(1))


def block_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor,
                 block_size: int):
    """Targets [b, N, B] (slot k of block j: x[a_j + k]) and where they count: slot k >= 1, inside the sequence,
    on a loss-mask position, in a real (not padding) block."""
    seq_len = input_ids.shape[1]
    idx = anchors.unsqueeze(-1) + torch.arange(block_size, device=anchors.device)
    inside = idx < seq_len
    idx = idx.clamp(max=seq_len - 1)
    flat = idx.flatten(1)
    labels = torch.gather(input_ids, 1, flat).view_as(idx)
    counted = torch.gather(loss_mask.bool(), 1, flat).view_as(idx) & inside & valid.unsqueeze(-1)
    counted[:, :, 0] = False  # the anchor is given, not predicted
    return labels, counted


def dense_mask(anchors: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """Bool [b, 1, N*B, S + N*B]; True = may attend."""
    n = anchors.shape[1]
    device = anchors.device
    q_block = torch.arange(n * block_size, device=device) // block_size  # [Q]
    kv = torch.arange(context_len + n * block_size, device=device)  # [K]
    anchor_of_q = anchors[:, q_block]  # [b, Q]
    sees_context = (kv < context_len) & (kv.view(1, 1, -1) < anchor_of_q.unsqueeze(-1))
    sees_block = (kv >= context_len) & ((kv - context_len).div(block_size, rounding_mode="floor") == q_block.view(-1, 1))
    return (sees_context | sees_block).unsqueeze(1)


# flex_attention's tile: queries and keys in blocks of this many positions.
TILE = 128


def tile_classes(anchors: torch.Tensor, context_len: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query tile, key tile) pairs the rule lets attend partly and which wholly, [b, q tiles, kv tiles] bool
    each, worked out from the anchors: a query tile holds draft blocks j_lo..j_hi, so it sees a context key t
    somewhere iff t < max a_j and everywhere iff t < min a_j, and a block key tile only where the two tiles' draft
    blocks meet. create_block_mask gets the same from the rule evaluated densely over [b, Q, KV] (100M elements a
    training micro-batch of the SmolLM2 recipe, 2.7G a held-out one); this is [b, Q/128, n]. Tiles cut by the end of
    Q or KV are never whole, as there (tests/unit/test_flex_block_mask.py holds it equal to create_block_mask)."""
    n = anchors.shape[1]
    q_len, kv_len, dev = n * block_size, context_len + n * block_size, anchors.device
    q0 = torch.arange(0, q_len, TILE, device=dev)
    q1 = (q0 + TILE).clamp(max=q_len)
    j_lo, j_hi = q0 // block_size, (q1 - 1) // block_size  # the draft blocks of each query tile
    holds = (torch.arange(n, device=dev) >= j_lo[:, None]) & (torch.arange(n, device=dev) <= j_hi[:, None])
    min_anchor = torch.where(holds, anchors[:, None, :], kv_len).amin(-1)[..., None]  # [b, q tiles, 1]
    max_anchor = torch.where(holds, anchors[:, None, :], -1).amax(-1)[..., None]
    k0 = torch.arange(0, kv_len, TILE, device=dev)
    k1 = (k0 + TILE).clamp(max=kv_len)
    ctx_lo, ctx_hi = k0.clamp(max=context_len), k1.clamp(max=context_len)  # each key tile's context part
    has_ctx, has_blocks = ctx_hi > ctx_lo, k1 > context_len
    i_lo = (k0.clamp(min=context_len) - context_len) // block_size  # the draft blocks of its block part
    i_hi = (k1 - 1 - context_len).clamp(min=0) // block_size
    some = (has_ctx & (ctx_lo < max_anchor)) | (has_blocks & (i_lo <= j_hi[:, None]) & (j_lo[:, None] <= i_hi))
    all_ctx = ~has_ctx | (ctx_hi - 1 < min_anchor)
    all_blocks = ~has_blocks | ((j_lo == j_hi)[:, None] & (i_lo == i_hi) & (j_lo[:, None] == i_lo))
    cut = ((q1 - q0) < TILE)[:, None] | ((k1 - k0) < TILE)
    whole = some & all_ctx & all_blocks & ~cut
    return some & ~whole, whole


def mask_mod(anchors: torch.Tensor, context_len: int, block_size: int):
    """The rule as flex_attention's mask_mod: whether (row, query, key) may attend."""
    def allowed(batch, head, q_idx, kv_idx):
        q_block = q_idx // block_size
        in_context = kv_idx < context_len
        sees_context = in_context & (kv_idx < anchors[batch, q_block])
        sees_block = ~in_context & ((kv_idx - context_len) // block_size == q_block)
        return sees_context | sees_block
    return allowed


def flex_block_mask(anchors: torch.Tensor, context_len: int, block_size: int):
    """The same rule as a flex_attention BlockMask (GPU): its tile tables from `tile_classes`, the rule itself
    (`mask_mod`) for the tiles it sees in part."""
    from torch.nn.attention.flex_attention import BlockMask

    def table(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, 1, q tiles] counts and [b, 1, q tiles, kv tiles] key tile indices, those counted first in order."""
        order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
        return tiles.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    partly, wholly = tile_classes(anchors, context_len, block_size)
    return BlockMask.from_kv_blocks(*table(partly), *table(wholly), BLOCK_SIZE=TILE,
                                    mask_mod=mask_mod(anchors, context_len, block_size),
                                    seq_lengths=(anchors.shape[1] * block_size,
                                                 context_len + anchors.shape[1] * block_size))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as eager

    # Uncompiled flex_attention materializes the scores; compiled it is a fused kernel.
    return torch.compile(eager, dynamic=False)


def flex_attention(q, k, v, block_mask, enable_gqa: bool):
    """With enable_gqa the kernel maps each query head to its K/V head: K/V are never expanded to all heads."""
    if torch.compiler.is_compiling():  # inside a compiled draft layer, which captures flex_attention itself
        from torch.nn.attention.flex_attention import flex_attention as eager

        return eager(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def training_mask(anchors: torch.Tensor, context_len: int, block_size: int, backend: str):
    """`backend`: "flex" (GPU), "sdpa" (dense), or "auto" (flex on CUDA, dense elsewhere)."""
    if backend == "auto":
        backend = "flex" if anchors.is_cuda else "sdpa"
    if backend == "flex":
        return flex_block_mask(anchors, context_len, block_size)
    if backend == "sdpa":
        return dense_mask(anchors, context_len, block_size)
    raise ValueError(f"attention backend {backend!r}: expected flex, sdpa or auto")
