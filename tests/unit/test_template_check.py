"""`dflashkit check-template` and the masks it compares: the shipped training templates pass; templates with a
misplaced span or a changed rendering are caught; the mask located in the model template's rendering equals the
training template's token for token (every thinking mode, multi-turn), is right on a template without generation tags,
leaves out the reasoning a template drops, and refuses a reply rewritten beyond recognition. MiniMax templates are checked with SmolLM2's tokenizer plus MiniMax's markers as special tokens
(as in MiniMax's own vocabulary), since no MiniMax tokenizer is available offline."""
import pytest
from transformers import AutoTokenizer

from dflashkit import template_check, templates
from dflashkit.prepare import model_dir

SMOL = {"model": "smollm2-thinking", "training": "smollm2-thinking-train", "eot": "<|im_end|>",
        "tags": ("<think>", "</think>"), "modes": ["enabled", "disabled", "adaptive"], "history": "keep",
        "renormalize": "none"}
# M2.x always thinks (its generation prompt opens the block): every mode renders alike, all are checked anyway.
M27 = {"model": "minimax-m2.7", "training": "minimax-m2.7-train", "eot": "[e~[", "tags": ("<think>", "</think>"),
       "modes": ["enabled", "disabled", "adaptive"], "history": "drop", "renormalize": "minimax"}
M3 = {"model": "minimax-m3", "training": "minimax-m3-train", "eot": "[e~[", "tags": ("<mm:think>", "</mm:think>"),
      "modes": ["enabled", "disabled", "adaptive"], "history": "drop", "renormalize": "none"}
QWEN3 = {"model": "qwen3", "training": "qwen3-train", "eot": "<|im_end|>", "tags": ("<think>", "</think>"),
         "modes": ["enabled", "disabled"], "history": "drop", "renormalize": "qwen3", "key": "enable_thinking",
         "map": {"enabled": True, "disabled": False}}
MINIMAX_SPECIALS = ["]~!b[", "]~b]", "[e~[", "<think>", "</think>", "<mm:think>", "</mm:think>"]


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(model_dir())
    tok.add_special_tokens({"additional_special_tokens": MINIMAX_SPECIALS})
    return tok


def check_all(tokenizer, case, training_text=None):
    training = training_text or templates.read_template(case["training"])
    model = templates.read_template(case["model"])
    convos = template_check.synthetic_conversations(tokenizer, model, case["tags"], case["modes"],
                                                    case.get("key", "thinking_mode"), case.get("map"))
    return [template_check.check_conversation(tokenizer, msgs, kwargs, model, case["eot"], training, case["tags"],
                                              case["history"], case["renormalize"], name)
            for name, msgs, kwargs in convos]


@pytest.mark.parametrize("case", [SMOL, M27, M3, QWEN3], ids=["smollm2", "minimax-m2.7", "minimax-m3", "qwen3"])
def test_shipped_training_templates_pass(tokenizer, case):
    results = check_all(tokenizer, case)
    assert len(results) == 4 * len(case["modes"])  # {1, 3 user turns} x {system or not} per mode
    assert [r.problems for r in results if r.problems] == []
    assert all(0 < r.num_masked < r.num_tokens for r in results)


@pytest.mark.parametrize("breakage,expected", [
    # end-of-turn token left outside the span: the draft would never learn to stop
    (("{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}\n{{- '\\n' -}}",
      "{{- message['content'] -}}{%- endgeneration -%}\n{{- '<|im_end|>\\n' -}}"), "span decodes to"),
    # the think prefix (prompt, not output) pulled into the span
    (("{{- '<|im_start|>assistant\\n' + think_prefix -}}\n{%- generation -%}{{- message['content']",
      "{{- '<|im_start|>assistant\\n' -}}\n{%- generation -%}{{- think_prefix + message['content']"),
     "span decodes to"),
    # a rendering change (a blank line after each reply) that the model never saw
    (("{{- '\\n' -}}\n{%- else -%}", "{{- '\\n\\n' -}}\n{%- else -%}"), "rendered text differs"),
])
def test_broken_templates_are_caught(tokenizer, breakage, expected):
    text = templates.read_template(SMOL["training"])
    assert breakage[0] in text
    results = check_all(tokenizer, SMOL, text.replace(breakage[0], breakage[1]))
    problems = [p for r in results for p in r.problems]
    assert problems and all(any(expected in p for p in r.problems) for r in results if r.problems)


def test_cli_exit_codes(tmp_path):
    ok = template_check.main(["--tokenizer", str(model_dir()), "--training-template", "smollm2-thinking-train",
                              "--model-template", "smollm2-thinking", "--end-of-turn", "<|im_end|>"])
    broken = tmp_path / "broken.jinja"
    broken.write_text(templates.read_template("smollm2-thinking-train").replace("+ '<|im_end|>' -}}{%- endgen",
                                                                                "-}}{%- endgen"))
    bad = template_check.main(["--tokenizer", str(model_dir()), "--training-template", str(broken),
                              "--model-template", "smollm2-thinking", "--end-of-turn", "<|im_end|>"])
    assert (ok, bad) == (0, 1)


# ---- located replies: the mask from the model's own template, no generation tags needed ------------------------------

