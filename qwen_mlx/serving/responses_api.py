"""OpenAI's Responses API (`POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`): requests checked and turned
into a `ChatCall`, replies shaped as response objects or as the typed events OpenAI's SDKs (and the Agents SDK)
read, errors in OpenAI's shape.

`input` items map onto Qwen's chat template: messages as they are, `function_call` items as the assistant's
tool calls, `function_call_output` items as tool messages; `instructions` is the system message. A stored
response (the last `MAX_STORED`, in memory; none with `store: false`) is continued by `previous_response_id`:
its conversation, output included, comes before the new input, so the prefix cache serves it again. As on the
chat endpoint, every field is honoured or refused by name: built-in tools, reasoning, background runs, `include`
and anything unknown are a 400.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
from qwen_mlx.engine.request import MAX_TOKENS_LIMIT, GenerationRequest, check_nesting, is_int
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.serving.protocol import (
    APIError,
    ChatCall,
    Part,
    ReplyParts,
    ServedModel,
    ToolChoice,
    ToolReading,
    checked_text,
    known_fields,
    prepare_chat,
)
from qwen_mlx.text.tool_calls import CallPiece

FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "seed", "tools",
          "tool_choice", "parallel_tool_calls", "text", "metadata", "user", "store", "previous_response_id", "stream",
          "stream_options", "include", "truncation", "reasoning", "background", "service_tier", "max_tool_calls",
          "top_logprobs", "safety_identifier", "prompt_cache_key"}
# Accepted only at the value that changes nothing, since that is all qwen-mlx does.
OFF_VALUES: dict[str, tuple[Any, ...]] = {"include": ([],), "truncation": ("disabled",), "background": (False,),
                                          "top_logprobs": (0,), "service_tier": ("auto", "default"),
                                          "stream_options": ({}, {"include_obfuscation": False})}
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
ITEM_FIELDS = {"message": {"type", "role", "content", "id", "status", "phase"},
               "function_call": {"type", "id", "call_id", "name", "arguments", "status"},
               "function_call_output": {"type", "id", "call_id", "output", "status"}}
PART_FIELDS = {"input_text": ("text", {"type", "text"}), "output_text": ("text", {"type", "text", "annotations",
                                                                                "logprobs"}),
               "refusal": ("refusal", {"type", "refusal"})}
TOOL_FIELDS = {"type", "name", "description", "parameters", "strict"}
SCHEMA_FIELDS = {"type", "name", "schema", "strict", "description"}
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_METADATA = (16, 64, 512)  # OpenAI's limits: pairs, characters in a key, characters in a value
MAX_STORED = 256  # responses kept for previous_response_id and GET


@dataclass
class StoredResponse:
    response: dict[str, Any]
    messages: list[dict[str, Any]]  # its conversation, output included, without its instructions


class ResponseStore:
    """The last `size` responses created with `store` (in memory only): what `previous_response_id` continues and
    `GET /v1/responses/{id}` answers. Parsing runs on a thread, replies finish on the event loop: locked."""

    def __init__(self, size: int = MAX_STORED):
        self.size = size
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, stored: StoredResponse) -> None:
        with self._lock:
            self._responses[stored.response["id"]] = stored
            while len(self._responses) > self.size:
                self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse:
        with self._lock:
            stored = self._responses.get(response_id)
        if stored is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", "response_id", "not_found")
        return stored

    def conversation(self, previous_id: str) -> list[dict[str, Any]]:
        """The messages a response continues from (`previous_response_id`), a 404 naming that field if unknown."""
        with self._lock:
            stored = self._responses.get(previous_id)
        if stored is None:
            raise APIError(404, f"Previous response with id '{previous_id}' not found.", "previous_response_id",
                           "previous_response_not_found")
        return stored.messages

    def delete(self, response_id: str) -> dict[str, Any]:
        with self._lock:
            if self._responses.pop(response_id, None) is None:
                raise APIError(404, f"Response with id '{response_id}' not found.", "response_id", "not_found")
        return {"id": response_id, "object": "response.deleted", "deleted": True}


@dataclass
class ResponsesRequest:
    generation: GenerationRequest
    messages: list[dict[str, Any]]  # the conversation without the instructions (what a stored response keeps)
    echo: dict[str, Any]  # the request's fields as the response object repeats them
    stream: bool = False
    store: bool = True
    tools: ToolReading = ToolReading()  # how the reply's tool calls are read
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))


def parse_request(body: Any, served: ServedModel, store: ResponseStore) -> ResponsesRequest:
    body = _checked_fields(body)
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise APIError(400, "previous_response_id must be a string", "previous_response_id")
    history = store.conversation(previous) if previous is not None else []
    messages = history + _input(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise APIError(400, "instructions must be a string", "instructions")
    system = [{"role": "system", "content": checked_text("instructions", instructions)}] if instructions else []
    tools, echoed_tools = _tools(body.get("tools"))
    choice = _tool_choice(body, tools)
    options, text = _options(body)
    if choice.forced:
        # A required call is all the reply holds: no text for a text format to shape (OpenAI's reading too; the
        # Agents SDK sends both when an agent with an output_type must call a tool first).
        options = {k: v for k, v in options.items() if k not in ("json_schema", "response_format")}
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None and (not is_int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT):
        raise APIError(400, f"max_output_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}", "max_output_tokens")
    params = {"max_tokens": "max_output_tokens", "prompt": "input", "json_schema": "text.format",
              "response_format": "text.format", "grammar": "tool_choice" if choice.forced else "text.format"}
    # max_output_tokens is a ceiling: a reply that reaches it, or the context's end, is `incomplete`.
    generation = prepare_chat(served, ChatCall(system + messages, tools, choice, options, max_tokens,
                                               clip_max_tokens=True, params=params, param="input"))
    sampling = generation.sampling
    echo = {"model": served.id, "instructions": instructions, "max_output_tokens": max_tokens,
            "metadata": _metadata(body.get("metadata")), "previous_response_id": previous,
            "parallel_tool_calls": choice.parallel, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "text": text, "tool_choice": body.get("tool_choice", "auto"), "tools": echoed_tools,
            "truncation": "disabled", "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
            "store": _flag(body, "store", True), "top_logprobs": 0, "max_tool_calls": None,
            **{name: _string(body, name) for name in ("user", "safety_identifier", "prompt_cache_key")}}
    return ResponsesRequest(generation, messages, echo, stream=_flag(body, "stream", False), store=echo["store"],
                            tools=ToolReading.of(tools, choice))


def _checked_fields(body: Any) -> dict[str, Any]:
    """The body's fields, nulls dropped (null means absent, as for OpenAI); unknown ones and values qwen-mlx
    cannot honour are refused by name."""
    body = known_fields(body, FIELDS)
    for name, allowed in OFF_VALUES.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in allowed):
            raise APIError(400, f"parameter '{name}' = {body[name]!r} is not supported by this server (only "
                                f"{' or '.join(repr(v) for v in allowed)})", name, "unsupported_parameter")
    reasoning = body.get("reasoning")
    if reasoning is not None and (not isinstance(reasoning, dict) or any(v is not None for v in reasoning.values())):
        raise APIError(400, "parameter 'reasoning' is not supported by this server: this model does not reason "
                            "before it answers (leave it out, or send its fields as null)", "reasoning",
                       "unsupported_parameter")
    if body.get("max_tool_calls") is not None:
        raise APIError(400, "parameter 'max_tool_calls' is not supported by this server (it limits built-in tools, "
                            "which it has none of)", "max_tool_calls", "unsupported_parameter")
    if "stream_options" in body and body.get("stream") is not True:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    return body


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false", name)
    return value


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"{name} must be a string", name)
    return value


def _metadata(metadata: Any) -> dict[str, str]:
    pairs, key_chars, value_chars = MAX_METADATA
    if metadata is None:
        return {}
    if (not isinstance(metadata, dict) or len(metadata) > pairs
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= key_chars and len(v) <= value_chars
                       for k, v in metadata.items())):
        raise APIError(400, f"metadata must map at most {pairs} keys of up to {key_chars} characters to strings of "
                            f"up to {value_chars}", "metadata")
    return metadata


def _options(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`prepare_request`'s sampling options (checked there) and the output format, with the `text` field as the
    response object repeats it."""
    options: dict[str, Any] = {name: body[name] for name in ("temperature", "top_p", "seed") if name in body}
    temperature = options.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature > MAX_TEMPERATURE:
        raise APIError(400, f"temperature must be between 0 and {MAX_TEMPERATURE:g}", "temperature")
    text = body.get("text", {})
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise APIError(400, "text must be {'format': {...}}", "text")
    if text.get("verbosity") not in (None, "medium"):
        raise APIError(400, "text.verbosity is not supported by this server (only 'medium')", "text.verbosity",
                       "unsupported_parameter")
    fmt = text.get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        options["json_schema"] = _json_schema(fmt)
    elif kind == "json_object" and set(fmt) == {"type"}:
        options["response_format"] = {"type": "json_object"}
    elif kind != "text" or set(fmt) != {"type"}:
        raise APIError(400, "text.format must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                            "'json_schema', 'name': ..., 'schema': {...}}", "text.format")
    return options, {"format": fmt, "verbosity": "medium"}


