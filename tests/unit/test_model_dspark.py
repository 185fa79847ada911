"""DSpark drafts: the config contract, the training objective (teacher-forced Markov head, confidence head), export
round trip and refusals, train/serve parity of the sequential Markov stage, losslessness."""
from __future__ import annotations

import json

import pytest
import torch
from test_eval_spec import PROMPT, tiny_target  # noqa: F401  (fixture)
from test_export import write_target

from dflashkit.eval.spec import SpeculativeDecoder
from dflashkit.export import DraftMismatch, export_draft, load_draft, main
from dflashkit.model import DFlashConfig, DSparkConfig, DSparkDraft, config_from_dict, kind_of_config
from dflashkit.model.masks import block_inputs, block_labels, dense_mask, previous_tokens
from dflashkit.train.config import LossSpec
from dflashkit.train.loss import block_loss
from dflashkit.train.objectives import OBJECTIVES
from tests.helpers.train import tiny_config


def dspark_config(**overrides) -> DSparkConfig:
    base = tiny_config().to_dict() | {"architectures": ["Qwen3DSparkModel"], "markov_rank": 8}
    return DSparkConfig.from_dict(base | overrides)


def random_dspark(seed=0, **overrides) -> DSparkDraft:
    """A draft whose Markov head is not zero (the initial markov_w2 is), so every test sees the bias at work."""
    torch.manual_seed(seed)
    draft = DSparkDraft(dspark_config(**overrides))
    with torch.no_grad():
        draft.markov_head.markov_w1.weight.normal_(std=1.0)
        draft.markov_head.markov_w2.weight.normal_(std=1.0)
    return draft.eval()


def test_config_layout_vllm_reads():
    cfg = dspark_config(enable_confidence_head=True, confidence_head_with_markov=False)
    out = cfg.to_dict()
    assert out["architectures"] == ["Qwen3DSparkModel"] and out["model_type"] == "qwen3"
    assert (out["markov_rank"], out["enable_confidence_head"], out["confidence_head_with_markov"],
            out["sample_from_anchor"]) == (8, True, False, True)
    assert out["dflash_config"] == {"mask_token_id": 127, "target_layer_ids": [0, 2, 4]} and out["block_size"] == 4
    assert config_from_dict(out) == cfg and kind_of_config(out).name == "dspark"
    assert isinstance(config_from_dict(tiny_config().to_dict()), DFlashConfig)
    with pytest.raises(ValueError, match="sample_from_anchor"):
        dspark_config(sample_from_anchor=False)
    with pytest.raises(ValueError, match="not a draft dflashkit knows.*Qwen3DSparkModel"):
        config_from_dict(out | {"architectures": ["DSparkV41DraftModel"]})
    with pytest.raises(ValueError, match="not a DSpark draft"):
        DSparkConfig.from_dict(tiny_config().to_dict())
    names = {n: tuple(p.shape) for n, p in DSparkDraft(cfg).state_dict().items() if "head" in n}
    assert names == {"markov_head.markov_w1.weight": (128, 8), "markov_head.markov_w2.weight": (128, 8),
                     "confidence_head.proj.weight": (1, 64), "confidence_head.proj.bias": (1,)}


def batch(draft, seq_len=24, anchors=((3, 9, 20),), seed=0):
    cfg = draft.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (1, seq_len), generator=g)
    anchors = torch.tensor(anchors)
    loss_mask = torch.ones(1, seq_len, dtype=torch.long)
    loss_mask[0, 22] = 0
    embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    torch.nn.init.normal_(embed.weight, generator=g)
    block_ids, block_pos = block_inputs(ids, anchors, cfg.block_size, cfg.mask_token_id)
    aux = torch.randn(1, seq_len, cfg.num_fused_layers * cfg.hidden_size, generator=g)
    inputs = (aux, embed(block_ids).detach(), torch.arange(seq_len)[None], block_pos,
              dense_mask(anchors, seq_len, cfg.block_size))
    rec = {"input_ids": ids, "loss_mask": loss_mask, "anchors": anchors,
           "anchor_valid": torch.ones_like(anchors, dtype=torch.bool)}
    return rec, inputs, embed.weight.detach()


def targets(rec, width):
    """What the loader adds to a batch (`data.collate`), at the objective's label width."""
    return block_labels(rec["input_ids"], rec["loss_mask"], rec["anchors"], rec["anchor_valid"], width)