@pytest.mark.parametrize("case", [SMOL, M27, M3, QWEN3], ids=["smollm2", "minimax-m2.7", "minimax-m3", "qwen3"])
def test_located_masks_equal_the_training_templates_token_for_token(tokenizer, case):
    model, training = templates.read_template(case["model"]), templates.read_template(case["training"])
    assert not templates.has_generation_spans(model) and templates.has_generation_spans(training)
    assert templates.end_of_turn_token(tokenizer, model) == case["eot"]
    convos = list(template_check.synthetic_conversations(tokenizer, model, case["tags"], case["modes"],
                                                         case.get("key", "thinking_mode"), case.get("map")))
    assert {len(msgs) // 2 for _, msgs, _ in convos} == {1, 3}  # one and three user turns, in every mode
    for name, msgs, kwargs in convos:
        ids, mask = templates.locate_replies(tokenizer, msgs, model, kwargs, case["eot"])
        assert (ids, mask) == templates.render_training(tokenizer, msgs, training, kwargs), name


def masked_text(tokenizer, ids, mask) -> list[str]:
    return [tokenizer.decode(ids[a:b]) for a, b in templates.assistant_spans(mask)]


def test_a_template_without_generation_tags_gives_the_replies_and_end_of_turn(tokenizer):
    """SmolLM2's own checkpoint template (no tags, no thinking modes), through the dump's tokenization with no
    template named: one span per reply, exactly the reply plus <|im_end|>."""
    from dflashkit.dump.records import record_messages
    from dflashkit.dump.tokenize import tokenize_conversation
    from tests.helpers.dumps import good_records

    assert not templates.has_generation_spans(tokenizer.chat_template)
    for rec in good_records(0, 4):
        msgs = record_messages(rec)
        tok = tokenize_conversation(tokenizer, msgs, {}, None, 4096, "skip")
        assert tok.input_ids == tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)
        assert 0 < sum(tok.loss_mask) < len(tok.input_ids)
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert masked_text(tokenizer, tok.input_ids, tok.loss_mask) == [r + "<|im_end|>" for r in replies]


def test_reasoning_the_template_drops_is_not_in_the_mask(tokenizer):
    """MiniMax-M2.7 drops the reasoning of turns before the last user turn: only their answers are trained on; the
    last turn's reasoning, which the template keeps, is."""
    model = templates.read_template("minimax-m2.7")
    convos = template_check.synthetic_conversations(tokenizer, model, ("<think>", "</think>"), ["enabled"],
                                                    "thinking_mode")
    _, msgs, kwargs = next(c for c in convos if len(c[1]) == 6)
    ids, mask = templates.locate_replies(tokenizer, msgs, model, kwargs, "[e~[")
    spans = masked_text(tokenizer, ids, mask)
    assert spans[:2] == ["Paris is the capital of France.[e~[", "Sure:\n- one\n- two[e~["]
    assert "question 0" in msgs[1]["content"] and not any("question 0" in s for s in spans)
    assert spans[2].startswith("The user asks question 2") and spans[2].endswith("42, because 6 * 7 = 42.[e~[")


def test_a_reply_rewritten_beyond_recognition_is_that_records_error(tokenizer):
    from dflashkit.formats import BadRecord

    rewriting = templates.read_template("smollm2-thinking").replace("message['content']",
                                                                    "message['content'] | replace('two', '2')")
    msgs = [{"role": "user", "content": "List two."}, {"role": "assistant", "content": "Sure:\n- one\n- two"}]
    with pytest.raises(BadRecord) as e:
        templates.locate_replies(tokenizer, msgs, rewriting, {}, "<|im_end|>")
    assert e.value.reason == "reply_not_found" and "assistant turn 0" in e.value.detail and "- two" in e.value.detail


def test_check_template_names_the_first_token_the_masks_differ_on(tokenizer):
    """A training template that leaves <|im_end|> outside its spans: the comparison says where, in words."""
    broken = templates.read_template(SMOL["training"]).replace("{{- message['content'] + '<|im_end|>' -}}"
                                                               "{%- endgeneration -%}\n{{- '\\n' -}}",
                                                               "{{- message['content'] -}}{%- endgeneration -%}\n"
                                                               "{{- '<|im_end|>\\n' -}}")
    msgs = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    r = template_check.check_conversation(tokenizer, msgs, {"thinking_mode": "disabled"},
                                          templates.read_template(SMOL["model"]), "<|im_end|>", broken)
    differ = [p for p in r.problems if p.startswith("masks differ")]
    assert differ == [(f"masks differ at 1 token(s), first at token {r.num_tokens - 2} of {r.num_tokens}, "
                       "'<|im_end|>' after '\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\nHello.': the model "
                       "template trains on it, the training template does not")]


def test_cli_checks_the_model_template_alone():
    assert template_check.main(["--tokenizer", str(model_dir()), "--model-template", "smollm2-thinking"]) == 0


@pytest.mark.parametrize("case", [SMOL, M27, QWEN3], ids=["smollm2", "minimax-m2.7", "qwen3"])
def test_located_masks_equal_the_training_templates_where_the_template_renormalizes(tokenizer, case):
    """Stray newlines and spaces around think blocks and answers, which MiniMax and Qwen3 trim when re-rendering:
    the located span still starts where the generation prompt ends (or where the kept answer starts)."""
    msgs = [{"role": "user", "content": "Q0"}, {"role": "assistant", "content": "<think>\n\nR0\n\n</think>\n\n\nA0\n\n"},
            {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nR1 \n\n</think>\nA1 \n"}]
    model, training = templates.read_template(case["model"]), templates.read_template(case["training"])
    for mode in case["modes"]:
        kwargs = {case.get("key", "thinking_mode"): (case.get("map") or {}).get(mode, mode)}
        assert templates.locate_replies(tokenizer, msgs, model, kwargs, case["eot"]) == templates.render_training(
            tokenizer, msgs, training, kwargs), mode
