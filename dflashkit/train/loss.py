"""The block loss and the acceptance metrics.

Slot k (1..B-1) of a block predicts token x[a + k]; slot 0 is the given anchor. Two weightings of the per-slot
cross-entropy:

- "ce" (DFlash): w_k = exp(-(k - 1) / gamma). A slot only pays off when every slot before it was accepted, so early
  slots matter more.
- "dpace": weights that make the loss's gradient the gradient of the expected accepted length. With q_k the draft's
  probability of the right token at slot k, the expected number of accepted draft tokens is
  E = sum_j prod_{i<=j} q_i, and dE = sum_k dlog q_k * sum_{j>=k} prod_{i<=j} q_i. So the loss
  -sum_k w_k log q_k with the detached weight w_k = sum_{j>=k} P_j, P_j = prod_{i<=j} s_i, has gradient -dE.
  s_i = (1 - alpha) q_i + alpha smooths q so that early in training (q ~ 0) the later slots still get a signal.
  This follows the D-PACE loss as SpecForge implements it (`loss_type=dpace`); the paper itself was not available
  here, so the derivation above is ours. Normalized per block.

Optional KD adds the soft cross-entropy against the target's distribution at the same slot, which is the target's
lm_head applied to its final hidden state at position a + k - 1 (normed first when the dump stores it pre-norm).

Logits never exist as a full [tokens, vocab] fp32 tensor: rows go through the lm_head in chunks, each recomputed in
backward (activation checkpointing), or, with `grad_in_forward`, each chunk's gradient computed with its logits and
kept as [rows, hidden]; either way memory holds one chunk of logits at a time.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def position_weights(block_size: int, gamma: float, device=None) -> torch.Tensor:
    """[B]: 0 for the anchor slot, exp(-(k-1)/gamma) for k >= 1 (all 1 when gamma == 0)."""
    k = torch.arange(block_size, device=device, dtype=torch.float32)
    weights = torch.exp(-(k - 1) / gamma) if gamma > 0 else torch.ones(block_size, device=device)
    weights[0] = 0.0
    return weights


def dpace_weights(q: torch.Tensor, counted: torch.Tensor, alpha: float) -> torch.Tensor:
    """[.., B] D-PACE weights from the draft's probabilities of the right tokens (detached)."""
    smooth = torch.where(counted, (1 - alpha) * q + alpha, torch.ones_like(q))
    prefix = torch.cumprod(smooth, dim=-1) * counted
    suffix = prefix.flip(-1).cumsum(-1).flip(-1)
    return suffix * counted


def _logit_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher, markov_embed=None,
                 markov_w2=None):
    """One chunk's fp32 logits, log-partition, nll of the labels, and (with a teacher) its probabilities and the KD
    soft cross-entropy. Shared by both lm_head paths below, so they compute the same loss. With `markov_embed`
    [rows, r] and `markov_w2` [V, r] (DSpark), the logits get the Markov head's transition bias."""
    logits = (hidden @ weight.t()).float()
    if markov_embed is not None:
        logits = logits + (markov_embed @ markov_w2.t()).float()
    log_z = torch.logsumexp(logits, dim=-1)
    nll = log_z - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if teacher is None:
        return logits, log_z, nll, None, None
    target_probs = torch.softmax((teacher @ weight.t()).float(), dim=-1)
    return logits, log_z, nll, target_probs, log_z - (target_probs * logits).sum(-1)


def _chunk_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher, markov_embed=None,
                 markov_w2=None):
    logits, _, nll, _, kd = _logit_stats(hidden, weight, labels, teacher, markov_embed, markov_w2)
    return (nll, logits.argmax(-1)) if kd is None else (nll, logits.argmax(-1), kd)


@functools.cache
def _compiled(chunk_fn):
    # Fused: the fp32 cast, logsumexp, label gather and argmax read each chunk's logits once instead of writing
    # [rows, vocab] fp32 copies. Chunks differ in rows (the last one): dynamic shapes, one compilation.
    return torch.compile(chunk_fn, dynamic=True)


def _chunk_stats_and_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher):
    """_chunk_stats plus each row's gradient of nll (and of kd) w.r.t. its hidden state: d nll / d logits is
    softmax - onehot(label), d kd / d logits is softmax - target_probs; times the lm_head."""
    logits, log_z, nll, target_probs, kd = _logit_stats(hidden, weight, labels, teacher)
    probs = torch.exp(logits - log_z.unsqueeze(-1))
    d_logits = probs.scatter_add(-1, labels.unsqueeze(-1), -torch.ones_like(nll).unsqueeze(-1))
    g_kd = None if kd is None else (probs - target_probs).to(hidden.dtype) @ weight.to(hidden.dtype)
    return [nll, logits.argmax(-1), kd, d_logits.to(hidden.dtype) @ weight.to(hidden.dtype), g_kd]


