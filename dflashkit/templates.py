"""Training chat templates: the model's own template with {% generation %} spans around what the model produced.

The dump renders every conversation with a training template through `apply_chat_template(...,
return_assistant_tokens_mask=True)`; the loss mask is the resulting assistant mask. Two properties make that mask
right, and `dflashkit check-template` proves both on many conversations before any GPU time is spent:

1. Same tokens. The training template renders exactly the text (and therefore the tokens) of the model's own
   template, for every thinking mode: the spans add markup only.
2. Exact spans. There is one contiguous span per assistant turn, in order, and its tokens decode exactly to that
   turn's output followed by the end-of-turn token. Everything else (role headers, the think prefix a thinking mode
   inserts, the text after the end-of-turn token) is outside. A token straddling a span edge shows up as a mismatch.

"That turn's output" is the assistant message content, except where a template hides reasoning of turns before the
last user turn (MiniMax's interleaved thinking): there the visible output is the answer after the last think-close tag,
with surrounding newlines stripped (`history_reasoning="drop"`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("dflashkit.templates")

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "configs" / "templates"


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


def render_training(tokenizer, messages: list[dict], template: str, kwargs: dict) -> tuple[list[int], list[int]]:
    """Token ids and the assistant (loss) mask of a finished conversation under a training template."""
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        add_generation_prompt=False, **kwargs)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if len(ids) != len(mask):
        raise ValueError(f"assistant mask has {len(mask)} entries for {len(ids)} tokens")
    return ids, mask


def expected_outputs(messages: list[dict], think_tags: tuple[str, str] | None, history_reasoning: str,
                     strip_newlines: bool = False) -> list[str]:
    """What each assistant turn's span must hold, before the end-of-turn token (see the module doc).

    `strip_newlines` (MiniMax-M2): a reply holding a think-close tag is re-rendered as "<think>\\n" (the generation
    prompt's, outside the span) + reasoning + "\\n</think>\\n\\n" + answer, with newlines around reasoning and answer
    stripped and an opening tag the reply wrote itself dropped; the span holds what follows "<think>\\n".
    """
    open_tag, close_tag = think_tags or (None, None)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        text = m["content"]
        if close_tag and close_tag in text:
            answer = text.split(close_tag)[-1]
            if history_reasoning == "drop" and i < last_user:
                text = answer.strip("\n")
            elif strip_newlines:
                reasoning = text.split(close_tag)[0].strip("\n").split(open_tag)[-1].strip("\n")
                answer = answer.strip("\n")
                text = f"{reasoning}\n{close_tag}\n\n{answer}" if reasoning else answer
        out.append(text)
    return out


@dataclasses.dataclass
class TemplateCheck:
    """Everything check_conversation found wrong with one conversation (empty `problems`: all good)."""
    name: str
    problems: list[str]
    num_tokens: int = 0
    num_masked: int = 0


def check_conversation(tokenizer, messages: list[dict], kwargs: dict, training: str, model: str, end_of_turn: str,
                       think_tags: tuple[str, str] | None = None, history_reasoning: str = "keep",
                       strip_newlines: bool = False, name: str = "") -> TemplateCheck:
    problems: list[str] = []
    common = dict(tokenize=False, add_generation_prompt=False, **kwargs)
    text_model = tokenizer.apply_chat_template(messages, chat_template=model, **common)
    text_train = tokenizer.apply_chat_template(messages, chat_template=training, **common)
    if text_model != text_train:
        at = next((i for i, (a, b) in enumerate(zip(text_model, text_train)) if a != b),
                  min(len(text_model), len(text_train)))
        problems.append(f"rendered text differs at char {at}: model {text_model[at:at + 40]!r} vs training "
                        f"{text_train[at:at + 40]!r}")
    ids, mask = render_training(tokenizer, messages, training, kwargs)
    model_ids = tokenizer(text_model, add_special_tokens=False)["input_ids"]
    if ids != model_ids:
        problems.append(f"token ids differ from the model template's ({len(ids)} vs {len(model_ids)} tokens)")
    spans = assistant_spans(mask)
    wanted = [w + end_of_turn for w in expected_outputs(messages, think_tags, history_reasoning, strip_newlines)]
    if len(spans) != len(wanted):
        problems.append(f"{len(spans)} generation spans for {len(wanted)} assistant turns")
    for n, ((a, b), want) in enumerate(zip(spans, wanted)):
        got = tokenizer.decode(ids[a:b])
        if got != want:
            problems.append(f"assistant turn {n}: span decodes to {got!r}, expected {want!r}")
    return TemplateCheck(name, problems, len(ids), sum(mask))


# ---- synthetic conversations: every thinking mode, multi-turn, with and without reasoning ---------------------------

def synthetic_conversations(think_tags: tuple[str, str], modes: list[str], mode_key: str
                            ) -> Iterator[tuple[str, list[dict], dict]]:
    """(name, messages, chat_template_kwargs) covering each mode x {1, 3 user turns} x {system or not}.

    A reply looks the way the model writes it after the prefix its mode puts in the prompt: with the think block
    already open (enabled) it starts with reasoning and closes the block; with no prefix (adaptive) it may open its own
    block or answer directly; with thinking disabled it is the answer alone.
    """
    open_tag, close_tag = think_tags
    # Trailing newlines on some answers: templates that strip them when re-rendering must say so (--strip-newlines).
    answers = ["Paris is the capital of France.", "Sure:\n- one\n- two\n", "42, because 6 * 7 = 42.\n"]

    def reply(mode: str, turn: int) -> str:
        reasoning = f"The user asks question {turn}; recall the fact and answer briefly."
        if mode == "enabled":
            return f"{reasoning}\n{close_tag}\n\n{answers[turn]}"
        if mode == "adaptive" and turn % 2 == 0:
            return f"{open_tag}\n{reasoning}\n{close_tag}\n\n{answers[turn]}"
        return answers[turn]  # disabled, or adaptive choosing not to think

    for mode, turns, system in itertools.product(modes, (1, 3), (False, True)):
        messages = [{"role": "system", "content": "You are terse."}] if system else []
        for t in range(turns):
            messages.append({"role": "user", "content": f"Question {t}: tell me something."})
            messages.append({"role": "assistant", "content": reply(mode, t)})
        yield f"{mode}-{turns}turn{'-system' if system else ''}", messages, {mode_key: mode}


def conversations_from_records(path: str, limit: int) -> Iterator[tuple[str, list[dict], dict]]:
    """Generated records (docs/FORMATS.md) replayed with the kwargs recorded at generation."""
    from .dump.records import iter_generated, record_messages
    from .formats import BadRecord

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
        "Prove that a training template renders the model template's tokens exactly and that its generation spans "
        "cover exactly each assistant output plus the end-of-turn token."))
    p.add_argument("--tokenizer", required=True, help="HF tokenizer (model dir or name)")
    p.add_argument("--training-template", required=True, help="path or name under configs/templates/")
    p.add_argument("--model-template", default=None,
                   help="the model's own template (path or name); default: the tokenizer's chat_template")
    p.add_argument("--end-of-turn", required=True, help="end-of-turn text, e.g. '<|im_end|>' or '[e~['")
    p.add_argument("--think-tags", nargs=2, default=["<think>", "</think>"], metavar=("OPEN", "CLOSE"))
    p.add_argument("--history-reasoning", choices=["keep", "drop"], default="keep",
                   help="drop: the template hides reasoning of assistant turns before the last user turn")
    p.add_argument("--strip-newlines", action="store_true",
                   help="the template strips newlines around reasoning and answer when re-rendering (MiniMax-M2)")
    p.add_argument("--thinking-modes", type=_csv, default=["enabled", "disabled", "adaptive"])
    p.add_argument("--thinking-mode-key", default="thinking_mode")
    p.add_argument("--input", default=None, help="also check generated conversations (generate output)")
    p.add_argument("--num", type=int, default=50, help="at most this many generated conversations")
    p.add_argument("--extra-special-tokens", type=_csv, default=[],
                   help="add these as special tokens first (testing a template with a stand-in tokenizer)")
    return p


def run_checks(args: argparse.Namespace) -> list[TemplateCheck]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": args.extra_special_tokens})
    training = read_template(args.training_template)
    model = read_template(args.model_template) if args.model_template else tokenizer.chat_template
    if not model:
        raise SystemExit("the tokenizer has no chat_template; pass --model-template")
    convos = list(synthetic_conversations(tuple(args.think_tags), args.thinking_modes, args.thinking_mode_key))
    if args.input:
        convos += list(conversations_from_records(args.input, args.num))
    return [check_conversation(tokenizer, msgs, kwargs, training, model, args.end_of_turn, tuple(args.think_tags),
                               args.history_reasoning, args.strip_newlines, name) for name, msgs, kwargs in convos]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    log.info("resolved configuration: %s", json.dumps(vars(args), sort_keys=True))
    results = run_checks(args)
    bad = [r for r in results if r.problems]
    for r in bad:
        for problem in r.problems:
            log.error("%s: %s", r.name, problem)
    log.info("%d conversations checked, %d with problems; %d tokens, %d in generation spans",
             len(results), len(bad), sum(r.num_tokens for r in results), sum(r.num_masked for r in results))
    print(json.dumps({"checked": len(results), "failed": len(bad), "ok": not bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
