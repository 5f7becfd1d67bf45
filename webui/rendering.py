"""What the Chatbot shows for a conversation: its messages as markdown, and per row what goes beside them.

Statistics, ‹ k/n › alternatives and attachment names are never part of a message's markdown (a reply cut off
inside a code fence would swallow them, and "copy" would copy them): each row gets a `RowMeta`, which the page's
script (page.js) draws under the message. Reasoning between <think> and </think> becomes a collapsed "Thinking"
block. Single-dollar math follows the rules of pandoc, so that prices stay prices.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from qwen_mlx.webui.branches import positions
from qwen_mlx.webui.conversations import Conversation

# Single `$` is not a delimiter: inline_math turns the `$…$` that are math into `\(…\)` first.
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
]
FINISH_NOTES = {"length": "max tokens reached", "cancelled": "stopped", "context": "context full"}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_BACKTICKS = re.compile(r"`+")
# pandoc's rule: the opening $ has a non-space to its right and the closing $ a non-space to its left, not followed
# by a digit; and, as chat UIs do for prices, the opening $ is not followed by a digit either ("$5 and $10").
_INLINE_MATH = re.compile(r"(?<![\\\w$])\$(?![\s\d$])((?:\\.|[^\\$\n])*?)(?<![\s\\])\$(?![\d$])")


@dataclass
class RowMeta:
    """What page.js draws under one Chatbot row (and what an API client reads beside the chat)."""

    at: int  # the message's position in the conversation shown
    role: str
    footer: str = ""  # statistics, a note, or the attachments' names
    branch: tuple[int, int] | None = None  # (k, n): alternative k of n
    warn: bool = False  # the footer is a warning (an interrupted reply, the context filled up)


def _outside_code(text: str, convert: Any) -> str:
    """`convert` applied to the parts of markdown `text` outside fenced code blocks and inline code spans."""
    out: list[str] = []
    prose: list[str] = []
    fence: str | None = None

    def flush() -> None:
        if prose:
            out.append(_outside_spans("\n".join(prose), convert))
            prose.clear()

    for line in text.split("\n"):
        match = _FENCE.match(line)
        if fence is None and match:
            flush()
            fence = match.group(1)
            out.append(line)
        elif fence is not None:
            out.append(line)
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not line.strip()[len(match.group(1)):]:
                fence = None
        else:
            prose.append(line)
    flush()
    return "\n".join(out)


def _outside_spans(text: str, convert: Any) -> str:
    parts, pos, start = [], 0, 0
    while (opening := _BACKTICKS.search(text, pos)) is not None:
        closing = re.compile(rf"(?<!`){opening.group(0)}(?!`)").search(text, opening.end())
        if closing is None:
            pos = opening.end()
            continue
        parts += [convert(text[start : opening.start()]), text[opening.start() : closing.end()]]
        pos = start = closing.end()
    parts.append(convert(text[start:]))
    return "".join(parts)


def inline_math(text: str) -> str:
    """Markdown with its single-dollar math written as \\(…\\), and every other `$` left as a dollar."""
    if "$" not in text:
        return text
    return _outside_code(text, lambda prose: _INLINE_MATH.sub(r"\\(\1\\)", prose))


def split_thinking(text: str) -> tuple[str | None, bool, str]:
    """(the reasoning or None, whether it ended, the answer) of a reply that may open with <think>…</think>."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        inner = stripped[len(THINK_OPEN):]
        thought, closed, answer = inner.partition(THINK_CLOSE)
        return thought.strip(), bool(closed), answer.strip()
    if THINK_CLOSE in text:  # the chat template opened the block itself (DeepSeek-R1's does)
        thought, _, answer = text.partition(THINK_CLOSE)
        return thought.strip(), True, answer.strip()
    return None, True, text


def without_thinking(text: str) -> str:
    """A reply as the next turn's prompt holds it: reasoning is for the turn it was written in, and left out, as
    the chat templates of reasoning models do."""
    thought, done, answer = split_thinking(text)
    if thought is None:
        return text
    return answer if done else ""


