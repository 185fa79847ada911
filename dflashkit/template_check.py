"""`dflashkit check-template`: prove a conversation's loss mask before any GPU time is spent.

The mask comes from the model's own template (replies located in its rendering) or from a training template (its
`{% generation %}` spans); dflashkit/templates.py builds both. Over synthetic conversations (every thinking mode,
multi-turn, with and without reasoning) and, with `--input`, over generated records, this checks:

1. Exact spans. There is one contiguous span per assistant turn, in order, and its tokens decode exactly to that
   turn's output followed by the end-of-turn token. Everything else (role headers, the think prefix a thinking mode
   inserts, the text after the end-of-turn token) is outside. A token straddling a span edge shows up as a mismatch.
2. With a training template, the same tokens and the same mask: the training template renders exactly the text (and
   therefore the tokens) of the model's template, its spans add markup only, and its mask equals the located one
   token for token; the first token where they differ is reported in words.

"That turn's output" is the assistant message content as the template re-renders it: templates that hide the reasoning
of turns before the last user turn (MiniMax, Qwen3) show only the answer after the think-close tag there
(`history_reasoning="drop"`), and some re-render a kept think block in a normal form (`renormalize`: "minimax",
"qwen3"; see expected_outputs).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
from collections.abc import Iterator

from .formats import BadRecord
from .io import require_local_model
from .templates import (
    LOCATED_REPLIES,
    MaskSource,
    assistant_spans,
    end_of_turn_token,
    read_template,
    render,
    render_training,
)

log = logging.getLogger("dflashkit.check_template")

RENORMALIZE = ("none", "minimax", "qwen3")


def expected_outputs(messages: list[dict], kwargs: dict, think_tags: tuple[str, str] | None,
                     history_reasoning: str = "keep", renormalize: str = "none") -> list[str]:
    """What each assistant turn's span must hold, before the end-of-turn token (see the module doc).

    A reply holding the think-close tag is split into reasoning (before it) and answer (after it). Then:
    - a turn before the last user turn, with `history_reasoning="drop"`: the answer, newlines trimmed on both sides
      (Qwen3: leading ones only);
    - "minimax": reasoning + "\\n</think>\\n\\n" + answer, newlines around both trimmed and an opening tag the reply
      wrote itself dropped; the "<think>\\n" before it is the generation prompt's, outside the span;
    - "qwen3": the last turn, or a later one with reasoning, is "<think>\\n" + reasoning + "\\n</think>\\n\\n" +
      answer (an empty block without reasoning), all inside the span (Qwen3 opens the block itself), except the
      empty block of enable_thinking=false, which the generation prompt wrote;
    - otherwise: the content as it is.
    """
    open_tag, close_tag = think_tags or (None, None)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        text = m["content"]
        has_block = bool(close_tag) and close_tag in text
        before, answer = (text.split(close_tag)[0], text.split(close_tag)[-1]) if has_block else ("", text)
        if history_reasoning == "drop" and i < last_user:
            if has_block:
                text = answer.lstrip("\n") if renormalize == "qwen3" else answer.strip("\n")
        elif renormalize == "minimax" and has_block:
            reasoning = before.strip("\n").split(open_tag)[-1].strip("\n")
            answer = answer.strip("\n")
            text = f"{reasoning}\n{close_tag}\n\n{answer}" if reasoning else answer
        elif renormalize == "qwen3":
            reasoning = before.rstrip("\n").split(open_tag)[-1].lstrip("\n").strip("\n")
            answer = answer.lstrip("\n") if has_block else text
            if i == last_reply or reasoning:
                block = f"{open_tag}\n{reasoning}\n{close_tag}\n\n"
                thinking_off = kwargs.get("enable_thinking") is False and not reasoning
                text = answer.lstrip("\n") if thinking_off else block + answer.lstrip("\n")
            else:
                text = answer
        out.append(text)
    return out


@dataclasses.dataclass
class TemplateCheck:
    """Everything check_conversation found wrong with one conversation (empty `problems`: all good)."""
    name: str
    problems: list[str]
    num_tokens: int = 0
    num_masked: int = 0


def span_problems(tokenizer, ids: list[int], mask: list[int], wanted: list[str], source: str) -> list[str]:
    """Property 1: one span per assistant turn, decoding exactly to its output plus the end-of-turn token."""
    spans = assistant_spans(mask)
    problems = [f"{source}: {len(spans)} spans for {len(wanted)} assistant turns"] if len(spans) != len(wanted) else []
    for n, ((a, b), want) in enumerate(zip(spans, wanted)):
        got = tokenizer.decode(ids[a:b])
        if got != want:
            problems.append(f"{source}: assistant turn {n}: span decodes to {got!r}, expected {want!r}")
    return problems


def first_difference(tokenizer, ids: list[int], training: list[int], located: list[int]) -> str | None:
    """The first token the two masks disagree on, in words; None when they are equal."""
    at = next((k for k, (a, b) in enumerate(zip(training, located)) if a != b), None)
    if at is None:
        return None
    ours, theirs = ("training template", "model template") if training[at] else ("model template", "training template")
    total = sum(a != b for a, b in zip(training, located))
    return (f"masks differ at {total} token(s), first at token {at} of {len(ids)}, "
            f"{tokenizer.decode(ids[at:at + 1])!r} after {tokenizer.decode(ids[max(0, at - 12):at])!r}: the {ours} "
            f"trains on it, the {theirs} does not")


def check_conversation(tokenizer, messages: list[dict], kwargs: dict, model: str, end_of_turn: str,
                       training: str | None = None, think_tags: tuple[str, str] | None = None,
                       history_reasoning: str = "keep", renormalize: str = "none", name: str = "") -> TemplateCheck:
    """The model template's located mask (and, given, the training template) against the properties above."""
    wanted = [w + end_of_turn for w in expected_outputs(messages, kwargs, think_tags, history_reasoning, renormalize)]
    problems: list[str] = []
    text_model = render(tokenizer, messages, model, kwargs)
    try:
        ids, located = MaskSource(LOCATED_REPLIES, model, end_of_turn).render(tokenizer, messages, kwargs)
    except BadRecord as e:
        problems.append(f"model template: replies not located: {e.detail}")
        ids, located = tokenizer(text_model, add_special_tokens=False)["input_ids"], None
    if training is None:
        if located is not None:
            problems += span_problems(tokenizer, ids, located, wanted, "model template")
        return TemplateCheck(name, problems, len(ids), sum(located or []))
    text_train = render(tokenizer, messages, training, kwargs)
    if text_model != text_train:
        at = next((i for i, (a, b) in enumerate(zip(text_model, text_train)) if a != b),
                  min(len(text_model), len(text_train)))
        problems.append(f"rendered text differs at char {at}: model {text_model[at:at + 40]!r} vs training "
                        f"{text_train[at:at + 40]!r}")
    train_ids, mask = render_training(tokenizer, messages, training, kwargs)
    if train_ids != ids:
        problems.append(f"token ids differ from the model template's ({len(train_ids)} vs {len(ids)} tokens)")
    problems += span_problems(tokenizer, train_ids, mask, wanted, "training template")
    if located is not None and train_ids == ids:
        difference = first_difference(tokenizer, ids, mask, located)
        problems += [difference] if difference else []
    return TemplateCheck(name, problems, len(train_ids), sum(mask))


