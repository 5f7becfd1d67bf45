"""The model's context: what a conversation's prompt is, what it costs, and what to do when it no longer fits.

The prompt is token ids, from the chat template, so what the meter counts is exactly what the model reads. An
empty system prompt sends no system message at all, even where the template would write its own default (Qwen's
"You are Qwen, ..."). When the conversation outgrows the context, the policy chosen on the page decides: leave
the oldest turns out of the prompt (the system prompt stays), or stop with a message saying so.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from qwen_mlx.text.tokenizer import Tokenizer
from qwen_mlx.webui.attachments import with_attachments
from qwen_mlx.webui.rendering import without_thinking

DROP_OLDEST, STOP = "drop-oldest", "stop"
POLICIES = [("Drop the oldest turns (the system prompt stays)", DROP_OLDEST), ("Stop, and say so", STOP)]
WARN_AT, FULL_AT = 0.75, 0.9  # the meter turns amber, then red, at these fractions of the context


def model_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The turns as the model reads them: failed exchanges (an error and its question) and replies not begun left
    out, attachments written into their message, reasoning of earlier replies dropped."""
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.get("error"):
            if turns and turns[-1]["role"] == "user":
                turns.pop()
            continue
        if m["role"] == "assistant":
            if m.get("pending") and not m["content"]:
                continue
            turns.append({"role": "assistant", "content": without_thinking(m["content"])})
        else:
            turns.append({"role": "user", "content": with_attachments(m["content"], m.get("attachments", []))})
    return turns


def prompt_ids(tokenizer: Tokenizer, system_prompt: str, turns: list[dict[str, str]]) -> list[int]:
    """The chat template's tokens for `turns` after `system_prompt` (none at all when it is empty)."""
    if system_prompt.strip():
        return tokenizer.apply_chat_template([{"role": "system", "content": system_prompt}, *turns], tokenize=True)
    # A template that writes a default system message when none is given writes an empty one when it is given
    # one: render that, then cut it off (in tokens, so typed text still cannot become control tokens).
    empty = [{"role": "system", "content": ""}]
    head = tokenizer.apply_chat_template(empty, add_generation_prompt=False, tokenize=True)
    ids = tokenizer.apply_chat_template([*empty, *turns], tokenize=True)
    if head and ids[: len(head)] == head:
        return ids[len(head):]
    return tokenizer.apply_chat_template(turns, tokenize=True)


@dataclass
class Fitted:
    """A prompt made to fit: its ids, how many of the oldest messages it leaves out; or why there is none."""

    ids: list[int]
    dropped: int = 0
    error: str | None = None


def reply_room(context_length: int, max_tokens: int) -> int:
    """Tokens kept free for the reply when the oldest turns have to go: the reply's limit, up to a quarter of
    the context (a reply may still run on to the context's end: then it says "context full")."""
    return max(1, min(max_tokens, context_length // 4))


def fit(tokenizer: Tokenizer, system_prompt: str, turns: list[dict[str, str]], context_length: int,
        max_tokens: int, policy: str) -> Fitted:
    """The prompt for `turns` under `policy`; the last user message and the system prompt are always kept."""
    ids = prompt_ids(tokenizer, system_prompt, turns)
    room = reply_room(context_length, max_tokens)
    if len(ids) + room <= context_length:
        return Fitted(ids)
    starts = [i for i, t in enumerate(turns) if t["role"] == "user"]  # a prompt may begin at any question
    if policy == STOP or len(starts) <= 1:
        if len(ids) < context_length:
            return Fitted(ids)  # it fits, with less room for the reply
        if len(starts) <= 1:
            return Fitted([], error=f"the message is {len(ids)} tokens but the model's context is {context_length}; "
                                    "shorten it or attach less")
        return Fitted([], error=f"the conversation is {len(ids)} tokens and the model's context is "
                                f"{context_length}: start a new chat, or choose “drop the oldest turns” under "
                                "“When the context is full”")
    # The fewest oldest turns to leave out: binary search over the questions a prompt could begin at.
    low, high = 1, len(starts) - 1
    best: Fitted | None = None
    while low <= high:
        middle = (low + high) // 2
        candidate = prompt_ids(tokenizer, system_prompt, turns[starts[middle]:])
        if len(candidate) + room <= context_length:
            best, high = Fitted(candidate, starts[middle]), middle - 1
        else:
            low = middle + 1
    if best is not None:
        return best
    last = prompt_ids(tokenizer, system_prompt, turns[starts[-1]:])
    if len(last) < context_length:
        return Fitted(last, starts[-1])
    return Fitted([], error=f"the message is {len(last)} tokens but the model's context is {context_length}; "
                            "shorten it or attach less")


def meter_html(used: int, context_length: int, note: str = "") -> str:
    """The context meter: used / size, amber then red as it fills; `note` says what happens when it is full."""
    if context_length <= 0:
        return ""
    share = used / context_length
    level = "full" if share >= FULL_AT else "warn" if share >= WARN_AT else "ok"
    text = f"context {used} / {context_length} tokens ({100 * share:.0f}%)" if share < 1 else \
        f"context {used} / {context_length} tokens (full)"
    used = min(used, context_length)
    note_html = f' <span class="meter-note">{html.escape(note)}</span>' if note else ""
    return (
        f'<div class="context-meter {level}" data-used="{used}" data-size="{context_length}">'
        f'<meter min="0" max="{context_length}" low="{int(WARN_AT * context_length)}" '
        f'high="{int(FULL_AT * context_length)}" optimum="0" value="{used}"></meter>'
        f' <span class="meter-text">{text}</span>{note_html}</div>'
    )