class _RowStatsGradInForward(torch.autograd.Function):
    """row_stats whose backward is one scale per row: the rows' gradients are computed with the logits in forward,
    so no chunk of logits is computed twice (the checkpointed path recomputes every chunk: a third lm_head matmul)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, teacher, chunk_rows, compiled):
        chunk_fn = _compiled(_chunk_stats_and_grads) if compiled else _chunk_stats_and_grads
        with torch.no_grad():
            parts = [chunk_fn(hidden[i:i + chunk_rows], weight, labels[i:i + chunk_rows],
                              None if teacher is None else teacher[i:i + chunk_rows])
                     for i in range(0, max(1, hidden.shape[0]), chunk_rows)]  # >= 1 chunk: see row_stats
        nll, pred, kd, g_nll, g_kd = [None if p[0] is None else torch.cat(p) for p in zip(*parts)]
        ctx.save_for_backward(g_nll, g_kd)
        ctx.hidden_dtype, ctx.chunk_rows = hidden.dtype, chunk_rows
        ctx.mark_non_differentiable(pred)
        return (nll, pred) if kd is None else (nll, pred, kd)

    @staticmethod
    def backward(ctx, d_nll, d_pred, d_kd=None):
        g_nll, g_kd = ctx.saved_tensors
        # A chunk of rows at a time: the fp32 products (d_nll is fp32, the saved gradients the hidden dtype) exist
        # as [chunk_rows, H], not [rows, H] (0.7 GiB at minimax-m3's micro-batch 4); the same elementwise
        # arithmetic and the same cast to the hidden dtype, so the same values.
        grad = torch.empty(g_nll.shape, dtype=ctx.hidden_dtype, device=g_nll.device)
        for i in range(0, g_nll.shape[0], ctx.chunk_rows):
            part = slice(i, i + ctx.chunk_rows)
            chunk = d_nll[part].unsqueeze(-1) * g_nll[part]
            if g_kd is not None:
                chunk = chunk + d_kd[part].unsqueeze(-1) * g_kd[part]
            grad[part] = chunk
        return grad, None, None, None, None, None


def row_stats(hidden, lm_head, labels, teacher, chunk_rows: int, compiled: bool = False,
              grad_in_forward: bool = False, markov=None):
    """Per-row nll, argmax (and KD soft-CE) for rows of `hidden` [R, H], `chunk_rows` rows of logits at a time.
    `markov`: (embed [R, r], markov_w2 [V, r]) of a DSpark draft, or None. Its trainable markov_w2 takes the
    recomputing path, where autograd gives every gradient (the head's are a rank-r sliver of the lm_head's)."""
    if grad_in_forward and hidden.requires_grad and markov is None:
        if lm_head.requires_grad:
            raise ValueError("grad_in_forward assumes a frozen lm_head")
        return list(_RowStatsGradInForward.apply(hidden, lm_head, labels, teacher, chunk_rows, compiled))
    chunk_stats = _compiled(_chunk_stats) if compiled else _chunk_stats
    outs = []
    # At least one chunk, empty when no row counts (a micro-batch of bad records): the outputs keep their shapes.
    for start in range(0, max(1, hidden.shape[0]), chunk_rows):
        part = slice(start, start + chunk_rows)
        args = (hidden[part], lm_head, labels[part], None if teacher is None else teacher[part],
                *(() if markov is None else (markov[0][part], markov[1])))
        outs.append(checkpoint(chunk_stats, *args, use_reentrant=False) if hidden.requires_grad
                    else chunk_stats(*args))
    return [torch.cat(parts) for parts in zip(*outs)]


def block_loss(hidden, lm_head, labels, counted, *, kind: str, gamma: float, alpha: float, kd_weight: float,
               teacher=None, chunk_rows: int = 4096, rows=None, compiled: bool = False, grad_in_forward: bool = False,
               markov=None, confidence=None, confidence_weight: float = 0.0):
    """hidden [b, N*B, H] draft outputs; labels/counted [b, N, B]; teacher [b, N, B, H] target final states (normed)
    or None. Returns (weighted loss sum, its normalizer's share, stats) — the caller divides by the global
    normalizer so micro-batches and ranks add up to one big batch.
    DSpark: `markov` = (embed [b, N*B, r], markov_w2 [V, r]) adds the Markov bias to the logits, and `confidence`
    [b, N, B] logits add `confidence_weight` x the binary cross-entropy against whether each counted slot's argmax is
    right (its acceptance, given the slots before it were accepted).
    `rows`: the flat positions where `counted` is True (`counted.flatten().nonzero()[:, 0]`), on hidden's device.
    Finding them on the GPU waits for the GPU (the host needs their number); the trainer passes them precomputed
    from the CPU batch so the step never stalls. `compiled`: the lm_head/CE chunks run as one compiled kernel set."""
    b, n, bs = labels.shape
    rows = counted.flatten().nonzero()[:, 0] if rows is None else rows
    h = hidden.reshape(b * n * bs, -1).index_select(0, rows)
    t = None if teacher is None or kd_weight == 0 else teacher.reshape(b * n * bs, -1).index_select(0, rows)
    m = None if markov is None else (markov[0].reshape(b * n * bs, -1).index_select(0, rows), markov[1])
    stats = row_stats(h, lm_head, labels.flatten().index_select(0, rows), t, chunk_rows, compiled, grad_in_forward, m)
    nll = torch.zeros(b * n * bs, device=hidden.device).index_copy(0, rows, stats[0]).view(b, n, bs)
    pred = torch.zeros(b * n * bs, dtype=torch.long, device=hidden.device).index_copy(0, rows, stats[1])
    correct = (pred.view(b, n, bs) == labels) & counted
    if kind == "ce":
        weights = position_weights(bs, gamma, hidden.device) * counted
    else:
        weights = dpace_weights(torch.exp(-nll.detach()), counted, alpha)
    loss = (weights * nll).sum()
    if t is not None:
        kd = torch.zeros(b * n * bs, device=hidden.device).index_copy(0, rows, stats[2]).view(b, n, bs)
        loss = loss + kd_weight * (weights * kd).sum()
    if confidence is not None and confidence_weight > 0:
        bce = F.binary_cross_entropy_with_logits(confidence.float(), correct.float(), reduction="none")
        loss = loss + confidence_weight * (bce * counted).sum()
    accepted = accepted_per_block(correct)
    return loss, acceptance_stats(correct, counted, accepted), accepted


def normalizer(counted: torch.Tensor, kind: str, gamma: float) -> torch.Tensor:
    """What the step's loss sum is divided by: the total CE weight, or (D-PACE) the number of blocks that count."""
    if kind == "ce":
        return (position_weights(counted.shape[-1], gamma, counted.device) * counted).sum()
    return counted.any(-1).sum().float()


def accepted_per_block(correct: torch.Tensor) -> torch.Tensor:
    """[.., N] the run of correct slots from slot 1 (greedy verification: drafting stops at the first miss). A slot
    that does not count (past the answer's end) is not correct, so it ends the run like a miss."""
    return torch.cumprod(correct[..., 1:].int(), dim=-1).sum(-1)


def acceptance_stats(correct: torch.Tensor, counted: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """A flat float vector of sums, additive over micro-batches and ranks:
    [blocks, accepted tokens, correct per slot (B), counted per slot (B)]; `accepted` is accepted_per_block(correct),
    which the caller also needs."""
    return torch.cat([torch.stack([counted.any(-1).sum(), accepted.sum()]).float(),
                      (correct & counted).sum((0, 1)).float(), counted.sum((0, 1)).float()])


def summarize(stats: torch.Tensor, block_size: int) -> dict:
    """`tau_anchor_mean`: the acceptance length 1 + accepted averaged over the sampled anchors (what DFlash-style
    trainers log as tau). It is not the served tau, tokens per verify step: serving drafts only from the anchors its
    own steps reach, and a step that accepts a drafts skips the next a anchors, so easy stretches take few steps and
    hard ones many. `served_walk` gives the served figure where every anchor is scored (the held-out pass)."""
    blocks, accepted = stats[0].item(), stats[1].item()
    correct, counted = stats[2: 2 + block_size], stats[2 + block_size:]
    acc = (correct[1:] / counted[1:].clamp(min=1)).tolist()
    return {"tau_anchor_mean": 1 + accepted / max(blocks, 1),
            "acc": sum(correct[1:]).item() / max(sum(counted[1:]).item(), 1),
            "acc_per_pos": [round(a, 4) for a in acc]}


def served_walk(accepted: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor) -> tuple[int, int]:
    """(verify steps, tokens) of greedy served decoding along each record's own tokens, from every-anchor scores:
    `anchors` [b, N] sorted and covering every answer position of a stretch (`first_anchors`), `accepted` [b, N]. The
    first step drafts from an answer's first token; a step from position t emits accepted + 1 tokens and the next one
    drafts from t + accepted + 1. An anchor past a gap (the next answer) starts a new walk. At T=0 on the target's own
    greedy tokens this is what our loop and vLLM count (docs/TRAINING.md)."""
    steps = tokens = 0
    for acc_row, pos_row, ok_row in zip(accepted.tolist(), anchors.tolist(), valid.tolist()):
        next_anchor = -1
        for a, pos, ok in zip(acc_row, pos_row, ok_row):
            if ok and pos >= next_anchor:
                steps, tokens, next_anchor = steps + 1, tokens + a + 1, pos + a + 1
    return steps, tokens
