"""Qwen2.5's `<tool_call>` blocks: parsed from a whole reply, or split out of a reply as it streams. Also the call
small Qwen2.5 (Coder) models often write instead: a reply that is only JSON naming one of the given tools."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
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

    With `tool_names`, a reply that is only a call written as JSON naming one of them is a call too (see
    `JsonCallReply`); until that is decided the reply is held back, so no part of such a call shows as content.
    `parallel=False` counts a JSON list as calls only when it holds one (the `<tool_call>` form is cut after its
    first call by a stop string instead, see `serving/protocol.py`).
    """

    def __init__(self, tool_names: Collection[str] = (), parallel: bool = True) -> None:
        self.pending = ""
        self.inside = False
        self.after_call = False
        self.errors: list[str] = []
        self.json_call = JsonCallReply(tool_names, parallel) if tool_names else None

    def feed(self, text: str) -> list[str | ToolCall]:
        if self.json_call is not None:
            if self.json_call.feed(text):
                return []
            # It cannot be a JSON call: everything held so far is read for `<tool_call>` blocks instead.
            text, self.json_call = self.json_call.text, None
        return self._feed_markup(text)

    def finish(self) -> list[str | ToolCall]:
        if self.json_call is None:
            return self._finish_markup()
        reply, self.json_call = self.json_call, None
        if reply.cut_off:
            # As for a `<tool_call>` block cut off: nothing, never part of a call as text.
            self.errors.append(f"the reply ended inside a tool call: {reply.text.strip()[:200]!r}")
            return []
        calls = reply.calls()
        if isinstance(calls, list):
            return list(calls)
        if calls is not None:
            self.errors.append(calls)
        return self._feed_markup(reply.text) + self._finish_markup()

    def _feed_markup(self, text: str) -> list[str | ToolCall]:
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

    def _finish_markup(self) -> list[str | ToolCall]:
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
    return _call_in(obj, body)


def _call_in(obj: Any, body: str) -> ToolCall | str:
    """The call a decoded JSON value (`body` as written) makes, or why it is not one."""
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


def tool_names(tools: list[dict[str, Any]] | None) -> tuple[str, ...]:
    """The names of OpenAI-style function tools (`{"type": "function", "function": {"name": ...}}`): the calls a
    reply written as bare JSON may make."""
    functions = (t.get("function") for t in tools or () if isinstance(t, dict))
    return tuple(f["name"] for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str))


def parse_tool_calls(text: str, tool_names: Collection[str] = ()) -> ToolCallParse:
    """The calls in a whole Qwen2.5 reply, in order, and the text around them (stripped) as content.

    Whitespace around a block's JSON is ignored. A block that is not a valid call stays in the content, raw, and
    its reason is in `errors`; nothing raises. With `tool_names`, a reply that is only a call written as JSON
    (bare or in a ```json fence, see `JsonCallReply`) naming one of them is a call too.
    """
    stream = ToolCallStream(tool_names)
    parts = stream.feed(text) + stream.finish()
    return ToolCallParse(
        calls=[p for p in parts if isinstance(p, ToolCall)],
        content="".join(p for p in parts if isinstance(p, str)).strip(),
        errors=stream.errors,
    )


# What may come before a call written as JSON: whitespace, or a Markdown fence (```json or ```) on its own line.
_JSON_OPENING = re.compile(r"\s*(```[ \t]*(?:json)?[ \t]*\n\s*)?(?=[\[{])", re.IGNORECASE)
# ... and what may be there while it is still coming.
_PARTIAL_OPENING = re.compile(r"\s*(`{1,3}|```[ \t]*(?:j(?:s(?:on?)?)?)?[ \t]*(?:\n\s*)?)?", re.IGNORECASE)
# What may follow the JSON: whitespace; a fence's close, where one opened (a close still coming while streaming).
_SPACE = re.compile(r"\s*")
_PARTIAL_FENCE_CLOSE = re.compile(r"\s*(`{1,2}|```\s*)?")
# A string's start: its characters up to a closing quote or an escape (group 2: which one, if either came).
_STRING_START = re.compile(r'"([^"\\]*)(["\\]?)')
_CALL_KEYS = ("name", "arguments", "parameters")


