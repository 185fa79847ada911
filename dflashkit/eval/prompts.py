"""Evaluation prompts: the first user turn (with its system turn) of prompt records, tokenized once with the target's
chat template, so our loop and vLLM see the same token ids.

Sets: MT-Bench, reported per category (the record's `category`), and a held-out slice of the training prompts (records
the generate stage did not use: `--heldout-skip` = how many it took), reported as one category, "heldout".
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from dflashkit.formats import BadRecord, normalize_conversation
from dflashkit.io import iter_jsonl

HELDOUT_CATEGORY = "heldout"  # the category of the held-out training prompts in reports


@dataclasses.dataclass
class EvalPrompt:
    id: str
    category: str
    prompt_ids: list[int]


def first_turn(record: dict) -> list[dict]:
    turns, _ = normalize_conversation(record)
    first_user = next(i for i, t in enumerate(turns) if t.role == "user")
    return [{"role": t.role, "content": t.content} for t in turns[: first_user + 1]]


def record_id(record: dict, path: Path, lineno: int) -> str:
    for key in ("id", "conversation_id", "question_id"):
        if record.get(key) is not None:
            return str(record[key])
    return f"{path.stem}-{lineno}"


def load_prompts(path: str | Path, tokenizer, *, category: str | None = None, skip: int = 0, limit: int | None = None,
                 per_category: int | None = None, chat_template: str | None = None,
                 template_kwargs: dict | None = None) -> list[EvalPrompt]:
    """Records `skip`.. of a .jsonl prompt file, at most `limit` of them and `per_category` per category. `category`
    names the set when given, else each record's own `category` is used ("uncategorized" when absent)."""
    path = Path(path)
    prompts: list[EvalPrompt] = []
    taken: dict[str, int] = {}
    for index, (lineno, record) in enumerate(iter_jsonl(path)):
        if index < skip:
            continue
        if limit is not None and len(prompts) >= limit:
            break
        cat = category or str(record.get("category") or "uncategorized")
        if per_category is not None and taken.get(cat, 0) >= per_category:
            continue
        try:
            messages = first_turn(record)
        except BadRecord as e:
            raise ValueError(f"{path}:{lineno}: unusable prompt record ({e})") from e
        ids = tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                            tokenize=True, return_dict=True, **(template_kwargs or {}))["input_ids"]
        prompts.append(EvalPrompt(record_id(record, path, lineno), cat, list(ids)))
        taken[cat] = taken.get(cat, 0) + 1
    if not prompts:
        raise ValueError(f"{path}: no prompts after skipping {skip}")
    return prompts
