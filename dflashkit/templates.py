"""Chat templates and loss masks: a conversation rendered once, 1 on the tokens the model produced.

Two mask sources (docs/FORMATS.md, "Tokenization and the loss mask"), chosen by the template itself:
- generation spans: a training template, i.e. the model's template plus `{% generation %}` around each output, rendered
  with `return_assistant_tokens_mask` (configs/templates/*-train.jinja);
- located replies: any template without those tags, the checkpoint's own `chat_template` by default. Each reply is
  found in the rendered text and its characters, through the end-of-turn token that follows, are mapped to tokens by
  the tokenizer's offsets. Whatever the template drops or rewrites (the reasoning of earlier turns) is therefore what
  the model sees, and is not trained on.
`dflashkit check-template` (dflashkit/template_check.py) proves either against the other and against the replies.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from pathlib import Path

from .formats import BadRecord

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "configs" / "templates"
GENERATION_SPANS, LOCATED_REPLIES = "generation_spans", "located_replies"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# What the end-of-turn probe renders: the first token the template writes after this reply ends the turn.
_PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]


def read_template(spec: str) -> str:
    """A template from a path, or a bare name under configs/templates/ ("smollm2-thinking-train")."""
    path = Path(spec)
    if not path.exists():
        path = TEMPLATES_DIR / (spec if spec.endswith(".jinja") else spec + ".jinja")
    if not path.exists():
        raise FileNotFoundError(f"chat template {spec!r}: no such file (nor under {TEMPLATES_DIR})")
    return path.read_text(encoding="utf-8")


def template_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def has_generation_spans(template: str) -> bool:
    return bool(_GENERATION_TAG.search(template))


def assistant_spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of ones in a 0/1 mask."""
    spans, start = [], None
    for i, bit in enumerate(list(mask) + [0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


def render(tokenizer, messages: list[dict], template: str, kwargs: dict, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt, **kwargs)


def render_training(tokenizer, messages: list[dict], template: str, kwargs: dict) -> tuple[list[int], list[int]]:
    """Token ids and the assistant (loss) mask of a finished conversation under a training template."""
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        add_generation_prompt=False, **kwargs)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if len(ids) != len(mask):
        raise ValueError(f"assistant mask has {len(mask)} entries for {len(ids)} tokens")
    return ids, mask


# ---- located replies ------------------------------------------------------------------------------------------------

def _shown_tail(shown: str, reply: str) -> tuple[int, int]:
    """Where in `shown` the longest tail of `reply` that `shown` ends with begins, and how many characters of it
    match. Whitespace is not compared: templates trim and re-space the text around think tags and answers."""
    i, j, start, matched = len(shown), len(reply), len(shown), 0
    while True:
        while i and shown[i - 1].isspace():
            i -= 1
        while j and reply[j - 1].isspace():
            j -= 1
        if not i or not j or shown[i - 1] != reply[j - 1]:
            return start, matched
        i, j, start, matched = i - 1, j - 1, i - 1, matched + 1


def reply_span(text: str, before: str, prompt: str, reply: str, end_of_turn: str, turn: int) -> tuple[int, int]:
    """[start, end) characters of assistant turn `turn` in `text`, the whole conversation rendered.

    `before` is the rendering of the messages before the turn, `prompt` the same with the generation prompt: what the
    model was given when it wrote the reply. The turn's text runs from the end of `before` to the first end-of-turn
    token after it. The span ends with that token. It starts where the generation prompt ends when the turn renders
    after that prompt (the turn as the model produced it, whatever the template normalizes inside); otherwise the
    template rewrote the turn (e.g. dropped its reasoning) and the span is the tail of the reply it still shows
    (compared without whitespace, which templates trim and re-space around think tags and answers).
    Either way the turn must still end with the reply's last line, or the reply is not recognizably there.
    """
    def missing(why: str) -> BadRecord:
        return BadRecord("reply_not_found", f"assistant turn {turn}: {why}")

    if not text.startswith(before):
        raise missing("the conversation's rendering does not begin with the rendering of the messages before this "
                      "turn, so the turn cannot be placed")
    end = text.find(end_of_turn, len(before))
    if end < 0:
        raise missing(f"no end-of-turn {end_of_turn!r} after it")
    shown = text[len(before):end]
    tail_start, matched = _shown_tail(shown, reply)
    last_line = reply.rstrip().rsplit("\n", 1)[-1]
    if matched < sum(not c.isspace() for c in last_line):
        raise missing(f"the template renders it as {shown.rstrip()[-60:]!r}, which does not end with the reply's "
                      f"last line {last_line.strip()[-60:]!r}")
    start = len(prompt) if text.startswith(prompt) else len(before) + tail_start
    return start, end + len(end_of_turn)


def locate_replies(tokenizer, messages: list[dict], template: str, kwargs: dict,
                   end_of_turn: str) -> tuple[list[int], list[int]]:
    """Token ids of the conversation rendered once under `template`, and 1 on each reply's located tokens."""
    text = render(tokenizer, messages, template, kwargs)
    spans = []
    for turn, i in enumerate(i for i, m in enumerate(messages) if m["role"] == "assistant"):
        before = render(tokenizer, messages[:i], template, kwargs) if i else ""
        prompt = render(tokenizer, messages[:i], template, kwargs, generation_prompt=True) if i else ""
        spans.append(reply_span(text, before, prompt, messages[i]["content"], end_of_turn, turn))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # A token straddling a span edge is marked, as return_assistant_tokens_mask marks it (char_to_token).
    mask = [int(any(s < b and e > a for a, b in spans)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def end_of_turn_token(tokenizer, template: str) -> str:
    """The token the template writes right after a reply: the one that ends an assistant turn."""
    before = render(tokenizer, _PROBE[:1], template, {})
    text = render(tokenizer, _PROBE, template, {})
    at = text.find(_PROBE[1]["content"], len(before)) if text.startswith(before) else -1
    rest = text[at + len(_PROBE[1]["content"]):] if at >= 0 else ""
    ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
    token = tokenizer.decode(ids[:1]) if ids else ""
    if not token or token not in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        raise ValueError(f"cannot tell this template's end-of-turn token (after a reply it writes {rest[:20]!r}); "
                         "name it (--end-of-turn)")
    return token


# ---- the mask source: which template, which way -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MaskSource:
    """How the dump and the online mode turn a conversation into (input_ids, loss_mask); recorded in meta.json."""
    kind: str  # GENERATION_SPANS or LOCATED_REPLIES
    template: str  # the jinja text rendered
    end_of_turn: str | None = None  # located replies: the token each span ends with

    def render(self, tokenizer, messages: list[dict], kwargs: dict) -> tuple[list[int], list[int]]:
        if self.kind == GENERATION_SPANS:
            return render_training(tokenizer, messages, self.template, kwargs)
        return locate_replies(tokenizer, messages, self.template, kwargs, self.end_of_turn)


@functools.lru_cache(maxsize=8)
def mask_source(tokenizer, template: str | None = None, end_of_turn: str | None = None) -> MaskSource:
    """A training template's generation spans; for a template without them, or none (the tokenizer's own
    `chat_template`), the located replies. Raises ValueError when there is no template to render."""
    if template is not None and has_generation_spans(template):
        return MaskSource(GENERATION_SPANS, template)
    template = template if template is not None else tokenizer.chat_template
    if not template:
        raise ValueError("the tokenizer has no chat_template: name a template (--chat-template)")
    if not tokenizer.is_fast:
        raise ValueError("locating replies needs a fast tokenizer (character offsets)")
    return MaskSource(LOCATED_REPLIES, template, end_of_turn or end_of_turn_token(tokenizer, template))
