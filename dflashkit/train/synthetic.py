"""Dump-shaped micro-batches of random data, for the step benchmarks (bench/train_step.py, bench/peers/) and the GPU
tests: what a collated batch of real dump records looks like to the trainer, at any dims, without a dump."""
from __future__ import annotations

import torch

from dflashkit.train.data import anchor_generator, collate, sample_anchors


def synthetic_batch(*, micro: int, seq: int, width: int, anchors: int, vocab: int, block_size: int,
                    seed: int, lengths: list[int] | None = None) -> dict:
    """`micro` sequences of `seq` token ids below `vocab`: a prompt (the first quarter, outside the loss mask), then
    the answer; `width` bf16 features per position (the fused target layers); `anchors` sampled per sequence as the
    trainer samples them. `lengths`: the rows' lengths instead (cycled), so the batch is padded as real data is.
    The same seed gives the same batch."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(micro):
        n = lengths[i % len(lengths)] if lengths else seq
        loss_mask = torch.zeros(n, dtype=torch.uint8)
        loss_mask[n // 4:] = 1
        a, valid = sample_anchors(loss_mask, anchors, anchor_generator(seed, 0, i))
        items.append({"input_ids": torch.randint(0, vocab, (n,), generator=g),
                      "aux_hidden_states": torch.randn(n, width, generator=g).to(torch.bfloat16),
                      "loss_mask": loss_mask, "anchors": a, "anchor_valid": valid, "length": torch.tensor(n)})
    return collate(items, block_size)