def _json_schema(fmt: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(fmt) - SCHEMA_FIELDS)
    if unknown:
        raise APIError(400, f"text.format.{unknown[0]} is not supported by this server", "text.format")
    if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
        raise APIError(400, "text.format json_schema needs a name and a schema object", "text.format")
    if not isinstance(fmt.get("strict", True), bool) or not isinstance(fmt.get("description", ""), str):
        raise APIError(400, "text.format: strict must be true or false, description a string", "text.format")
    return fmt["schema"]


def _tools(tools: Any) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """Function tools in the chat template's shape, and as the response object repeats them."""
    if tools is None or tools == []:
        return None, []
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list", "tools")
    chat, echoed = [], []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(400, f"tools[{i}]: tool type {kind!r} is not supported by this server; built-in tools "
                                "(web_search, file_search, computer_use, ...) need OpenAI's servers: give "
                                "{'type': 'function', 'name': ..., 'parameters': {...}}", "tools")
        unknown = sorted(set(tool) - TOOL_FIELDS)
        if unknown:
            raise APIError(400, f"tools[{i}].{unknown[0]} is not supported by this server", "tools")
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(tool.get("name"), str) or not isinstance(parameters, dict) \
                or not isinstance(tool.get("description") or "", str):
            raise APIError(400, f"tools[{i}] needs a name, and parameters as an object", "tools")
        function = {"name": tool["name"], "parameters": parameters}
        if tool.get("description"):
            function["description"] = tool["description"]
        chat.append({"type": "function", "function": function})
        echoed.append({"type": "function", "name": tool["name"], "description": tool.get("description"),
                       "parameters": parameters, "strict": tool.get("strict")})
    return chat, echoed


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> ToolChoice:
    """The Responses API's tool_choice: 'auto', 'none', 'required' or {'type': 'function', 'name': ...}."""
    choice = body.get("tool_choice", "auto" if tools else "none")
    parallel = _flag(body, "parallel_tool_calls", True)
    if isinstance(choice, dict):
        if choice.get("type") != "function" or set(choice) != {"type", "name"} or not isinstance(choice["name"], str):
            raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': "
                                "...}; built-in and allowed_tools choices are not supported", "tool_choice")
        return ToolChoice("required", choice["name"], parallel)
    if choice not in ("auto", "none", "required"):
        raise APIError(400, f"tool_choice {choice!r} must be 'auto', 'none', 'required' or a named function",
                       "tool_choice")
    # "auto" is the default with tools or without (OpenAI's), and without tools it can only mean "none".
    return ToolChoice("none" if choice == "auto" and not tools else choice, None, parallel)


