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


# create_block_mask evaluates the rule densely, [rows, Q, KV] and an int64 copy of it: 20 GiB for a held-out batch of
# 32 rows x 512 anchors. Rows are taken in chunks of at most this many mask elements (about 1.2 GB at the peak).
MASK_CHUNK_ELEMENTS = 1 << 27


def flex_block_mask(anchors: torch.Tensor, context_len: int, block_size: int):
    """The same rule as a flex_attention BlockMask (GPU), built a chunk of rows at a time."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    b, n = anchors.shape
    q_len, kv_len = n * block_size, context_len + n * block_size

    def rule(rows_anchors: torch.Tensor):
        def allowed(batch, head, q_idx, kv_idx):
            q_block = q_idx // block_size
            in_context = kv_idx < context_len
            sees_context = in_context & (kv_idx < rows_anchors[batch, q_block])
            sees_block = ~in_context & ((kv_idx - context_len) // block_size == q_block)
            return sees_context | sees_block
        return allowed

    rows = max(1, MASK_CHUNK_ELEMENTS // (q_len * kv_len))
    if rows >= b:
        return create_block_mask(rule(anchors), B=b, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=anchors.device)
    parts = [create_block_mask(rule(anchors[i:i + rows]), B=min(rows, b - i), H=None, Q_LEN=q_len, KV_LEN=kv_len,
                               device=anchors.device) for i in range(0, b, rows)]

    def cat(name: str):
        return None if getattr(parts[0], name) is None else torch.cat([getattr(m, name) for m in parts])

    return BlockMask.from_kv_blocks(cat("kv_num_blocks"), cat("kv_indices"), cat("full_kv_num_blocks"),
                                    cat("full_kv_indices"), BLOCK_SIZE=parts[0].BLOCK_SIZE, mask_mod=rule(anchors),
                                    seq_lengths=(q_len, kv_len))


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
