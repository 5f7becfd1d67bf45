"""The Anthropic Messages wire format (`POST /v1/messages`): requests checked and turned into `GenerationRequest`s,
replies shaped as messages or as the stream of events Anthropic's SDKs read, errors as `{"type": "error", ...}`.

Content blocks map onto Qwen's chat template: `tool_use` blocks are the assistant's tool calls, `tool_result`
blocks the tool messages after them. `tool_choice` "any" / "tool" forces the call through the tool-call grammar,
and `output_config.format` (a JSON schema) holds the reply to it. As on the OpenAI side, every field is honoured
or refused by name: one qwen-mlx cannot honour (images, server tools, extended thinking...) is a 400.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
from qwen_mlx.engine.request import GenerationRequest, is_int
from qwen_mlx.serving.protocol import (
    APIError,
    ChatCall,
    Part,
    ReplyParts,
    ServedModel,
    ToolChoice,
    ToolReading,
    checked_text,
    prepare_chat,
)
from qwen_mlx.text.tool_calls import CallPiece

# cache_control (here, on text blocks and tools): a prompt-caching hint; every prefix is cached here anyway.
FIELDS = {"model", "max_tokens", "messages", "system", "stop_sequences", "stream", "temperature", "top_p", "top_k",
          "tools", "tool_choice", "metadata", "output_config", "thinking", "service_tier", "cache_control"}
# What a token count reads: the prompt's fields, none of the reply's (max_tokens, sampling, stream).
COUNT_FIELDS = {"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config", "cache_control"}
TEXT_FIELDS = {"type", "text", "cache_control"}
TOOL_FIELDS = {"name", "description", "input_schema", "cache_control", "type"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    # A 4xx it has no type of its own for (405, 415) is still the request's fault, not the server's.
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


@dataclass
class AnthropicRequest:
    model: str
    generation: GenerationRequest
    stream: bool = False
    tools: ToolReading = ToolReading()  # how the reply's tool calls are read
    stop_sequences: tuple[str, ...] = ()
    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")


def parse_messages(body: Any, served: ServedModel) -> AnthropicRequest:
    _check_fields(body, FIELDS)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise APIError(400, "max_tokens: Field required", "max_tokens")
    if not is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, "max_tokens: must be a positive integer", "max_tokens")
    call = _chat_call(body, max_tokens)
    tools, choice, options = call.tools, call.choice, call.options
    generation = prepare_chat(served, call)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream: must be true or false", "stream")
    return AnthropicRequest(body["model"], generation, stream, tools=ToolReading.of(tools, choice),
                            stop_sequences=tuple(options.get("stop", ())))


def count_tokens(body: Any, served: ServedModel) -> int:
    """`POST /v1/messages/count_tokens`: the prompt a `/v1/messages` request with these fields would have, in
    tokens, after the same checks (the prompt must leave room to answer in the context)."""
    _check_fields(body, COUNT_FIELDS)
    return len(prepare_chat(served, _chat_call(body, None)).prompt_ids)


def _check_fields(body: Any, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise APIError(400, f"{name}: this field is not supported by qwen-mlx", name)


def _chat_call(body: dict[str, Any], max_tokens: int | None) -> ChatCall:
    """The request's messages, tools and output format as the library's call (what a reply and a token count
    share)."""
    _check_extras(body)
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    messages = _system(body.get("system")) + _messages(body.get("messages"))
    options = _sampling(body)
    fmt = _output_format(body.get("output_config"))
    if fmt is not None:
        options["json_schema"] = fmt
    # max_tokens is a ceiling: the reply also ends at the model's own limits (stop_reason "max_tokens" either way).
    params = {"stop": "stop_sequences", "json_schema": "output_config", "grammar": "tool_choice"}
    return ChatCall(messages, tools, choice, options, max_tokens, clip_max_tokens=True, params=params)


def _check_extras(body: dict[str, Any]) -> None:
    thinking = body.get("thinking")
    if thinking is not None and thinking != {"type": "disabled"}:
        raise APIError(400, "thinking: extended thinking is not supported by this model; leave it out or send "
                            "{'type': 'disabled'}", "thinking")
    if body.get("service_tier", "auto") not in ("auto", "standard_only"):
        raise APIError(400, "service_tier: must be 'auto' or 'standard_only'", "service_tier")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or set(metadata) - {"user_id"}):
        raise APIError(400, "metadata: only user_id is supported", "metadata")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 1:
            raise APIError(400, "temperature: must be a number from 0 to 1", "temperature")
        options["temperature"] = temperature
    for name in ("top_p", "top_k"):
        if body.get(name) is not None:
            options[name] = body[name]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise APIError(400, "stop_sequences: must be a list of non-empty strings", "stop_sequences")
        options["stop"] = stops
    return options


def _output_format(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if not isinstance(config, dict):
        raise APIError(400, "output_config: must be an object", "output_config")
    for name in config:
        if name != "format":
            raise APIError(400, f"output_config.{name}: not supported by qwen-mlx", "output_config")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise APIError(400, "output_config.format: must be {'type': 'json_schema', 'schema': {...}}", "output_config")
    return fmt["schema"]


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools in (None, []):
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools: must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise APIError(400, f"tools.{i}: must be an object", "tools")
        if tool.get("type", "custom") != "custom":
            raise APIError(400, f"tools.{i}: server tool {tool.get('type')!r} is not supported by qwen-mlx; give "
                                "client tools ({'name', 'description', 'input_schema'})", "tools")
        unknown = sorted(set(tool) - TOOL_FIELDS)
        if unknown:
            raise APIError(400, f"tools.{i}.{unknown[0]}: not supported by qwen-mlx", "tools")
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise APIError(400, f"tools.{i}: needs a name and an input_schema object", "tools")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> ToolChoice:
    """Anthropic's tool_choice: auto, any (a call to any tool), tool (that one), none."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise APIError(400, "tool_choice: must be {'type': 'auto' | 'any' | 'tool' | 'none'}", "tool_choice")
    kind = choice["type"]
    unknown = sorted(set(choice) - {"type", "name", "disable_parallel_tool_use"})
    if unknown:
        raise APIError(400, f"tool_choice.{unknown[0]}: not supported", "tool_choice")
    name = choice.get("name")
    if kind == "tool" and not isinstance(name, str):
        raise APIError(400, "tool_choice: type 'tool' needs the tool's name", "tool_choice")
    parallel = not choice.get("disable_parallel_tool_use", False)
    mode = {"auto": "auto", "none": "none"}.get(kind, "required")
    return ToolChoice(mode, name if kind == "tool" else None, parallel)  # type: ignore[arg-type]


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        text = system
    elif isinstance(system, list):
        text = "\n\n".join(_text_block(b, "system") for b in system)
    else:
        raise APIError(400, "system: must be a string or a list of text blocks", "system")
    return [{"role": "system", "content": checked_text("system", text)}] if text else []


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or set(m) - {"role", "content"}:
            raise APIError(400, f"messages.{i}: must be {{'role': 'user' | 'assistant', 'content': ...}}", "messages")
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise APIError(400, f"messages.{i}.content: must be a string or a list of content blocks", "messages")
        out.extend(_user(blocks, i) if m["role"] == "user" else [_assistant(blocks, i)])
    return out


