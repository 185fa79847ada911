"""`dflashkit check-template`: the shipped training templates pass; templates with a misplaced span or a changed
rendering are caught. MiniMax templates are checked with SmolLM2's tokenizer plus MiniMax's markers as special tokens
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
