"""Chat templates rendered as transformers renders them, and `<tool_call>` parsing."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a model folder has no chat_template: plain ChatML, the format Qwen models are trained on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: unlike Jinja's built-in, it does not HTML-escape, and Qwen's tool prompt relies on it.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The environment transformers uses: sandboxed, trim_blocks + lstrip_blocks, loop controls."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """The prompt text for `messages` (and OpenAI-style `tools`), byte for byte as transformers renders it."""
    return compile_template(template or CHATML_TEMPLATE).render(
        messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt, **extra
    )


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def to_openai(self, call_id: str) -> dict[str, Any]:
        return {
            "id": call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass
class ToolCallParse:
    """What `parse_tool_calls` found: the calls, the text around them, and the blocks it could not read."""

    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    errors: list[str] = field(default_factory=list)


_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str) -> ToolCallParse:
    """Extract the `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks of a Qwen2.5 reply.

    Whitespace around the JSON is ignored; several calls are returned in order. A block that is not valid JSON,
    or lacks a name, is reported in `errors` (with the reason) instead of raising, and left out of `calls`.
    An unterminated last block (generation cut off by max_tokens) is parsed if its JSON is complete.
    """
    result = ToolCallParse()
    for match in _TOOL_CALL.finditer(text):
        body = match.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            result.errors.append(f"tool call is not valid JSON ({e.msg} at char {e.pos}): {body[:200]!r}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            result.errors.append(f"tool call has no string 'name': {body[:200]!r}")
            continue
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):  # some fine-tunes emit the arguments as a JSON string, as OpenAI does
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                result.errors.append(f"tool call {obj['name']!r} has arguments that are not JSON: {arguments[:200]!r}")
                continue
        if not isinstance(arguments, dict):
            result.errors.append(f"tool call {obj['name']!r} has arguments that are not an object: {arguments!r}")
            continue
        result.calls.append(ToolCall(obj["name"], arguments))
    result.content = _TOOL_CALL.sub("", text).strip()
    return result