def _user(blocks: list[Any], i: int) -> list[dict[str, Any]]:
    """A user turn: its tool results as tool messages (first, as Qwen's template expects them after the calls),
    then its text."""
    results, texts = [], []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            result = _tool_result(block, f"messages.{i}.content.{j}")
            results.append({"role": "tool", "content": checked_text("messages", result)})
        else:
            texts.append(_text_block(block, f"messages.{i}.content.{j}"))
    text = "".join(texts)
    return results + ([{"role": "user", "content": checked_text("messages", text)}] if text or not results else [])


def _assistant(blocks: list[Any], i: int) -> dict[str, Any]:
    texts, calls = [], []
    for j, block in enumerate(blocks):
        where = f"messages.{i}.content.{j}"
        if isinstance(block, dict) and block.get("type") == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise APIError(400, f"{where}: tool_use needs a name and an input object", "messages")
            calls.append({"type": "function", "function": {"name": block["name"], "arguments": block.get("input", {})}})
        else:
            texts.append(_text_block(block, where))
    message: dict[str, Any] = {"role": "assistant", "content": checked_text("messages", "".join(texts))}
    if calls:
        message["tool_calls"] = calls
    return message


def _text_block(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else type(block).__name__
    if kind != "text":
        raise APIError(400, f"{where}: content block type {kind!r} is not supported; this model reads text (and "
                            "tool_use / tool_result blocks)", "messages")
    unknown = sorted(set(block) - TEXT_FIELDS)
    if unknown or not isinstance(block.get("text"), str):
        raise APIError(400, f"{where}: " + (f"{unknown[0]} is not supported" if unknown else "text must be a string"),
                       "messages")
    return block["text"]


def _tool_result(block: dict[str, Any], where: str) -> str:
    if not isinstance(block.get("tool_use_id"), str):
        raise APIError(400, f"{where}: tool_result needs the tool_use_id it answers", "messages")
    content = block.get("content", "")
    if isinstance(content, list):
        content = "".join(_text_block(b, f"{where}.content") for b in content)
    if not isinstance(content, str):
        raise APIError(400, f"{where}: tool_result content must be a string or text blocks", "messages")
    return f"Error: {content}" if block.get("is_error") else content


class AnthropicReply:
    """Builds one reply from its `GenerationChunk`s: the stream's events as they come (`start`, `add`, then
    `finish`), and the whole message. Content blocks open and close in order; a tool call the grammar forces
    streams its input as `input_json_delta` pieces, one the model chose freely arrives whole once it closes."""

    def __init__(self, request: AnthropicRequest, served: ServedModel):
        self.request = request
        self.parts = ReplyParts(served, request.tools)
        self.blocks: list[dict[str, Any]] = []  # the message's content so far; tool_use inputs as JSON text
        self.open: int | None = None  # index of the block being streamed

    def start(self, prompt_tokens: int) -> list[tuple[str, dict[str, Any]]]:
        message: dict[str, Any] = {
            "id": self.request.id, "type": "message", "role": "assistant", "model": self.request.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": message}), ("ping", {"type": "ping"})]

    def add(self, chunk: GenerationChunk) -> list[tuple[str, dict[str, Any]]]:
        return self._parts(self.parts.add(chunk))

    def finish(self, last: GenerationChunk) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
        events = self._parts(self.parts.finish(last)) + self._close()
        stats = last.stats or GenerationStats()
        reason, stop = self._stop_reason(last)
        cached = stats.prompt_tokens - stats.prefilled_tokens
        usage = {"input_tokens": stats.prompt_tokens - cached, "output_tokens": stats.generation_tokens,
                 "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}
        events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason,
                                                                            "stop_sequence": stop}, "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        message = {"id": self.request.id, "type": "message", "role": "assistant", "model": self.request.model,
                   "content": [self._final(b) for b in self.blocks], "stop_reason": reason, "stop_sequence": stop,
                   "usage": usage}
        return events, message

    def _stop_reason(self, last: GenerationChunk) -> tuple[str, str | None]:
        if any(b["type"] == "tool_use" for b in self.blocks):
            return "tool_use", None
        if last.finish_reason == "length":
            return "max_tokens", None
        if last.stop_sequence is not None and last.stop_sequence in self.request.stop_sequences:
            return "stop_sequence", last.stop_sequence
        return "end_turn", None

    def _parts(self, parts: list[Part]) -> list[tuple[str, dict[str, Any]]]:
        events = []
        for part in parts:
            if isinstance(part, str):
                events += self._text(part)
            elif isinstance(part, CallPiece):
                events += self._piece(part)
            else:
                arguments = json.dumps(part.arguments, ensure_ascii=False)
                events += self._open_tool(part.name) + self._input(arguments) + self._close()
        return events

    def _piece(self, piece: CallPiece) -> list[tuple[str, dict[str, Any]]]:
        if piece.name is not None:
            return self._open_tool(piece.name)
        return self._input(piece.arguments) if piece.arguments else []

    def _text(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        events = []
        if self.open is None or self.blocks[self.open]["type"] != "text":
            events += self._open({"type": "text", "text": ""})
        self._current()["text"] += text
        return [*events, ("content_block_delta", {"type": "content_block_delta", "index": self.open,
                                                  "delta": {"type": "text_delta", "text": text}})]

    def _open_tool(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        block_id = f"toolu_{self.request.id[4:]}_{len(self.blocks)}"
        events = self._open({"type": "tool_use", "id": block_id, "name": name, "input": {}})
        self._current()["json"] = ""
        return events

    def _input(self, piece: str) -> list[tuple[str, dict[str, Any]]]:
        self._current()["json"] += piece
        return [("content_block_delta", {"type": "content_block_delta", "index": self.open,
                                         "delta": {"type": "input_json_delta", "partial_json": piece}})]

    def _current(self) -> dict[str, Any]:
        """The block being streamed (`_open` started it)."""
        assert self.open is not None
        return self.blocks[self.open]

    def _open(self, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Start a block, closing the one before (blocks never overlap)."""
        events = self._close()
        self.blocks.append(block)
        self.open = len(self.blocks) - 1
        shown = {k: v for k, v in block.items() if k != "json"}
        return [*events, ("content_block_start", {"type": "content_block_start", "index": self.open,
                                                  "content_block": shown})]

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self.open is None:
            return []
        index, self.open = self.open, None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _final(self, block: dict[str, Any]) -> dict[str, Any]:
        if block["type"] != "tool_use":
            return block
        try:
            value = json.loads(block["json"] or "{}")
        except json.JSONDecodeError:  # cut off by max_tokens: the input as far as it came is in the stream only
            value = {}
        return {"type": "tool_use", "id": block["id"], "name": block["name"],
                "input": value if isinstance(value, dict) else {}}