# ---- synthetic conversations: every thinking mode, multi-turn, with and without reasoning ---------------------------

def synthetic_conversations(tokenizer, model_template: str, think_tags: tuple[str, str], modes: list[str],
                            mode_key: str, mode_map: dict | None = None) -> Iterator[tuple[str, list[dict], dict]]:
    """(name, messages, chat_template_kwargs) covering each mode x {1, 3 user turns} x {system or not}.

    A reply looks the way the model writes it after the generation prompt its mode gives (read off the model
    template): after an open think block it continues the reasoning and closes the block; after a closed (empty) block
    it answers; after a bare header it opens its own block on even turns and answers directly on odd ones.
    """
    open_tag, close_tag = think_tags
    # Trailing newlines on some answers: templates that trim them when re-rendering must say so (--renormalize).
    answers = ["Paris is the capital of France.", "Sure:\n- one\n- two\n", "42, because 6 * 7 = 42.\n"]

    def reply(prompt: str, turn: int) -> str:
        reasoning = f"The user asks question {turn}; recall the fact and answer briefly."
        if prompt.rstrip().endswith(close_tag):
            return answers[turn]
        if prompt.rstrip().endswith(open_tag):
            return f"{reasoning}\n{close_tag}\n\n{answers[turn]}"
        return f"{open_tag}\n{reasoning}\n{close_tag}\n\n{answers[turn]}" if turn % 2 == 0 else answers[turn]

    for mode, turns, system in itertools.product(modes, (1, 3), (False, True)):
        kwargs = {mode_key: (mode_map or {}).get(mode, mode)}
        messages = [{"role": "system", "content": "You are terse."}] if system else []
        for t in range(turns):
            messages.append({"role": "user", "content": f"Question {t}: tell me something."})
            prompt = render(tokenizer, messages, model_template, kwargs, generation_prompt=True)
            messages.append({"role": "assistant", "content": reply(prompt, t)})
        yield f"{mode}-{turns}turn{'-system' if system else ''}", messages, kwargs


