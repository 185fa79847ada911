"""Our speculative loop: the acceptance rule, the bookkeeping of accepted prefixes, and losslessness."""
from __future__ import annotations

import pytest
import torch

from dflashkit.eval.spec import SpeculativeDecoder, acceptance_stats, speculative_step
from dflashkit.eval.vllm_metrics import parse_spec_counters
from dflashkit.model import DFlashDraft
from tests.helpers.train import tiny_config

PROMPT = [5, 17, 42, 9, 63, 2, 88, 31]


@pytest.fixture(scope="module")
def tiny_target():
    """A random 6-layer Llama with the dims of tiny_config() (hidden 64, vocab 128, layers [0, 2, 4] read)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


class OracleDecoder(SpeculativeDecoder):
    """Drafts the target's own greedy continuation, wrong at a planted position each step: the accepted count of
    every step is known in advance, so the loop's cache and context bookkeeping can be checked exactly."""

    def __init__(self, target, draft, reference, wrong_at):
        super().__init__(target, draft)
        self.reference, self.wrong_at, self.step = reference, wrong_at, 0

    def _draft(self, context, anchor, pick):
        start = context.shape[0] - len(PROMPT) + 1  # output index of the first drafted token
        tokens = torch.tensor(self.reference[start: start + self.block_size - 1])
        wrong = self.wrong_at[self.step % len(self.wrong_at)]
        if wrong:
            tokens[wrong - 1] = (tokens[wrong - 1] + 1) % 128
        self.step += 1
        logits = torch.nn.functional.one_hot(tokens, 128).float() * 30
        return logits, pick(logits)


def test_greedy_rule():
    target = torch.full((4, 6), -1.0)
    target[0, 2] = target[1, 4] = target[2, 1] = target[3, 5] = 1.0  # target argmax per slot: 2, 4, 1, 5
    assert speculative_step(target, torch.zeros(3, 6), torch.tensor([2, 4, 1]), 0.0) == (3, 5)
    assert speculative_step(target, torch.zeros(3, 6), torch.tensor([2, 3, 1]), 0.0) == (1, 4)
    assert speculative_step(target, torch.zeros(3, 6), torch.tensor([0, 4, 1]), 0.0) == (0, 2)


def test_sampling_rule_gives_the_target_distribution():
    """First emitted token ~ p_1; given the first draft accepted, the second emitted token ~ p_2 (p fixed per slot)."""
    g = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 1.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    q_logits = torch.tensor([[0.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.0, 1.0]])
    q = torch.softmax(q_logits, -1)
    first, second = torch.zeros(4), torch.zeros(4)
    n = 2000
    for _ in range(n):
        drafts = torch.multinomial(q, 1, generator=g).view(-1)
        a, bonus = speculative_step(p_logits, q_logits, drafts, 1.0, g)
        emitted = [int(t) for t in drafts[:a]] + [bonus]
        first[emitted[0]] += 1
        if a >= 1:
            second[emitted[1]] += 1
    p = torch.softmax(p_logits, -1)
    # Total variation; its sampling noise at these counts is ~0.03 (the bounds are > 3 standard deviations).
    assert (first / n - p[0]).abs().sum() < 0.08
    assert (second / second.sum() - p[1]).abs().sum() < 0.12


def test_acceptance_stats():
    s = acceptance_stats([0, 3, 1, 3], num_drafted=3)
    assert s["tau"] == (7 + 4) / 4 and s["steps"] == 4 and s["accepted_tokens"] == 7
    assert s["histogram"] == [1, 1, 0, 2]
    assert s["per_position"] == [3 / 4, 2 / 4, 2 / 4]


