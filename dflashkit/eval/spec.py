"""Our speculative-decoding loop: an HF target verifies the blocks a draft proposes, one request at a time.

One step, as vLLM runs it. The target has processed every token but the last emitted one, the anchor at position p;
its hidden states at the draft's target layers are known for positions 0..p-1 (the draft's context). The draft reads
that context and the block `[anchor, mask x (B-1)]` at positions p..p+B-1 and proposes K tokens: a DFlash draft
d_1..d_{B-1} in one pass (K = B-1); a DSpark draft d_1..d_B (K = B), its backbone in one pass and then its Markov
head left to right, each draft's bias from the one before (`DSparkDraft.propose`). The target runs the anchor and
the drafts in one forward, accepts the longest prefix it agrees with, and adds one token
of its own: each step emits `accepted + 1` tokens for one target forward. The step's new hidden states (anchor and
accepted drafts) extend the context; the KV cache is cut back to them.

Acceptance (`speculative_step`): at temperature 0 a draft is accepted while it equals the target's argmax; otherwise
the standard rule (Leviathan et al., Chen et al.): accept d_k with probability min(1, p_k(d_k) / q_k(d_k)), else draw
from normalize(max(p_k - q_k, 0)) and stop; after B-1 acceptances draw one more token from p_B. The output then has
the target's distribution exactly. The rule needs no more than that q_k was fixed before d_k was drawn (DFlash's q_k
does not depend on d_1..d_{k-1}; DSpark's does, through the Markov bias, and is computed before d_k is drawn).

Counting follows vLLM's metrics: `accepted` per verify step is what the rejection rule gives, before the output is cut
at EOS or at max_new_tokens, and the prefill (which drafts nothing) is not a step.
"""
from __future__ import annotations

import dataclasses

import torch

from dflashkit.model import DFlashDraft
from dflashkit.model.layers import hf_hidden_states_index
from dflashkit.model.masks import block_inputs, dense_mask, previous_tokens, training_mask


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    accepted: list[int]  # drafts accepted at each verify step, 0..block_size-1

    @property
    def steps(self) -> int:
        return len(self.accepted)


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def speculative_step(target_logits: torch.Tensor, draft_logits: torch.Tensor, drafts: torch.Tensor,
                     temperature: float, generator: torch.Generator | None = None) -> tuple[int, int]:
    """target_logits [K+1, V] (row k: the target's next-token logits after the anchor and d_1..d_k), draft_logits
    [K, V], drafts [K]. Returns (accepted count a, the target's own next token after d_1..d_a)."""
    k_max = drafts.shape[0]
    if temperature == 0:
        agree = (target_logits[:k_max].argmax(-1) == drafts).int()
        accepted = int(agree.cumprod(0).sum())
        return accepted, int(target_logits[accepted].argmax())
    p = probabilities(target_logits, temperature)
    q = probabilities(draft_logits, temperature)
    for k in range(k_max):
        token = int(drafts[k])
        ratio = p[k, token] / q[k, token].clamp(min=torch.finfo(torch.float32).tiny)
        if torch.rand((), generator=generator, device=p.device) < ratio:
            continue
        residual = (p[k] - q[k]).clamp(min=0)
        # The residual is all zeros only when p == q, where a rejection cannot happen; p is the safe fallback.
        residual = residual if residual.sum() > 0 else p[k]
        return k, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return k_max, int(torch.multinomial(p[k_max], 1, generator=generator))


