"""What training does differently per draft kind (`model.kind`), keyed like `dflashkit.model.KINDS`.

Both kinds are scored in one label layout, `[b, N, W]` per block: position j holds x[a + j], position 0 (the anchor)
is never counted, and the accepted run starts at position 1: `block_labels` at width W (the loader computes them,
`data.collate`). So the loss, the acceptance figures and the served walk (`loss.py`) are one code path for both.

- DFlash: W = B. Slot k of the block predicts x[a + k]; the draft's outputs are already in that layout.
- DSpark: W = B + 1. Slot k predicts x[a + k + 1] (anchor as the first prediction), so its outputs go one position
  right, behind an empty anchor row. The Markov head is teacher-forced on the true previous token x[a + k] (what
  serving sees along an accepted prefix), and the confidence head learns whether each counted slot's argmax is right.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dflashkit.model.masks import previous_tokens
from dflashkit.train.config import DraftSpec, LossSpec


class DFlashObjective:
    @staticmethod
    def config_overrides(spec: DraftSpec) -> dict:
        """The kind's own config.json fields, from the recipe's `model` section."""
        return {}

    @staticmethod
    def label_width(block_size: int) -> int:
        return block_size

    def forward(self, model, inputs: tuple, input_ids: torch.Tensor, anchors: torch.Tensor, block_size: int,
                loss: LossSpec, context_index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(draft outputs [b, N*W, H] in the label layout, block_loss's extra arguments). `context_index`: the
        packed target states' places (DFlashDraft.forward)."""
        return model(*inputs, context_index=context_index), {}


def _shift_right(x: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """[b, N*B, ...] -> [b, N*(B+1), ...] with a zero row in front of every block."""
    b, rest = x.shape[0], x.shape[2:]
    pad = (0, 0) * len(rest) + (1, 0)
    return F.pad(x.view(b, num_blocks, block_size, *rest), pad).view(b, num_blocks * (block_size + 1), *rest)


class DSparkObjective(DFlashObjective):
    @staticmethod
    def config_overrides(spec: DraftSpec) -> dict:
        return {"markov_rank": spec.markov_rank, "enable_confidence_head": spec.confidence_head,
                "confidence_head_with_markov": spec.confidence_head_with_markov}

    @staticmethod
    def label_width(block_size: int) -> int:
        return block_size + 1

    def forward(self, model, inputs, input_ids, anchors, block_size, loss, context_index=None):
        n = anchors.shape[1]
        out = model(*inputs, previous_tokens(input_ids, anchors, block_size), context_index=context_index)
        extra = {"markov": (_shift_right(out.markov_embed, n, block_size), out.markov_w2)}
        if out.confidence is not None:
            extra.update(confidence=_shift_right(out.confidence, n, block_size).view(-1, n, block_size + 1),
                         confidence_weight=loss.confidence_weight)
        return _shift_right(out.hidden, n, block_size), extra


OBJECTIVES = {"dflash": DFlashObjective(), "dspark": DSparkObjective()}
