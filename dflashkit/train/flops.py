"""Model FLOPs of a training step, the numerator of MFU.

Only matmul FLOPs count (2 per multiply-add); norms, RoPE, softmax, SwiGLU's elementwise product, the loss and the
optimizer are a fraction of a percent at real dims and are left out, as is recomputation (activation checkpointing,
the lm_head chunks recomputed in backward, flash attention's recomputed scores): MFU counts the work the model needs,
not the work an implementation chooses to do. Per sequence of S real (unpadded) positions with N real blocks of B
tokens (Q = N*B block tokens), H hidden, n fused target layers, heads h_q / h_kv of size d, MLP width I, vocab V:

    fc fusion       2 S (n H) H                      trainable, but its input (the dump) needs no gradient: x2
    per draft layer
      q, o proj     2 Q H (h_q d)  each              trainable: x3 (forward, input grad, weight grad)
      k, v proj     2 (S + Q) H (h_kv d)  each       keys/values are [context ; block]: x3
      MLP           3 x 2 Q H I                      x3
      attention     2 x 2 h_q d x sum_j B (a_j + B)  QK^T and PV over the pairs the mask allows: block j's B queries
                                                     see the a_j context positions before its anchor and its own B
                                                     block positions; x3 (backward: dQ, dK, dV, dP)
    lm_head         2 R H V                          R = rows that count for the loss (the only rows that reach it);
                                                     frozen: forward + input grad only, x2

Padding positions, padding blocks and masked-out attention tiles are not counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from dflashkit.model import DFlashConfig
from dflashkit.model.masks import block_labels


@dataclass
class StepFlops:
    """Training FLOPs (forward + backward) by part."""
    fc: float = 0.0
    projections: float = 0.0  # q/k/v/o and MLP of every draft layer
    attention: float = 0.0
    lm_head: float = 0.0

    @property
    def total(self) -> float:
        return self.fc + self.projections + self.attention + self.lm_head

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def sequence_flops(cfg: DFlashConfig, seq_len: int, anchors: list[int], lm_head_rows: int) -> StepFlops:
    """One sequence of `seq_len` real positions, blocks at `anchors` (real ones only), `lm_head_rows` counted slots."""
    H, B, d = cfg.hidden_size, cfg.block_size, cfg.head_dim
    S, Q = seq_len, len(anchors) * B
    fc = 2 * S * cfg.num_fused_layers * H * H
    per_layer = (2 * Q * H * cfg.num_attention_heads * d * 2  # q_proj, o_proj
                 + 2 * (S + Q) * H * cfg.num_key_value_heads * d * 2  # k_proj, v_proj
                 + 3 * 2 * Q * H * cfg.intermediate_size)  # gate, up, down
    pairs = B * sum(a + B for a in anchors)  # (query, key) pairs the mask allows
    attention = 2 * 2 * cfg.num_attention_heads * d * pairs
    lm_head = 2 * lm_head_rows * H * cfg.vocab_size
    L = cfg.num_hidden_layers
    return StepFlops(fc=2 * fc, projections=3 * L * per_layer, attention=3 * L * attention, lm_head=2 * lm_head)


def batch_flops(cfg: DFlashConfig, batch: dict) -> StepFlops:
    """A collated micro-batch (train.data.collate): real lengths, real anchors, counted rows from its own tensors."""
    _, counted = block_labels(batch["input_ids"], batch["loss_mask"], batch["anchors"], batch["anchor_valid"],
                              cfg.block_size)
    total = StepFlops()
    for i in range(batch["input_ids"].shape[0]):
        anchors = batch["anchors"][i][batch["anchor_valid"][i].bool()].tolist()
        total = total + sequence_flops(cfg, int(batch["length"][i]), anchors, int(counted[i].sum()))
    return total

