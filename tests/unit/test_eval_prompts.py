"""Eval prompt sets: first turns, categories, the held-out slice, and token ids identical to the chat template's."""
from __future__ import annotations

import json

import pytest

from dflashkit.eval.prompts import load_prompts


@pytest.fixture(scope="module")
def tokenizer(prepared):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepared["model"])


def test_mtbench_by_category_first_turn(prepared, tokenizer):
    prompts = load_prompts(prepared["mtbench"], tokenizer, per_category=2)
    cats = [p.category for p in prompts]
    assert len(set(cats)) == 8 and all(cats.count(c) == 2 for c in set(cats))  # MT-Bench's 8 categories
    first = json.loads(prepared["mtbench"].read_text().split("\n")[0])
    expected = tokenizer.apply_chat_template([first["messages"][0]], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    assert prompts[0].id == first["id"] and prompts[0].prompt_ids == list(expected)
    # Only the first user turn: the second question is not in the prompt.
    second = first["messages"][2]["content"]
    assert second[:30] not in tokenizer.decode(prompts[0].prompt_ids)


def test_heldout_slice_sharegpt(prepared, tokenizer, tmp_path):
    prompts = load_prompts(prepared["sharegpt"], tokenizer, category="heldout", skip=100, limit=3)
    lines = prepared["sharegpt"].read_text().split("\n")[100:103]  # splitlines would split inside strings
    assert [p.id for p in prompts] == [json.loads(line)["id"] for line in lines]
    assert {p.category for p in prompts} == {"heldout"}
    # A system turn is kept with the first user turn; a record without a user turn is a clear error.
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "s", "messages": [{"role": "system", "content": "Be terse."},
                                                        {"role": "user", "content": "Hi"}]}) + "\n"
                    + json.dumps({"id": "bad", "messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    assert "Be terse." in tokenizer.decode(load_prompts(path, tokenizer, limit=1)[0].prompt_ids)
    with pytest.raises(ValueError, match="p.jsonl:2: unusable prompt record"):
        load_prompts(path, tokenizer)