def test_oracle_draft_bookkeeping(tiny_target):
    """Accepted prefixes of every length, including full blocks: output = the target's own, counts as planted."""
    draft = DFlashDraft(tiny_config())
    plain = SpeculativeDecoder(tiny_target, draft)
    reference = plain.generate_target_only(PROMPT, 60)
    wrong_at = [0, 2, 1, 3, 0, 0]  # 0 = all right (3 accepted); k = draft k wrong (k-1 accepted)
    decoder = OracleDecoder(tiny_target, draft, reference, wrong_at)
    g = decoder.generate(PROMPT, 40)
    assert g.output_ids == reference[:40]
    expected = [3 if w == 0 else w - 1 for w in wrong_at]
    assert g.accepted == [expected[i % len(expected)] for i in range(g.steps)]
    assert 1 + sum(a + 1 for a in g.accepted[:-1]) < 40 <= 1 + sum(a + 1 for a in g.accepted)


def test_lossless_with_a_real_draft(tiny_target):
    torch.manual_seed(3)
    decoder = SpeculativeDecoder(tiny_target, DFlashDraft(tiny_config()))
    reference = decoder.generate_target_only(PROMPT, 24)
    g = decoder.generate(PROMPT, 24)
    assert g.output_ids == reference and len(g.output_ids) == 24
    # The prefill gives one token, each verify step accepted + 1; the loop stops at the first step reaching 24.
    assert 1 + sum(a + 1 for a in g.accepted[:-1]) < 24 <= 1 + sum(a + 1 for a in g.accepted)
    # Stops at EOS like the target alone does, and a smaller block drafts fewer tokens.
    eos = {reference[5]}
    assert decoder.generate(PROMPT, 24, eos_token_ids=eos).output_ids == reference[: reference.index(reference[5]) + 1]
    assert SpeculativeDecoder(tiny_target, decoder.draft, block_size=2).generate(PROMPT, 24).output_ids == reference
    sampled = decoder.generate(PROMPT, 24, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(sampled.output_ids) == 24 and all(0 <= a <= 3 for a in sampled.accepted)


class RecordingDecoder(SpeculativeDecoder):
    """Keeps what the loop drafted at each step: (anchor position, draft logits)."""

    def __init__(self, target, draft):
        super().__init__(target, draft)
        self.drafted: list[tuple[int, torch.Tensor]] = []

    def _draft(self, context, anchor, pick):
        logits, drafts = super()._draft(context, anchor, pick)
        self.drafted.append((context.shape[0], logits, drafts))
        return logits, drafts


def test_training_pass_drafts_what_the_loop_drafts(tiny_target):
    """Train/inference parity: the training forward (hidden states of the finished sequence from one target pass, as
    the dump stores them; every step's block in one multi-block pass under the training mask) gives the draft logits
    the loop computed step by step from its KV-cached, cut-back target. A mismatch here would train the draft on a
    task it never faces when served."""
    torch.manual_seed(5)
    draft = DFlashDraft(tiny_config())
    decoder = RecordingDecoder(tiny_target, draft)
    g = decoder.generate(PROMPT, 30)
    ids = torch.tensor(g.prompt_ids + g.output_ids)[None]
    logits = decoder.every_anchor_logits(ids[0].tolist(), torch.tensor([position for position, *_ in decoder.drafted]))
    assert len(decoder.drafted) == g.steps > 10
    for (position, loop_logits, _), train_logits in zip(decoder.drafted, logits):
        assert ids[0, position] == g.output_ids[position - len(PROMPT)]  # the anchor is the token at its position
        torch.testing.assert_close(train_logits, loop_logits, atol=2e-4, rtol=1e-4)


def test_parse_vllm_spec_counters():
    text = """# HELP vllm:spec_decode_num_drafts Number of spec decoding drafts.
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.7e+09
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 12.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 4.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 8.0
"""
    c = parse_spec_counters(text)
    assert (c.drafts, c.accepted, c.per_position) == (10.0, 12.0, [8.0, 4.0])
    assert c.stats()["tau"] == pytest.approx(2.2) and c.stats()["per_position"] == [0.8, 0.4]
    with pytest.raises(ValueError, match="speculative-config"):
        parse_spec_counters("vllm:num_requests_running 0\n")
