"""The DSpark draft: the DFlash backbone plus a sequential low-rank Markov head and an acceptance-confidence head.

What changes from DFlash (vLLM 0.32's `Qwen3DSparkModel`, served with `method: dspark`):
- Anchor as the first prediction. A block is still `[anchor, mask x (B-1)]` at positions a..a+B-1, but query slot k
  predicts the *next* token x[a+k+1], so a block of B slots drafts B tokens (DFlash: B-1, slot k predicts x[a+k]).
  vLLM's `num_speculative_tokens` is B.
- The Markov head. The backbone's logits for slot k get a transition bias from the token before it,
  `logits_k = lm_head(h_k) + markov_w2(markov_w1[prev_k])`, with prev_0 = the anchor and prev_k = the token drafted
  at slot k-1. markov_w1 is a [V, r] embedding, markov_w2 a [V, r] projection (rank r = `markov_rank`). Served, the
  backbone runs once in parallel and the biases are added left to right, each from the token just drafted; trained,
  prev_k is the true x[a+k] (teacher forcing), which is what serving sees along every accepted prefix.
- The confidence head (optional): `sigmoid(proj([h_k ; markov_w1[prev_k]]))` (or of h_k alone), the probability
  that slot k is accepted given slots < k were; vLLM multiplies them along the block for adaptive verification.

Parameter names are the exported ones (`markov_head.markov_w1.weight`, `markov_head.markov_w2.weight`,
`confidence_head.proj.weight`, `confidence_head.proj.bias`, beside the backbone's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from dflashkit.model.config import DFlashConfig
from dflashkit.model.draft import DFlashDraft


@dataclass
class DSparkConfig(DFlashConfig):
    """DFlashConfig plus the DSpark keys vLLM reads at the top level of config.json."""

    architecture = "Qwen3DSparkModel"
    kind_label = "DSpark"

    markov_rank: int = 256
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    # vLLM's default layout (anchor predicts the first draft). The other one (1 + N fill-in, speculators' format)
    # is not trained here, so a config saying so is refused rather than served with the wrong layout.
    sample_from_anchor: bool = True

    def validate(self) -> None:
        super().validate()
        if self.markov_rank < 1:
            raise ValueError(f"markov_rank {self.markov_rank}: the Markov head needs rank >= 1")
        if not self.sample_from_anchor:
            raise ValueError("sample_from_anchor false (the 1 + N fill-in layout) is not supported; dflashkit trains "
                             "the anchor-as-first-prediction layout")

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(markov_rank=self.markov_rank, enable_confidence_head=self.enable_confidence_head,
                   confidence_head_with_markov=self.confidence_head_with_markov,
                   sample_from_anchor=self.sample_from_anchor)
        return out


class MarkovHead(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.markov_w1 = nn.Embedding(cfg.vocab_size, cfg.markov_rank)
        self.markov_w2 = nn.Linear(cfg.markov_rank, cfg.vocab_size, bias=False)


class ConfidenceHead(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.with_markov = cfg.confidence_head_with_markov
        self.proj = nn.Linear(cfg.hidden_size + (cfg.markov_rank if self.with_markov else 0), 1, bias=True)

    def forward(self, hidden: torch.Tensor, markov_embed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([hidden, markov_embed.to(hidden.dtype)], dim=-1) if self.with_markov else hidden
        return self.proj(x).squeeze(-1)  # logits; sigmoid gives the acceptance probability


class DSparkOutput(NamedTuple):
    hidden: torch.Tensor  # [b, Q, H] final-normed backbone states; slot k predicts x[a+k+1]
    markov_embed: torch.Tensor  # [b, Q, r] markov_w1 of each slot's previous token
    confidence: torch.Tensor | None  # [b, Q] confidence logits, or None without the head
    markov_w2: torch.Tensor  # [V, r]: returned from forward so sharded (FSDP2) training sees the gathered weight


class DSparkDraft(DFlashDraft):
    def __init__(self, cfg: DSparkConfig):
        super().__init__(cfg)
        self.markov_head = MarkovHead(cfg)
        self.confidence_head = ConfidenceHead(cfg) if cfg.enable_confidence_head else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        super().reset_parameters(std)
        if getattr(self, "markov_head", None) is not None:  # DFlashDraft.__init__ resets before the heads exist
            nn.init.normal_(self.markov_head.markov_w1.weight, std=std)
            # A zero transition bias: the untrained draft drafts as its backbone does, and the head learns the rest.
            nn.init.zeros_(self.markov_head.markov_w2.weight)

    @staticmethod
    def num_drafts(block_size: int) -> int:
        return block_size

    def forward(self, target_hidden, block_embeds, context_positions, block_positions, mask,
                previous_ids: torch.Tensor, *, context_index: torch.Tensor | None = None) -> DSparkOutput:
        """`previous_ids` [b, Q]: the token before each slot's prediction (the anchor for slot 0, then x[a+k]).
        `context_index`: packed `target_hidden`, as DFlashDraft.forward takes it."""
        hidden = super().forward(target_hidden, block_embeds, context_positions, block_positions, mask,
                                 context_index=context_index)
        markov_embed = self.markov_head.markov_w1(previous_ids)
        confidence = None if self.confidence_head is None else self.confidence_head(hidden, markov_embed)
        return DSparkOutput(hidden, markov_embed, confidence, self.markov_head.markov_w2.weight)

    def teacher_forced_logits(self, inputs: tuple, previous_ids: torch.Tensor, lm_head: torch.Tensor,
                              block_size: int) -> torch.Tensor:
        """[b, N, B, V]: every block's draft logits in one pass, each slot's bias from the true previous token."""
        out = self(*inputs, previous_ids)
        logits = (out.hidden @ lm_head.T.to(out.hidden.dtype)).float() + \
            (out.markov_embed @ out.markov_w2.T.to(out.markov_embed.dtype)).float()
        return logits.view(logits.shape[0], -1, block_size, logits.shape[-1])

    def propose(self, inputs: tuple, anchor: int, lm_head: torch.Tensor, pick) -> tuple[torch.Tensor, torch.Tensor]:
        """One served block: the backbone in one pass, then `markov_stage`. Returns (logits [B, V], drafts [B])."""
        hidden = super().forward(*inputs)  # the backbone alone: the heads' inputs are not known yet
        return self.markov_stage(hidden[0], anchor, lm_head, pick)

    def markov_stage(self, hidden: torch.Tensor, anchor: int, lm_head: torch.Tensor, pick):
        """The sequential stage over one block's backbone states [B, H]: slot k's logits are its base logits plus
        the bias of the token before it, the anchor for slot 0 and then each token just drafted (`pick` of the
        row before). Returns (logits [B, V], drafts [B])."""
        base = (hidden @ lm_head.T.to(hidden.dtype)).float()
        w1, w2 = self.markov_head.markov_w1.weight, self.markov_head.markov_w2.weight
        previous = torch.as_tensor(anchor, device=hidden.device)
        logits, drafts = [], []
        for k in range(hidden.shape[0]):
            logits.append(base[k] + (w1[previous] @ w2.T).float())
            drafts.append(pick(logits[-1]))
            previous = drafts[-1]
        return torch.stack(logits), torch.stack(drafts)