def _input(value: Any) -> list[dict[str, Any]]:
    """`input` as chat messages: a string is the user's message; a list holds messages and function-call items."""
    if isinstance(value, str):
        return [{"role": "user", "content": checked_text("input", value)}]
    if not isinstance(value, list) or not value:
        raise APIError(400, "input must be a string or a non-empty list of items", "input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = (item.get("type") or ("message" if "role" in item else None)) if isinstance(item, dict) else None
        if not isinstance(kind, str) or kind not in ITEM_FIELDS:
            raise APIError(400, f"{where}: item type {kind!r} is not supported; give messages, function_call and "
                                "function_call_output items", "input")
        unknown = sorted(k for k in set(item) - ITEM_FIELDS[kind] if item[k] is not None)  # null: left out
        if unknown:
            raise APIError(400, f"{where}.{unknown[0]} is not supported by this server", "input")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            _add_call(messages, _function_call(item, where))
        else:
            messages.append({"role": "tool", "content": _call_output(item, where)})
    return messages


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise APIError(400, f"{where}.role must be one of {', '.join(sorted(ROLES))}", "input")
    return {"role": ROLES[role], "content": checked_text("input", _content(item.get("content"), where),
                                                          f"{where}.content")}


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or text parts (input_text, output_text, refusal) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", "input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if not isinstance(kind, str) or kind not in PART_FIELDS:
            raise APIError(400, f"{where}.content[{j}]: content part type {kind!r} is not supported; this model "
                                "reads text only", "input")
        key, allowed = PART_FIELDS[kind]
        unknown = sorted(k for k in set(part) - allowed if part[k] is not None)
        if unknown or not isinstance(part.get(key), str):
            raise APIError(400, f"{where}.content[{j}]." + (f"{unknown[0]} is not supported by this server"
                                                             if unknown else f"{key} must be a string"), "input")
        texts.append(part[key])
    return "".join(texts)


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
        raise APIError(400, f"{where}: a function_call needs call_id, name and arguments as strings", "input")
    try:
        arguments = json.loads(item["arguments"] or "{}")
        check_nesting(f"{where}.arguments", arguments)
    except (json.JSONDecodeError, RecursionError):
        raise APIError(400, f"{where}.arguments must be a JSON object, as a string", "input") from None
    except QwenMLXError as e:
        raise APIError(400, str(e), "input") from None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}.arguments must be a JSON object, as a string", "input")
    return {"type": "function", "function": {"name": checked_text("input", item["name"], f"{where}.name"),
                                             "arguments": arguments}}