def test_training_loss_is_the_teacher_forced_cross_entropy_and_the_confidence_bce():
    """Slot k of a block predicts x[a+k+1] with the Markov bias of the true x[a+k]; the loss (equal weights) is the
    mean cross-entropy of those logits over counted slots plus 0.3 x the summed BCE of the confidence head against
    whether each slot's argmax is right, over the same normalizer."""
    draft = random_dspark()
    B, objective = draft.config.block_size, OBJECTIVES["dspark"]
    rec, inputs, lm_head = batch(draft)
    labels, counted = targets(rec, objective.label_width(B))
    assert labels.shape == (1, 3, B + 1) and not counted[..., 0].any()
    # Block at 20 of 24 tokens: x[21] counted, x[22] off the loss mask, x[23] counted, x[24] past the end.
    assert counted[0, 2].tolist() == [False, True, False, True, False]
    spec = LossSpec(decay_gamma=0.0, confidence_weight=0.3)
    hidden, extra = objective.forward(draft, inputs, rec["input_ids"], rec["anchors"], B, spec)
    loss, stats, _ = block_loss(hidden, lm_head, labels, counted, kind="ce", gamma=0.0, alpha=0.0, kd_weight=0.0,
                                **extra)

    previous = previous_tokens(rec["input_ids"], rec["anchors"], B)
    assert previous[0, 8:].tolist() == rec["input_ids"][0, [20, 21, 22, 23]].tolist()  # slot k reads x[a+k]
    out = draft(*inputs, previous)
    logits = draft.teacher_forced_logits(inputs, previous, lm_head, B)[0]  # [N, B, V]
    want, right = labels[0, :, 1:], counted[0, :, 1:]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), want.flatten(), reduction="none").view_as(want)
    correct = (logits.argmax(-1) == want).float()
    conf = out.confidence.view(3, B)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(conf, correct, reduction="none")
    torch.testing.assert_close(loss, (ce * right).sum() + 0.3 * (bce * right).sum(), rtol=1e-5, atol=1e-5)
    assert stats[1] == sum(int(torch.cumprod(correct[j] * right[j], 0).sum()) for j in range(3))
    loss.backward()
    for name in ("markov_head.markov_w1.weight", "markov_head.markov_w2.weight", "confidence_head.proj.weight",
                 "fc.weight"):
        assert dict(draft.named_parameters())[name].grad.abs().sum() > 0, name


def test_export_round_trip_same_logits_and_refusals(tmp_path, capsys):
    draft = random_dspark(seed=2)
    target = write_target(tmp_path / "target")
    out = export_draft(draft.config, draft.state_dict(), target, tmp_path / "draft")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen3DSparkModel"] and written["markov_rank"] == 8
    loaded = load_draft(out)
    assert type(loaded) is DSparkDraft
    rec, inputs, lm_head = batch(draft)
    prev = previous_tokens(rec["input_ids"], rec["anchors"], 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.teacher_forced_logits(inputs, prev, lm_head, 4),
                                   draft.teacher_forced_logits(inputs, prev, lm_head, 4), rtol=0, atol=0)
        torch.testing.assert_close(loaded(*inputs, prev).confidence, draft(*inputs, prev).confidence, rtol=0, atol=0)

    state = draft.state_dict()
    state["markov_head.markov_w1.weight"] = torch.zeros(128, 4)
    with pytest.raises(DraftMismatch, match=r"markov_head.markov_w1.weight is \[128, 4\], expected \[128, 8\]"):
        export_draft(draft.config, state, target, tmp_path / "bad")
    state = {k: v for k, v in draft.state_dict().items() if not k.startswith("confidence_head")}
    with pytest.raises(DraftMismatch, match="missing tensors: confidence_head.proj.bias"):
        export_draft(draft.config, state, target, tmp_path / "bad")
    # The same tensors under a config without the confidence head: the head's weights are not the config's.
    with pytest.raises(DraftMismatch, match="unexpected head tensors confidence_head.proj.bias, confidence_head.proj.weight: config.json "
                       "describes a DSpark draft .architectures .Qwen3DSparkModel., enable_confidence_head false"):
        export_draft(dspark_config(enable_confidence_head=False), draft.state_dict(), target, tmp_path / "bad")
    assert main(["--checkpoint", str(out), "--target", str(target), "--out", str(tmp_path / "cli")]) == 0
    hints = capsys.readouterr().out  # a DSpark block of 4 slots drafts 4 tokens
    assert '"method": "dspark"' in hints and '"num_speculative_tokens": 4' in hints and "DSPARK" in hints
    # A config that lost its DSpark architecture is read as DFlash and its Markov tensors refused.
    written["architectures"] = ["DFlashDraftModel"]
    (out / "config.json").write_text(json.dumps(written))
    assert main(["--checkpoint", str(out), "--target", str(target), "--out", str(tmp_path / "again")]) == 2