class JsonCallReply:
    """A reply that is nothing but a tool call written as JSON, as small Qwen2.5 (Coder) models often write one
    instead of `<tool_call>` markup: `{"name": ..., "arguments": {...}}` (or "parameters"; the arguments may be a
    JSON string holding the object), or a list of such objects, bare or in a ```json / ``` fence, with whitespace
    around it. It counts only when every call names one of `tool_names`, and only as the whole reply: JSON with
    prose around it, or naming no given tool, is the model's text (a JSON answer, an example in a code block).

    `feed` takes the reply as it streams and says whether it may still be such a call; it decides as early as the
    text allows (the first character, the fence's language, the first key, the name), so other text is held only
    briefly. At the end, `cut_off` says the reply stopped inside what was so far a call, else `calls` decides.
    """

    def __init__(self, tool_names: Collection[str], parallel: bool = True) -> None:
        self.names, self.parallel = frozenset(tool_names), parallel
        self.text = ""  # the whole reply so far (all of it held back)
        self.start: int | None = None  # where the JSON value starts in `text`, once its first character came
        self.fenced = False
        self.head: bool | None = None  # whether the value's head is a call's (None: not known yet)
        self.end: int | None = None  # just past the value's last character, once it closed
        self.scanner = JsonValueEnd()
        self.scanned = 0  # how much of `text` the scanner has read

    def feed(self, text: str) -> bool:
        """Whether the reply so far may still be a call; False once it cannot, whatever follows."""
        self.text += text
        if self.start is None:
            opening = _JSON_OPENING.match(self.text)
            if opening is None:
                return _PARTIAL_OPENING.fullmatch(self.text) is not None
            self.start = self.scanned = opening.end()
            self.fenced = opening.group(1) is not None
        if self.head is None:
            self.head = _call_head(self.text[self.start :], self.names)
            if self.head is not True:
                return self.head is None
        if self.end is None:
            end = self.scanner.scan(self.text[self.scanned :])
            if end is None:
                self.scanned = len(self.text)
                return True
            self.end = self.scanned + end
        return (_PARTIAL_FENCE_CLOSE if self.fenced else _SPACE).fullmatch(self.text[self.end :]) is not None

    @property
    def cut_off(self) -> bool:
        """The reply ended inside JSON that was a call as far as it came (max_tokens, a stop string)."""
        return self.start is not None and self.end is None

    def calls(self) -> list[ToolCall] | str | None:
        """At the reply's end: the calls it makes; else why JSON that began as a call makes none (None: no JSON
        came). A fence not closed yet when the reply was cut off does not matter: the JSON is whole."""
        if self.start is None or self.end is None:
            return None
        return _read_json_calls(self.text[self.start : self.end], self.names, self.parallel)


def _call_head(value: str, names: frozenset[str]) -> bool | None:
    """Whether JSON that starts with `value` may be a call to one of `names`: False once it cannot, True once its
    head is a call's (its first key is "name" with a given tool's name, or the arguments, whose name comes later),
    None while too little of it has come to tell."""
    rest = value[1:].lstrip() if value.startswith("[") else value
    if not rest.startswith("{"):
        return None if not rest else False
    rest = rest[1:].lstrip()
    key = _STRING_START.match(rest)
    if key is None:
        return None if not rest else False
    if not key[2]:
        return None if any(k.startswith(key[1]) for k in _CALL_KEYS) else False
    if key[2] == "\\" or key[1] not in _CALL_KEYS:
        return False
    rest = rest[key.end() :].lstrip()
    if not rest.startswith(":"):
        return None if not rest else False
    if key[1] != "name":
        return True
    rest = rest[1:].lstrip()
    name = _STRING_START.match(rest)
    if name is None:
        return None if not rest else False
    if name[2] == "\\":  # an escape in the name: the whole value decides
        return True
    if name[2]:
        return name[1] in names
    return None if any(n.startswith(name[1]) for n in names) else False


def _read_json_calls(text: str, names: frozenset[str], parallel: bool) -> list[ToolCall] | str:
    """The calls a reply's whole JSON value makes (one object, or a list of them), or why it makes none."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"tool call is not valid JSON ({e.msg} at char {e.pos}): {text[:200]!r}"
    items = value if isinstance(value, list) else [value]
    if len(items) > 1 and not parallel:
        return f"{len(items)} tool calls in a list where only one is allowed: {text[:200]!r}"
    calls = []
    for item in items:
        # Exactly a call's keys: JSON data that happens to hold a "name" is not a call.
        if not isinstance(item, dict) or set(item) not in ({"name", "arguments"}, {"name", "parameters"}):
            return f'a tool call is {{"name": ..., "arguments": {{...}}}}, not {json.dumps(item)[:200]!r}'
        call = _call_in(item, text)
        if isinstance(call, str):
            return call
        if call.name not in names:
            return f"tool call names {call.name!r}, which is not one of the tools"
        calls.append(call)
    return calls


class JsonValueEnd:
    """Where a JSON object or array closes, in text that arrives in pieces: brackets are counted outside strings,
    escapes followed."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped = 0, False, False

    def scan(self, text: str) -> int | None:
        """The index just past the value's last character in `text`, or None while the value is still open."""
        for i, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


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
        self._value = JsonValueEnd()

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
        end = self._value.scan(self.buffer)
        if end is None:
            end = len(self.buffer)
        else:
            self.state = "after"
        piece, self.buffer = self.buffer[:end], self.buffer[end:]
        self.calls[-1][1] += piece
        return CallPiece(len(self.calls) - 1, arguments=piece) if piece else None

    def _after(self) -> CallPiece | None:
        end = self.buffer.find(TOOL_CALL_CLOSE)
        if end < 0:
            return None
        self.buffer, self.state = self.buffer[end + len(TOOL_CALL_CLOSE) :], "between"
        return CallPiece(len(self.calls))
