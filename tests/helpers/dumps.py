"""Generated conversations in the exact generate output format (docs/FORMATS.md), for the dump and template tests.

Replies are written the way SmolLM2 under configs/templates/smollm2-thinking.jinja produces them in each thinking
mode (the think block already open when enabled; opened by the model or absent when adaptive; an answer alone when
disabled), plus the bad records the dump must count instead of crashing on.
"""
from __future__ import annotations

import json
from pathlib import Path

REASONING = "The user wants a short answer. Recall the fact, then state it plainly."
ANSWERS = ["Paris is the capital of France.", "Here are two:\n- apples\n- pears", "6 * 7 = 42.\n"]


def reply(mode: str | None, turn: int) -> str:
    if mode == "enabled":
        return f"{REASONING}\n</think>\n\n{ANSWERS[turn % 3]}"
    if mode == "adaptive" and turn % 2 == 0:
        return f"<think>\n{REASONING}\n</think>\n\n{ANSWERS[turn % 3]}"
    return ANSWERS[turn % 3]


def generated_record(cid: str, index: int, mode: str | None, user_turns: int = 1, system: str | None = None,
                     user_text: str = "Tell me something, please.") -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for t in range(user_turns):
        messages += [{"role": "user", "content": f"{user_text} ({t})"}, {"role": "assistant", "content": reply(mode, t)}]
    kwargs = {"thinking_mode": mode} if mode else {}
    return {"id": cid, "category": "test", "messages": messages, "thinking_mode": mode,
            "generation": {"model": "smollm2", "chat_template_kwargs": kwargs,
                           "turns": [{"finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}] * user_turns,
                           "truncated": False, "repairs": [], "index": index}}


def good_records(start: int = 0, count: int = 6, user_text: str = "Tell me something, please.") -> list[dict]:
    """Every thinking mode, single and multi-turn, with and without a system turn and a think block."""
    modes = ["enabled", "disabled", "adaptive"]
    return [generated_record(f"conv-{i}", i, modes[i % 3], user_turns=1 + (i % 2) * 2,
                             system="You are terse." if i % 4 == 1 else None, user_text=user_text)
            for i in range(start, start + count)]


def bad_records(start: int) -> dict[str, tuple[dict, str]]:
    """id -> (record, the reason the dump must give)."""
    too_long = generated_record("bad-long", start, "disabled", user_text="word " * 600)
    empty = generated_record("bad-empty", start + 1, "disabled")
    empty["messages"][1]["content"] = "   "
    no_reply = generated_record("bad-noreply", start + 2, "disabled")
    no_reply["messages"] = no_reply["messages"][:1]
    order = generated_record("bad-order", start + 3, "disabled")
    order["messages"] = order["messages"][::-1]
    no_kwargs = generated_record("bad-nokwargs", start + 4, "enabled")
    del no_kwargs["generation"]
    return {"bad-long": (too_long, "too_long"), "bad-empty": (empty, "empty"),
            "bad-noreply": (no_reply, "no_assistant_turn"), "bad-order": (order, "role_order"),
            "bad-nokwargs": (no_kwargs, "missing_key")}


def write_shard(directory: Path, records: list[dict], shard: int = 0, num_shards: int = 1) -> Path:
    """A finished generate shard: the .jsonl plus its done-marker (an errors file too, which the dump must ignore)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"shard-{shard:05d}-of-{num_shards:05d}"
    Path(f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    Path(f"{stem}.errors.jsonl").write_text(json.dumps({"id": "x", "stage": "generate", "reason": "bad_json"}) + "\n")
    Path(f"{stem}.done.json").write_text(json.dumps({"stage": "generate", "counts": {}}))
    return directory