def finish_reason(stats: dict[str, Any]) -> str | None:
    """The stop's reason as a user tells them apart: "length" is the context's end when the context is full."""
    reason = stats.get("finish_reason")
    length = stats.get("context_length", stats.get("context_size"))
    if reason == "length" and length and stats.get("context_tokens", 0) + 1 >= length:
        return "context"
    return reason


def stats_line(stats: dict[str, Any]) -> str:
    """Prompt tokens (and how many came from the cache), reply tokens, speed, context, how it ended."""
    parts = []
    if "prompt_tokens" in stats:
        cached = stats["prompt_tokens"] - stats["prefilled_tokens"]
        parts += [
            f"prompt {stats['prompt_tokens']} tokens ({cached} from cache)",
            f"reply {stats['generation_tokens']} tokens",
            f"first token {stats['time_to_first_token']:.2f} s",
            f"{stats['generation_tps']:.1f} tokens/s",
            # "context_size": conversations saved before the field was named context_length
            f"context {stats['context_tokens']} / {stats.get('context_length', stats.get('context_size'))}",
        ]
        if stats.get("draft_tokens"):
            accepted, drafted = stats["accepted_draft_tokens"], stats["draft_tokens"]
            parts.append(f"drafts accepted {accepted}/{drafted} ({100 * accepted / drafted:.0f}%)")
    if stats.get("dropped"):
        parts.append(f"{stats['dropped']} oldest messages left out of the prompt")
    note = FINISH_NOTES.get(finish_reason(stats) or "")
    if note:
        parts.append(note)
    return " · ".join(parts)


def attachment_line(attachments: list[dict[str, Any]]) -> str:
    return " · ".join(f"attached: {a['name']} ({len(a['text'].splitlines())} lines)" for a in attachments)


def reply_placeholder(message: dict[str, Any]) -> str:
    """What an empty reply shows while it waits for a row or its prompt is read."""
    if message.get("prefill"):
        done, total = message["prefill"]
        return f"*Reading the prompt: {done} / {total} tokens…*"
    if message.get("waiting"):
        return f"*{message['waiting'].capitalize()}…*"
    return "…"


def chat_view(conversation: Conversation, live: set[int] | frozenset[int] = frozenset()
              ) -> tuple[list[dict[str, Any]], list[RowMeta]]:
    """The Chatbot's value and one RowMeta per row; `live` holds the ids (id()) of replies still being written."""
    rows: list[dict[str, Any]] = []
    meta: list[RowMeta] = []
    for at, (m, (k, n)) in enumerate(zip(conversation.messages, positions(conversation.tree), strict=True)):
        branch = (k, n) if n > 1 else None
        if m["role"] == "user":
            rows.append({"role": "user", "content": inline_math(m["content"])})
            meta.append(RowMeta(at, "user", attachment_line(m.get("attachments", [])), branch))
            continue
        if m.get("error"):
            rows.append({"role": "assistant", "content": f"⚠️ **Error:** {m['content']}"})
            meta.append(RowMeta(at, "assistant", "", branch))
            continue
        is_live = id(m) in live
        thought, thought_done, answer = split_thinking(m["content"])
        if thought is not None:
            status = "pending" if is_live and not thought_done else "done"
            rows.append({"role": "assistant", "content": inline_math(thought) or "…",
                         "metadata": {"title": "Thinking", "status": status}})
            meta.append(RowMeta(at, "thinking"))
        being_written = is_live or bool(m.get("pending"))
        if "stats" in m:
            footer, warn = stats_line(m["stats"]), finish_reason(m["stats"]) == "context"
        elif m.get("unfinished") and not being_written:
            # saved while being written, and the server stopped before it ended (kill, crash, power cut)
            footer, warn = "interrupted: the server stopped while writing this reply", True
        else:
            footer, warn = "", False
        if answer:
            shown = inline_math(answer)
        elif thought is None and being_written:
            shown = reply_placeholder(m)
        else:
            shown = "…"
        rows.append({"role": "assistant", "content": shown})
        meta.append(RowMeta(at, "assistant", footer, branch, warn))
    return rows, meta


def meta_json(meta: list[RowMeta]) -> list[dict[str, Any]]:
    return [asdict(m) for m in meta]
