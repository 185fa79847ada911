"""A generated conversation -> (input_ids, loss_mask), with the length policy.

The thinking mode is replayed by passing the record's `generation.chat_template_kwargs` (exactly what the server got)
to the template. The mask comes from dflashkit/templates.py's mask source: a training template's {% generation %}
spans, or, for the checkpoint's own template (the default) or any template without those tags, each reply located in
the rendering. Either way it must hold one span per assistant turn (else the template and the data disagree) and must
be neither all zeros nor all ones.
"""
from __future__ import annotations

import dataclasses

from ..formats import BadRecord
from ..templates import assistant_spans, mask_source


@dataclasses.dataclass
class Tokenized:
    input_ids: list[int]
    loss_mask: list[int]
    truncated_from: int | None = None  # original length when the truncate policy cut it


def tokenize_conversation(tokenizer, messages: list[dict], template_kwargs: dict, template: str | None,
                          max_seq_len: int, length_policy: str, end_of_turn: str | None = None) -> Tokenized:
    """`template`: a template's text, or None for the tokenizer's own chat_template (see templates.mask_source)."""
    source = mask_source(tokenizer, template, end_of_turn)
    try:
        ids, mask = source.render(tokenizer, messages, template_kwargs)
    except BadRecord:
        raise
    except Exception as e:  # a jinja error or raise_exception in the template: this record only
        raise BadRecord("template_error", f"{type(e).__name__}: {e}") from e
    num_replies = sum(m["role"] == "assistant" for m in messages)
    spans = assistant_spans(mask)
    if len(spans) != num_replies:
        raise BadRecord("span_mismatch", f"{len(spans)} loss-mask spans for {num_replies} assistant turns: "
                                         "run `dflashkit check-template` on this template")
    truncated_from = None
    if len(ids) > max_seq_len:
        if length_policy == "skip":
            raise BadRecord("too_long", f"{len(ids)} tokens > --max-seq-len {max_seq_len}")
        truncated_from = len(ids)
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    ones = sum(mask)
    if ones == 0:
        raise BadRecord("mask_all_zero", f"no assistant-output token in {len(ids)} tokens"
                        + (f" (truncated from {truncated_from})" if truncated_from else ""))
    if ones == len(ids):
        raise BadRecord("mask_all_one", f"all {len(ids)} tokens are assistant output: the template marks the prompt")
    return Tokenized(ids, mask, truncated_from)