class SpeculativeDecoder:
    """An HF causal LM as the target, a draft (DFlash or DSpark) reading its hidden states. `block_size` may be smaller
    than the draft's (fewer drafted tokens per step), never larger."""

    def __init__(self, target, draft: DFlashDraft, block_size: int | None = None):
        cfg = draft.config
        self.target, self.draft = target.eval(), draft.eval()
        self.block_size = block_size or cfg.block_size
        if not 2 <= self.block_size <= cfg.block_size:
            raise ValueError(f"block_size {self.block_size}: must be in [2, {cfg.block_size}] for this draft")
        self.num_drafts = draft.num_drafts(self.block_size)  # drafted tokens per verify step
        self.mask_token_id = cfg.mask_token_id
        self.layer_index = [hf_hidden_states_index(k) for k in cfg.target_layer_ids]
        self.embed = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings().weight
        if self.lm_head.shape != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"the target's lm_head {list(self.lm_head.shape)} does not fit the draft "
                             f"(vocab {cfg.vocab_size}, hidden {cfg.hidden_size})")
        self.device = self.lm_head.device

    def _target(self, ids: torch.Tensor, cache, logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [T, V] (the last `logits_to_keep` rows if > 0) and the draft's context features [T, n*H] of `ids`
        [T], appended to `cache`."""
        out = self.target(input_ids=ids[None], past_key_values=cache, use_cache=True, output_hidden_states=True,
                          logits_to_keep=logits_to_keep)
        features = torch.cat([out.hidden_states[i][0] for i in self.layer_index], dim=-1)
        return out.logits[0].float(), features

    def _draft(self, context: torch.Tensor, anchor: int, pick) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft logits [K, V], drafts [K]) for the block after `anchor`, whose position is len(context); `pick`
        turns a row of logits into a token."""
        pos = context.shape[0]
        block = torch.full((self.block_size,), self.mask_token_id, device=self.device)
        block[0] = anchor
        block_pos = torch.arange(pos, pos + self.block_size, device=self.device)[None]
        mask = dense_mask(torch.tensor([[pos]], device=self.device), pos, self.block_size)
        inputs = (context[None], self.embed(block)[None], torch.arange(pos, device=self.device)[None], block_pos, mask)
        return self.draft.propose(inputs, anchor, self.lm_head, pick)

    def _pick(self, logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        flat = probabilities(logits, temperature).reshape(-1, logits.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).view(logits.shape[:-1])

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 eos_token_ids: set[int] = frozenset(), generator: torch.Generator | None = None) -> Generation:
        from transformers import DynamicCache

        cache = DynamicCache()
        logits, context = self._target(torch.tensor(prompt_ids, device=self.device), cache, logits_to_keep=1)
        output = [int(self._pick(logits[-1], temperature, generator))]
        accepted: list[int] = []
        while len(output) < max_new_tokens and output[-1] not in eos_token_ids:
            anchor = output[-1]
            draft_logits, drafts = self._draft(context, anchor, lambda row: self._pick(row, temperature, generator))
            verify_logits, verify_features = self._target(
                torch.cat([torch.tensor([anchor], device=self.device), drafts]), cache)
            a, bonus = speculative_step(verify_logits, draft_logits, drafts, temperature, generator)
            accepted.append(a)
            output += [int(t) for t in drafts[:a]] + [bonus]
            # Keep what the target now holds for real: the anchor and the accepted drafts.
            context = torch.cat([context, verify_features[: a + 1]])
            rejected = cache.get_seq_length() - context.shape[0]
            if rejected:
                cache.crop(-rejected)
        output = output[:max_new_tokens]
        for i, token in enumerate(output):
            if token in eos_token_ids:
                output = output[: i + 1]
                break
        return Generation(list(prompt_ids), output, accepted)

    @torch.inference_mode()
    def every_anchor_logits(self, ids: list[int], anchors: torch.Tensor) -> torch.Tensor:
        """Draft logits [N, K, V] for the blocks at `anchors` [N] (sorted positions) of the finished sequence `ids`,
        computed as training does: context features from one target pass over the whole sequence, every block in one
        pass under the training mask, DSpark's Markov bias from the sequence's own previous tokens. Equal to what the
        loop drafts at those anchors, for DSpark along each step's accepted prefix (tests/unit/test_eval_spec.py)."""
        seq = torch.tensor(ids, device=self.device)[None]
        states = self.target(input_ids=seq, output_hidden_states=True).hidden_states
        features = torch.cat([states[i] for i in self.layer_index], dim=-1)
        anchors = anchors.to(self.device)[None]
        block_ids, block_pos = block_inputs(seq, anchors, self.block_size, self.mask_token_id)
        mask = training_mask(anchors, seq.shape[1], self.block_size, "sdpa")
        inputs = (features, self.embed(block_ids), torch.arange(seq.shape[1], device=self.device)[None], block_pos, mask)
        previous = previous_tokens(seq, anchors, self.block_size)
        return self.draft.teacher_forced_logits(inputs, previous, self.lm_head, self.block_size)[0]

    @torch.inference_mode()
    def generate_target_only(self, prompt_ids: list[int], max_new_tokens: int,
                             eos_token_ids: set[int] = frozenset()) -> list[int]:
        """Plain greedy decoding with the target, token by token: the reference of the lossless check."""
        from transformers import DynamicCache

        cache = DynamicCache()
        logits, _ = self._target(torch.tensor(prompt_ids, device=self.device), cache, logits_to_keep=1)
        output = [int(logits[-1].argmax())]
        while len(output) < max_new_tokens and output[-1] not in eos_token_ids:
            logits, _ = self._target(torch.tensor(output[-1:], device=self.device), cache)
            output.append(int(logits[-1].argmax()))
        return output


def acceptance_stats(accepted: list[int], num_drafted: int) -> dict:
    """tau (tokens per verify step), the acceptance-length histogram (steps that accepted exactly a drafts, a =
    0..num_drafted) and per-position acceptance (the fraction of steps whose draft k was accepted, k = 1..num_drafted,
    vLLM's accepted_tokens_per_pos / drafts)."""
    steps = len(accepted)
    histogram = [0] * (num_drafted + 1)
    for a in accepted:
        histogram[a] += 1
    per_position = [sum(h for a, h in enumerate(histogram) if a >= k) / steps if steps else 0.0
                    for k in range(1, num_drafted + 1)]
    return {"steps": steps, "accepted_tokens": sum(accepted),
            "tau": (sum(accepted) + steps) / steps if steps else None,
            "per_position": per_position, "histogram": histogram}
