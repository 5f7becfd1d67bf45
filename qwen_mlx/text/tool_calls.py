"""Qwen2.5's `<tool_call>` blocks: parsed from a whole reply, or split out of a reply as it streams."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ToolCallParse:
    """What `parse_tool_calls` found: the calls, the text around them, and the blocks it could not read."""

    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    errors: list[str] = field(default_factory=list)


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class ToolCallStream:
    """Splits reply text, as it streams, into content and `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    calls, so that tool markup never shows as content, not even the first characters of `<tool_call>`.

    `feed` returns what can be released now: content strings and `ToolCall`s, in order. Whitespace next to a call
    is part of the markup (Qwen puts newlines between calls), so it is held back until it turns out to be content.
    A block that is not a valid call (bad JSON, no name) is released as content, raw, and its reason kept in
    `errors`: the model's words are shown rather than lost. `finish` releases what is left; an unterminated last
    block (the reply was cut off) is a call if its JSON is complete.
    """

    def __init__(self) -> None:
        self.pending = ""
        self.inside = False
        self.after_call = False
        self.errors: list[str] = []

    def feed(self, text: str) -> list[str | ToolCall]:
        self.pending += text
        out: list[str | ToolCall] = []
        while True:
            if not self.inside:
                if self.after_call:
                    self.pending = self.pending.lstrip()
                    self.after_call = not self.pending
                start = self.pending.find(TOOL_CALL_OPEN)
                if start < 0:
                    # Hold back a tail that may be the start of "<tool_call>", and whitespace that may precede one.
                    hold = next((n for n in range(min(len(self.pending), len(TOOL_CALL_OPEN) - 1), 0, -1)
                                 if self.pending.endswith(TOOL_CALL_OPEN[:n])), 0)
                    cut = len(self.pending[: len(self.pending) - hold].rstrip())
                    _emit(out, self.pending[:cut])
                    self.pending = self.pending[cut:]
                    return out
                _emit(out, self.pending[:start].rstrip())
                self.pending, self.inside = self.pending[start:], True
            end = self.pending.find(TOOL_CALL_CLOSE)
            if end < 0:
                return out
            block = self.pending[: end + len(TOOL_CALL_CLOSE)]
            self.pending, self.inside = self.pending[len(block) :], False
            out.append(self._parse(block, block[len(TOOL_CALL_OPEN) : end]))

    def finish(self) -> list[str | ToolCall]:
        rest, self.pending = self.pending, ""
        if self.inside:
            self.inside = False
            # Cut off inside a block (max_tokens): a call if its JSON is whole, else nothing; never markup as text.
            call = _read_call(rest[len(TOOL_CALL_OPEN) :].strip())
            if isinstance(call, ToolCall):
                return [call]
            self.errors.append(f"the reply ended inside a tool call: {call}")
            return []
        return [rest] if rest and not self.after_call else []

    def _parse(self, block: str, body: str) -> str | ToolCall:
        call = _read_call(body.strip())
        if isinstance(call, ToolCall):
            self.after_call = True
            return call
        self.errors.append(call)
        return block


def _emit(out: list[str | ToolCall], text: str) -> None:
    if text:
        out.append(text)


def _read_call(body: str) -> ToolCall | str:
    """The call in one block's JSON, or why it is not one."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return f"tool call is not valid JSON ({e.msg} at char {e.pos}): {body[:200]!r}"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return f"tool call has no string 'name': {body[:200]!r}"
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some fine-tunes emit the arguments as a JSON string, as OpenAI does
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f"tool call {obj['name']!r} has arguments that are not JSON: {arguments[:200]!r}"
    if not isinstance(arguments, dict):
        return f"tool call {obj['name']!r} has arguments that are not an object: {arguments!r}"
    return ToolCall(obj["name"], arguments)


def parse_tool_calls(text: str) -> ToolCallParse:
    """The calls in a whole Qwen2.5 reply, in order, and the text around them (stripped) as content.

    Whitespace around a block's JSON is ignored. A block that is not a valid call stays in the content, raw, and
    its reason is in `errors`; nothing raises.
    """
    stream = ToolCallStream()
    parts = stream.feed(text) + stream.finish()
    return ToolCallParse(
        calls=[p for p in parts if isinstance(p, ToolCall)],
        content="".join(p for p in parts if isinstance(p, str)).strip(),
        errors=stream.errors,
    )


@dataclass
class CallPiece:
    """Part of a tool call as it streams: its `name` when the call starts, then pieces of its arguments' JSON."""

    index: int
    name: str | None = None
    arguments: str = ""


# The head of a call, up to where its arguments' object starts (seen, so whitespace before it is all there).
_CALL_HEAD = re.compile(r'\s*\{"name":\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments":\s*(?=\{)')


class ToolArgumentsStream:
    """Tool calls in the exact form the tool-call grammar produces (`<tool_call>\n{"name": ..., "arguments":
    {...}}\n</tool_call>`, the arguments last), split as they stream into each call's name and pieces of its
    arguments, so a client sees arguments grow as OpenAI streams them. No markup is ever part of a piece; a reply
    cut off mid-call leaves that call's arguments as far as they came (OpenAI's finish_reason "length")."""

    def __init__(self) -> None:
        self.state = "between"  # between calls / in a call's head / in its arguments / after them
        self.buffer = ""
        self.calls: list[list[str]] = []  # [name, arguments so far] per call
        self._depth, self._in_string, self._escaped = 0, False, False

    def feed(self, text: str) -> list[CallPiece]:
        self.buffer += text
        pieces: list[CallPiece] = []
        while self.buffer:
            step = getattr(self, f"_{self.state}")()
            if step is None:
                break
            if step.name is not None or step.arguments:
                pieces.append(step)
        return pieces

    def _between(self) -> CallPiece | None:
        start = self.buffer.find(TOOL_CALL_OPEN)
        if start < 0:
            return None
        self.buffer, self.state = self.buffer[start + len(TOOL_CALL_OPEN) :], "head"
        return CallPiece(len(self.calls))

    def _head(self) -> CallPiece | None:
        match = _CALL_HEAD.match(self.buffer)
        if match is None:
            return None
        name = json.loads(match.group(1))
        self.calls.append([name, ""])
        self.buffer, self.state = self.buffer[match.end() :], "arguments"
        return CallPiece(len(self.calls) - 1, name=name)

    def _arguments(self) -> CallPiece | None:
        end = self._scan()
        piece, self.buffer = self.buffer[:end], self.buffer[end:]
        if end < len(piece) + len(self.buffer) or self._depth == 0:
            self.state = "after"
        self.calls[-1][1] += piece
        return CallPiece(len(self.calls) - 1, arguments=piece) if piece else None

    def _after(self) -> CallPiece | None:
        end = self.buffer.find(TOOL_CALL_CLOSE)
        if end < 0:
            return None
        self.buffer, self.state = self.buffer[end + len(TOOL_CALL_CLOSE) :], "between"
        return CallPiece(len(self.calls))

    def _scan(self) -> int:
        """How much of the buffer belongs to the arguments' JSON value (all of it until the value closes)."""
        for i, char in enumerate(self.buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(self.buffer)