def conversations_from_records(path: str, limit: int) -> Iterator[tuple[str, list[dict], dict]]:
    """Generated records (docs/FORMATS.md) replayed with the kwargs recorded at generation."""
    from .dump.records import iter_generated, record_messages

    usable = 0
    for rec in iter_generated(path):
        if usable == limit:
            return
        try:
            if rec.error:
                raise rec.error
            messages = record_messages(rec.record)
        except BadRecord as e:  # the dump would skip it too; it says nothing about the template
            log.info("%s: not checked (%s)", rec.id, e)
            continue
        usable += 1
        yield rec.id, messages, rec.template_kwargs


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflashkit check-template", description=(
        "Prove that the loss mask located in the model template's rendering covers exactly each assistant output plus "
        "the end-of-turn token; with a training template, also that it renders the model template's tokens exactly "
        "and that its generation spans give the same mask."))
    p.add_argument("--tokenizer", required=True, help="HF tokenizer (model dir or name)")
    p.add_argument("--training-template", default=None, help="path or name under configs/templates/")
    p.add_argument("--model-template", default=None,
                   help="the model's own template (path or name); default: the tokenizer's chat_template")
    p.add_argument("--end-of-turn", default=None,
                   help="end-of-turn text, e.g. '<|im_end|>' or '[e~['; default: the token the model template writes "
                        "after a reply")
    p.add_argument("--think-tags", nargs=2, default=["<think>", "</think>"], metavar=("OPEN", "CLOSE"))
    p.add_argument("--history-reasoning", choices=["keep", "drop"], default="keep",
                   help="drop: the template hides reasoning of assistant turns before the last user turn")
    p.add_argument("--renormalize", choices=RENORMALIZE, default="none",
                   help="how the template re-renders a kept think block (see expected_outputs)")
    p.add_argument("--thinking-modes", type=_csv, default=["enabled", "disabled", "adaptive"])
    p.add_argument("--thinking-mode-key", default="thinking_mode")
    p.add_argument("--thinking-mode-map", type=json.loads, default={},
                   help='JSON map from mode to the value sent, as for generate: \'{"enabled": true, "disabled": false}\'')
    p.add_argument("--input", default=None, help="also check generated conversations (generate output)")
    p.add_argument("--num", type=int, default=50, help="at most this many generated conversations")
    p.add_argument("--extra-special-tokens", type=_csv, default=[],
                   help="add these as special tokens first (testing a template with a stand-in tokenizer)")
    return p


def run_checks(args: argparse.Namespace) -> list[TemplateCheck]:
    from transformers import AutoTokenizer

    require_local_model(args.tokenizer, "--tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": args.extra_special_tokens})
    training = read_template(args.training_template) if args.training_template else None
    model = read_template(args.model_template) if args.model_template else tokenizer.chat_template
    if not model:
        raise SystemExit("the tokenizer has no chat_template; pass --model-template")
    try:
        end_of_turn = args.end_of_turn or end_of_turn_token(tokenizer, model)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    log.info("end of turn: %r", end_of_turn)
    convos = list(synthetic_conversations(tokenizer, model, tuple(args.think_tags), args.thinking_modes,
                                          args.thinking_mode_key, args.thinking_mode_map))
    if args.input:
        convos += list(conversations_from_records(args.input, args.num))
    return [check_conversation(tokenizer, msgs, kwargs, model, end_of_turn, training, tuple(args.think_tags),
                               args.history_reasoning, args.renormalize, name) for name, msgs, kwargs in convos]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    log.info("resolved configuration: %s", json.dumps(vars(args), sort_keys=True))
    results = run_checks(args)
    bad = [r for r in results if r.problems]
    for r in bad:
        for problem in r.problems:
            log.error("%s: %s", r.name, problem)
    log.info("%d conversations checked, %d with problems; %d tokens, %d in the loss mask",
             len(results), len(bad), sum(r.num_tokens for r in results), sum(r.num_masked for r in results))
    print(json.dumps({"checked": len(results), "failed": len(bad), "ok": not bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