def _add_call(messages: list[dict[str, Any]], call: dict[str, Any]) -> None:
    """A call joins the assistant's message just before it (its text, or the calls made with it), as Qwen's
    template writes one turn's text and calls together."""
    if messages and messages[-1]["role"] == "assistant":
        messages[-1] = {**messages[-1], "tool_calls": [*messages[-1].get("tool_calls", []), call]}
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})


def _call_output(item: dict[str, Any], where: str) -> str:
    if not isinstance(item.get("call_id"), str):
        raise APIError(400, f"{where}: a function_call_output needs the call_id it answers", "input")
    output = item.get("output")
    text = output if isinstance(output, str) else _content(output, f"{where}.output") if isinstance(output, list) \
        else None
    if text is None:
        raise APIError(400, f"{where}.output must be a string or a list of input_text parts", "input")
    return checked_text("input", text, f"{where}.output")


def usage(stats: GenerationStats) -> dict[str, Any]:
    """The Responses API's usage: input_tokens counts the cached ones too, as OpenAI's does."""
    return {"input_tokens": stats.prompt_tokens,
            "input_tokens_details": {"cached_tokens": stats.prompt_tokens - stats.prefilled_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": stats.generation_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": stats.prompt_tokens + stats.generation_tokens}


Event = tuple[str, dict[str, Any]]


class ResponsesReply:
    """Builds one response from its `GenerationChunk`s: the stream's typed events as they come (`start`, `add`,
    then `finish`), and the whole response object. Output items open and close in order: text is a `message`
    item, each tool call a `function_call` item (a forced one streams its arguments in pieces, one the model chose
    freely arrives whole once its block closes)."""

    def __init__(self, request: ResponsesRequest, served: ServedModel, store: ResponseStore):
        self.request, self.store = request, store
        self.parts = ReplyParts(served, request.tools)
        self.output: list[dict[str, Any]] = []  # the items so far (a message's text in its one output_text part)
        self.open = False  # whether the last item is still being streamed
        self.sequence = 0

    def start(self) -> list[Event]:
        snapshot = self._response("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def add(self, chunk: GenerationChunk) -> list[Event]:
        return self._parts(self.parts.add(chunk))

    def finish(self, last: GenerationChunk) -> tuple[list[Event], dict[str, Any]]:
        events = self._parts(self.parts.finish(last))
        if not self.output:  # an empty reply is still a message, as clients look for one
            events += self._open_message()
        status = "incomplete" if last.finish_reason == "length" else "completed"
        events += self._close(status)
        response = self._response(status, usage(last.stats or GenerationStats()))
        if self.request.store:
            self.store.put(StoredResponse(response, [*self.request.messages, self._as_message()]))
        events.append(self._event(f"response.{status}", response=response))
        return events, response

    def error_event(self, error: APIError) -> Event:
        return self._event("error", code=error.code, message=error.message, param=error.param)

    def _parts(self, parts: list[Part]) -> list[Event]:
        events = []
        for part in parts:
            if isinstance(part, str):
                events += self._text(part) if part else []
            elif isinstance(part, CallPiece):
                events += self._open_call(part.name) if part.name is not None else self._arguments(part.arguments)
            else:
                arguments = json.dumps(part.arguments, ensure_ascii=False)
                events += self._open_call(part.name) + self._arguments(arguments) + self._close("completed")
        return events

    def _text(self, text: str) -> list[Event]:
        events = []
        if not self.open or self.output[-1]["type"] != "message":
            events += self._open_message()
        item = self.output[-1]
        item["content"][0]["text"] += text
        return [*events, self._event("response.output_text.delta", item_id=item["id"],
                                     output_index=len(self.output) - 1, content_index=0, delta=text, logprobs=[])]

    def _open_message(self) -> list[Event]:
        events = self._open({"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": "in_progress",
                             "role": "assistant", "content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item = self.output[-1]
        item["content"].append(part)
        return [*events, self._event("response.content_part.added", item_id=item["id"],
                                     output_index=len(self.output) - 1, content_index=0, part=part)]

    def _open_call(self, name: str) -> list[Event]:
        return self._open({"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress",
                           "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": name, "arguments": ""})

    def _arguments(self, piece: str) -> list[Event]:
        if not piece:
            return []
        item = self.output[-1]
        item["arguments"] += piece
        return [self._event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=len(self.output) - 1, delta=piece)]

    def _open(self, item: dict[str, Any]) -> list[Event]:
        """Start an item, closing the one before (items never overlap: the open one is always the last)."""
        events = self._close("completed")
        self.output.append(item)
        self.open = True
        return [*events, self._event("response.output_item.added", output_index=len(self.output) - 1, item=item)]

    def _close(self, status: str) -> list[Event]:
        if not self.open:
            return []
        self.open = False
        index, item = len(self.output) - 1, self.output[-1]
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            events = [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=part["text"], logprobs=[]),
                      self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                  content_index=0, part=part)]
        else:
            events = [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=item["name"], arguments=item["arguments"])]
        return [*events, self._event("response.output_item.done", output_index=index, item=item)]

    def _event(self, kind: str, **fields: Any) -> Event:
        """One typed event; a copy, since the items it shows go on growing after it is sent."""
        self.sequence += 1
        return kind, {"type": kind, "sequence_number": self.sequence - 1, **copy.deepcopy(fields)}

    def _response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        request = self.request
        return {"id": request.id, "object": "response", "created_at": request.created_at, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None, "background": False,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "output": copy.deepcopy(self.output), "usage": usage, **request.echo}

    def _as_message(self) -> dict[str, Any]:
        """The output as the assistant's turn in the chat template's shape (what `previous_response_id` resends):
        its text exactly as generated, so the reply memory gives back the ids it was generated as."""
        text = "".join(i["content"][0]["text"] for i in self.output if i["type"] == "message")
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls = [{"type": "function", "function": {"name": i["name"], "arguments": _arguments_object(i)}}
                 for i in self.output if i["type"] == "function_call"]
        if calls:
            message["tool_calls"] = calls
        return message


def _arguments_object(item: dict[str, Any]) -> dict[str, Any]:
    try:
        value = json.loads(item["arguments"] or "{}")
    except json.JSONDecodeError:  # cut off by max_output_tokens: the call as far as it came is in the output only
        value = {}
    return value if isinstance(value, dict) else {}