def test_without_the_confidence_head_only_the_token_loss_counts():
    draft = random_dspark(enable_confidence_head=False)
    assert draft.confidence_head is None and not any("confidence" in n for n in draft.state_dict())
    rec, inputs, lm_head = batch(draft)
    labels, counted = targets(rec, OBJECTIVES["dspark"].label_width(4))
    hidden, extra = OBJECTIVES["dspark"].forward(draft, inputs, rec["input_ids"], rec["anchors"], 4, LossSpec())
    assert set(extra) == {"markov"}
    loss, _, _ = block_loss(hidden, lm_head, labels, counted, kind="ce", gamma=0.0, alpha=0.0, kd_weight=0.0, **extra)
    logits = draft.teacher_forced_logits(inputs, previous_tokens(rec["input_ids"], rec["anchors"], 4), lm_head, 4)[0]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[0, :, 1:].flatten(), reduction="none")
    torch.testing.assert_close(loss, (ce * counted[0, :, 1:].flatten()).sum(), rtol=1e-5, atol=1e-5)


class RecordingDecoder(SpeculativeDecoder):
    def __init__(self, target, draft):
        super().__init__(target, draft)
        self.drafted: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def _draft(self, context, anchor, pick):
        logits, drafts = super()._draft(context, anchor, pick)
        self.drafted.append((context.shape[0], logits, drafts))
        return logits, drafts


def test_training_pass_drafts_what_the_sequential_loop_drafts(tiny_target):  # noqa: F811
    """Train/serve parity. The loop drafts as vLLM does (the backbone once, then the Markov bias left to right from
    the anchor and each drafted token). The training pass (every block at once, teacher-forced on the sequence's own
    tokens) gives the same logits on every slot whose previous token the loop drafted right, i.e. along each
    step's accepted prefix, and on every slot when it is teacher-forced on the loop's own drafts instead."""
    draft = random_dspark(seed=5)
    decoder = RecordingDecoder(tiny_target, draft)
    g = decoder.generate(PROMPT, 30)
    assert decoder.num_drafts == 4 and all(0 <= a <= 4 for a in g.accepted)
    ids = g.prompt_ids + g.output_ids
    anchors = torch.tensor([position for position, *_ in decoder.drafted])
    teacher_forced = decoder.every_anchor_logits(ids, anchors)
    assert len(decoder.drafted) == g.steps > 5
    for (position, loop_logits, drafts), train_logits, accepted in zip(decoder.drafted, teacher_forced, g.accepted):
        along = min(accepted + 1, len(ids) - position)  # slot k's previous token is right for k <= accepted
        torch.testing.assert_close(train_logits[:along], loop_logits[:along], atol=2e-4, rtol=1e-4)
    # Teacher-forced on the loop's own drafts, the training pass reproduces every slot of every step.
    seq = torch.tensor(ids)[None]
    states = tiny_target(input_ids=seq, output_hidden_states=True).hidden_states
    features = torch.cat([states[i] for i in decoder.layer_index], dim=-1)
    block_ids, block_pos = block_inputs(seq, anchors[None], 4, draft.config.mask_token_id)
    inputs = (features, decoder.embed(block_ids), torch.arange(len(ids))[None], block_pos,
              dense_mask(anchors[None], len(ids), 4))
    previous = torch.stack([torch.cat([seq[0, p: p + 1], d[:-1]]) for p, _, d in decoder.drafted]).view(1, -1)
    with torch.no_grad():
        logits = draft.teacher_forced_logits(inputs, previous, decoder.lm_head, 4)[0]
    torch.testing.assert_close(logits, torch.stack([lg for _, lg, _ in decoder.drafted]), atol=2e-4, rtol=1e-4)


def test_lossless_with_a_dspark_draft(tiny_target):  # noqa: F811
    decoder = SpeculativeDecoder(tiny_target, random_dspark(seed=3))
    reference = decoder.generate_target_only(PROMPT, 24)
    assert decoder.generate(PROMPT, 24).output_ids == reference
    smaller = SpeculativeDecoder(tiny_target, decoder.draft, block_size=2)
    assert smaller.num_drafts == 2 and smaller.generate(PROMPT, 24).output_ids == reference
    sampled = decoder.generate(PROMPT, 24, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(sampled.output_ids) == 24 and all(0 <= a <= 4 for a in sampled.accepted)
