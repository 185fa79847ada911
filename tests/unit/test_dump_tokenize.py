"""Loss masks of the dump: exactly the assistant outputs plus end-of-turn, in every thinking mode, multi-turn; the
thinking mode replayed from the record; bad records refused with their reason."""
import pytest
from transformers import AutoTokenizer

from dflashkit.dump.records import iter_generated, record_messages
from dflashkit.dump.tokenize import tokenize_conversation
from dflashkit.formats import BadRecord
from dflashkit.prepare import model_dir
from dflashkit.templates import assistant_spans, read_template
from tests.helpers.dumps import bad_records, generated_record, good_records, write_shard

TEMPLATE = read_template("smollm2-thinking-train")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model_dir())


def tokenize(tokenizer, rec, max_seq_len=4096, policy="skip"):
    return tokenize_conversation(tokenizer, record_messages(rec), rec["generation"]["chat_template_kwargs"],
                                 TEMPLATE, max_seq_len, policy)


@pytest.mark.parametrize("rec", good_records(0, 6), ids=lambda r: f"{r['thinking_mode']}-{len(r['messages'])}msgs")
def test_mask_is_exactly_the_replies_and_end_of_turn(tokenizer, rec):
    tok = tokenize(tokenizer, rec)
    replies = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
    spans = assistant_spans(tok.loss_mask)
    assert [tokenizer.decode(tok.input_ids[a:b]) for a, b in spans] == [r + "<|im_end|>" for r in replies]
    # Everything outside the spans is prompt: headers, user turns, the mode's think prefix, the newline after end.
    outside = "".join(tokenizer.decode([t]) for t, m in zip(tok.input_ids, tok.loss_mask) if not m)
    assert outside.count("<|im_start|>assistant\n") == len(replies)
    # A think block the model closed itself is output; only "disabled" puts a closed (empty) block in the prompt.
    assert ("</think>" in outside) == (rec["thinking_mode"] == "disabled")


def test_thinking_mode_is_replayed_from_the_record(tokenizer):
    """The same messages tokenize differently per recorded mode, and the prefix each mode adds is never trained on."""
    texts = {}
    for mode, prefix in [("enabled", "<think>\n"), ("disabled", "<think>\n\n</think>\n\n")]:
        rec = generated_record("c", 0, mode)
        rec["messages"][1]["content"] = "Paris."
        tok = tokenize(tokenizer, rec)
        text = tokenizer.decode(tok.input_ids)
        texts[mode] = text
        assert f"<|im_start|>assistant\n{prefix}Paris.<|im_end|>" in text
        first_masked = tok.loss_mask.index(1)
        assert tokenizer.decode(tok.input_ids[:first_masked]).endswith(f"assistant\n{prefix}")
    assert texts["enabled"] != texts["disabled"]


def test_bad_records_give_their_reason(tokenizer, tmp_path):
    """Read back through the generate-output reader, as the dump does; each bad record gets its own reason."""
    bad = bad_records(100)
    write_shard(tmp_path, [rec for rec, _ in bad.values()] + good_records(0, 1))
    reasons = {}
    for rec in iter_generated(tmp_path):
        try:
            if rec.error:
                raise rec.error
            tokenize_conversation(tokenizer, record_messages(rec.record), rec.template_kwargs, TEMPLATE, 512, "skip")
            reasons[rec.id] = "ok"
        except BadRecord as e:
            reasons[rec.id] = e.reason
    assert reasons == {**{cid: reason for cid, (_, reason) in bad.items()}, "conv-0": "ok"}


def test_truncate_keeps_a_prefix_and_refuses_a_mask_left_empty(tokenizer):
    rec = generated_record("c", 0, "enabled", user_turns=3)
    full = tokenize(tokenizer, rec)
    cut = tokenize(tokenizer, rec, max_seq_len=len(full.input_ids) - 5, policy="truncate")
    assert cut.input_ids == full.input_ids[:-5] and cut.loss_mask == full.loss_mask[:-5]
    assert cut.truncated_from == len(full.input_ids)
    first_masked = full.loss_mask.index(1)
    with pytest.raises(BadRecord) as e:
        tokenize(tokenizer, rec, max_seq_len=first_masked, policy="truncate")
    assert e.value.reason == "mask_all_zero"
