"""Regenerating one conversation against an OpenAI-compatible server (vLLM or SGLang).

Retries: the openai client retries connection errors, 408, 409, 429 and 5xx with exponential backoff
(`max_retries`); other 4xx fail at once. A conversation that still fails is reported as either retryable (the rerun
of the shard will try it again) or permanent (recorded in the errors file and counted).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import openai

from ..formats import ASSISTANT, USER, Turn

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SamplingConfig:
    model: str
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 2048
    seed: int | None = None
    timeout: float = 600.0
    max_retries: int = 5
    on_length: str = "keep"  # "keep": keep the turn, marked truncated; "drop": drop the conversation
    think_open: str = "<think>"
    think_close: str = "</think>"


class ConversationFailed(Exception):
    def __init__(self, reason: str, detail: str, retryable: bool):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retryable = reason, detail, retryable


def classify_error(exc: BaseException) -> ConversationFailed:
    """Map an openai exception (after its own retries) to a failure the shard runner can account for."""
    if isinstance(exc, openai.APITimeoutError):
        return ConversationFailed("timeout", str(exc), retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return ConversationFailed("connection", str(exc), retryable=True)
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        retryable = code == 429 or code >= 500 or code in (408, 409)
        body = exc.body if isinstance(exc.body, (str, dict)) else str(exc)
        return ConversationFailed(f"http_{code}", str(body)[:2000], retryable=retryable)
    return ConversationFailed(type(exc).__name__, str(exc)[:2000], retryable=False)


class ThinkWrapWarning:
    """Logs once per process that the server split reasoning out (it should run without a reasoning parser)."""

    warned = False

    @classmethod
    def warn(cls) -> None:
        if not cls.warned:
            cls.warned = True
            log.warning(
                "the server returned reasoning separately (a reasoning parser is on); wrapping it back into the "
                "content with the think tags. Run the server without --reasoning-parser to record the raw output."
            )


def reply_text(message: Any, cfg: SamplingConfig) -> str:
    content = message.content or ""
    extra = getattr(message, "model_extra", None) or {}
    reasoning = extra.get("reasoning_content") or extra.get("reasoning")
    if not reasoning:
        return content
    ThinkWrapWarning.warn()
    return f"{cfg.think_open}\n{reasoning.strip()}\n{cfg.think_close}\n\n{content.lstrip()}"


async def regenerate(
    client: openai.AsyncOpenAI,
    skeleton: list[Turn],
    cfg: SamplingConfig,
    chat_template_kwargs: dict[str, Any],
) -> tuple[list[Turn], list[dict[str, Any]]]:
    """Send the conversation turn by turn, replacing every assistant reply with a fresh one.

    Returns the full conversation and per-turn stats (finish_reason, prompt/completion tokens).
    """
    convo: list[Turn] = []
    stats: list[dict[str, Any]] = []
    extra_body = {"chat_template_kwargs": chat_template_kwargs} if chat_template_kwargs else None
    for turn in skeleton:
        convo.append(turn)
        if turn.role != USER:
            continue
        try:
            resp = await client.chat.completions.create(
                model=cfg.model,
                messages=[{"role": t.role, "content": t.content} for t in convo],
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                seed=cfg.seed,
                extra_body=extra_body,
                timeout=cfg.timeout,
            )
        except openai.OpenAIError as e:
            raise classify_error(e) from e
        if not resp.choices:
            raise ConversationFailed("empty_response", "the server returned no choices", retryable=True)
        choice = resp.choices[0]
        text = reply_text(choice.message, cfg)
        usage = resp.usage
        stats.append(
            {
                "finish_reason": choice.finish_reason,
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
            }
        )
        if choice.finish_reason == "length" and cfg.on_length == "drop":
            raise ConversationFailed(
                "truncated", f"turn {len(stats)} hit max_tokens={cfg.max_tokens} (--on-length drop)", False
            )
        convo.append(Turn(ASSISTANT, text))
    return convo, stats
