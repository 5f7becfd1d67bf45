"""The OpenAI wire format: requests checked and turned into `stream_generate` arguments, replies shaped back.

Every parameter is either honoured or refused: one we do not support (e.g. `n` > 1) is a 400 error that names
it, never silently ignored. Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from qwen_mlx.chat import TOOL_CALL_CLOSE, ToolCall, ToolCallStream
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate import MAX_TOKENS_LIMIT, MAX_TOP_LOGPROBS, GenerationChunk, GenerationStats
from qwen_mlx.grammar import check_grammar, json_schema_grammar, tool_call_grammar
from qwen_mlx.sample import SamplingParams
from qwen_mlx.tokenizer import Tokenizer

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "stop", "seed", "n", "user", *SAMPLING_FIELDS}
CHAT_FIELDS = COMMON_FIELDS | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "response_format", "presence_penalty", "frequency_penalty", "logit_bias",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "suffix", "best_of", "presence_penalty",
                                     "frequency_penalty", "logit_bias", "response_format"}
ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Model:
    """What request checking needs to know about the served model."""

    id: str
    tokenizer: Tokenizer
    vocab_size: int
    context_size: int


@dataclass
class Request:
    """A checked request: the prompt's ids, `stream_generate`'s options, and how to shape the reply."""

    chat: bool
    prompt_ids: list[int]
    options: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    parse_tools: bool = False
    logprobs: int | None = None  # None: not asked; else how many alternatives per token
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def parse_chat_request(body: Any, model: Model) -> Request:
    body = _check_fields(body, CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice", "auto" if tools else "none")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise APIError(400, "parallel_tool_calls must be true or false", "parallel_tool_calls")
    options = _common_options(body, model)
    grammar = _response_format_grammar(body.get("response_format"))
    named = None
    if isinstance(choice, dict):
        named = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(named, str):
            raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or "
                                "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    elif choice not in ("auto", "none", "required"):
        raise APIError(400, f"tool_choice {choice!r} must be 'auto', 'none', 'required' or a named function",
                       "tool_choice")
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice")
    if choice == "required" or named is not None:
        if grammar is not None:
            raise APIError(400, "response_format cannot be combined with a required tool_choice", "response_format")
        try:
            grammar = tool_call_grammar(model.tokenizer, tools, named, parallel)
        except QwenMLXError as e:
            raise APIError(400, str(e), "tool_choice") from None
    elif choice == "auto" and not parallel:
        # At most one call: stop where the first one closes (the tool-call parser takes an unclosed last block).
        options["stop"] = [*options["stop"], TOOL_CALL_CLOSE]
    if grammar is not None:
        try:
            check_grammar(model.tokenizer, model.vocab_size, grammar)
        except QwenMLXError as e:
            raise APIError(400, str(e), "response_format") from None
        options["grammar"] = grammar
    logprobs = body.get("logprobs", False)
    top = body.get("top_logprobs")
    if not isinstance(logprobs, bool):
        raise APIError(400, "logprobs must be true or false", "logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise APIError(400, f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    try:
        ids = model.tokenizer.apply_chat_template(
            messages, tools=tools if choice != "none" else None, add_generation_prompt=True, tokenize=True
        )
    except Exception as e:  # the model's own Jinja template refusing these messages (e.g. a bad role order)
        raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
    request = Request(
        chat=True, prompt_ids=ids, options=options, stream=_stream(body), include_usage=_include_usage(body),
        parse_tools=choice != "none", logprobs=(top or 0) if logprobs else None,
    )
    _check_length(request, body.get("max_completion_tokens", body.get("max_tokens")), model)
    return request


def parse_completion_request(body: Any, model: Model) -> Request:
    body = _check_fields(body, COMPLETION_FIELDS)
    for name, off in (("echo", False), ("suffix", None), ("best_of", 1)):
        if body.get(name, off) not in (off, None):
            raise APIError(400, f"parameter '{name}' is not supported by this server", name, "unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        ids = model.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{model.vocab_size - 1})", "prompt")
    else:
        raise APIError(400, "prompt must be a non-empty string or list of token ids (one prompt per request)",
                       "prompt")
    options = _common_options(body, model)
    grammar = _response_format_grammar(body.get("response_format"))
    if grammar is not None:
        options["grammar"] = grammar
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= 5):
        raise APIError(400, "logprobs must be an integer from 0 to 5", "logprobs")
    request = Request(chat=False, prompt_ids=ids, options=options, stream=_stream(body),
                      include_usage=_include_usage(body), logprobs=logprobs)
    _check_length(request, body.get("max_tokens"), model)
    return request


def _check_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise APIError(400, f"parameter '{name}' is not supported by this server", name, "unsupported_parameter")
    # Accepted only at the value that means "off", since that is all we do.
    for name, off in (("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0), ("logit_bias", {})):
        if body.get(name) not in (None, off):
            hint = "; use repetition_penalty" if name.endswith("_penalty") else ""
            raise APIError(400, f"parameter '{name}' = {body[name]!r} is not supported by this server{hint}",
                           name, "unsupported_parameter")
    return body


def _common_options(body: dict[str, Any], model: Model) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        value = body.get(name)
        if value is not None:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise APIError(400, f"{name} must be a number", name)
            if name == "top_k" and not _is_int(value):
                raise APIError(400, "top_k must be an integer", name)
            options[name] = value
    try:
        SamplingParams().updated(**{k: v for k, v in options.items()})
    except QwenMLXError as e:
        raise APIError(400, str(e), next(iter(options), None)) from None
    if "temperature" in options and options["temperature"] > 2:
        raise APIError(400, "temperature must be between 0 and 2", "temperature")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4):
        raise APIError(400, "stop must be a string or a list of up to 4 strings", "stop")
    options["stop"] = stop or []
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise APIError(400, "seed must be an integer", "seed")
        options["seed"] = seed
    return options


def _check_length(request: Request, max_tokens: Any, model: Model) -> None:
    """A prompt that leaves no room to answer is refused before any compute, as is a max_tokens past the context."""
    n = len(request.prompt_ids)
    if n >= model.context_size:
        raise APIError(400, f"the prompt is {n} tokens but the model's context is {model.context_size}; shorten it",
                       "messages" if request.chat else "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(MAX_TOKENS_LIMIT, model.context_size - n)
    if not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise APIError(400, f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}", "max_tokens")
    if n + max_tokens > model.context_size:
        raise APIError(400, f"the model's context is {model.context_size} tokens, but {n} in the prompt + "
                            f"{max_tokens} max_tokens exceed it; lower max_tokens or shorten the prompt",
                       "max_tokens", "context_length_exceeded")
    request.options["max_tokens"] = max_tokens
    if request.logprobs is not None:
        request.options["logprobs"] = request.logprobs


def _response_format_grammar(response_format: Any) -> str | None:
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise APIError(400, "response_format must be an object", "response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar(None)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           "response_format")
        try:
            return json_schema_grammar(schema)
        except QwenMLXError as e:
            raise APIError(400, str(e), "response_format") from None
    raise APIError(400, f"response_format type {kind!r} must be 'text', 'json_object' or 'json_schema'",
                   "response_format")


def _messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages as Qwen's chat template expects them: text content, tool-call arguments as objects."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a role: one of {', '.join(sorted(ROLES))}", "messages")
        message = {"role": "system" if m["role"] == "developer" else m["role"], "content": _text(m.get("content"), i)}
        if m.get("tool_calls"):
            message["tool_calls"] = [_tool_call_in(c, i) for c in m["tool_calls"]]
        if m.get("name") and m["role"] == "tool":
            message["name"] = m["name"]
        out.append(message)
    return out


def _text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"messages[{i}]: content part type {kind!r} is not supported; this model reads "
                                    "text only", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


def _tool_call_in(call: Any, i: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"messages[{i}].tool_calls entries need function.name", "messages")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            raise APIError(400, f"messages[{i}].tool_calls: arguments must be a JSON string", "messages") from None
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list", "tools")
    for t in tools:
        function = t.get("function") if isinstance(t, dict) else None
        if t.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': "
                                "{...}}}", "tools")
    return tools


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    return stream


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "stream_options supports only include_usage", "stream_options")
    return bool(options.get("include_usage", False))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def usage(stats: GenerationStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generation_tokens,
        "total_tokens": stats.prompt_tokens + stats.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.prompt_tokens - stats.prefilled_tokens},
    }


class Reply:
    """Builds the answer to one request from its `GenerationChunk`s: streamed chunk payloads as they come
    (`add`), then the closing payloads or the whole non-streamed response (`finish`)."""

    def __init__(self, request: Request, model: Model):
        self.request, self.model = request, model
        self.tools = ToolCallStream() if request.parse_tools else None
        self.content: list[str] = []
        self.calls: list[ToolCall] = []
        self.logprobs: list[dict[str, Any]] = []
        self.started = False

    def add(self, chunk: GenerationChunk) -> list[dict[str, Any]]:
        """Stream payloads for one chunk (possibly none: text held back as a possible stop or tool markup)."""
        parts: list[str | ToolCall] = (self.tools.feed(chunk.text) if self.tools else [chunk.text]) if chunk.text \
            else []
        logprob = self._logprob(chunk) if chunk.token is not None and self.request.logprobs is not None else None
        return self._payloads(parts, logprob)

    def finish(self, last: GenerationChunk) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The closing stream payloads and the complete response, from the last chunk (finish reason, stats)."""
        tail: list[str | ToolCall] = [last.text] if last.text else []
        if self.tools is not None:
            tail = self.tools.feed(last.text) + self.tools.finish()
        payloads = self._payloads(tail, None)
        reason = "tool_calls" if self.calls else "length" if last.finish_reason == "length" else "stop"
        stats = last.stats or GenerationStats()
        if self.request.chat:
            final = self._chunk({}, reason)
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
            if self.calls:
                message["tool_calls"] = [c.to_openai(self._call_id(i)) for i, c in enumerate(self.calls)]
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reason,
                                      "logprobs": {"content": self.logprobs} if self.request.logprobs is not None
                                      else None}
            response = {"id": f"chatcmpl-{self.request.id}", "object": "chat.completion",
                        "created": self.request.created, "model": self.model.id, "choices": [choice],
                        "usage": usage(stats)}
        else:
            final = self._chunk("", reason)
            choice = {"index": 0, "text": "".join(self.content), "finish_reason": reason,
                      "logprobs": self._legacy_logprobs() if self.request.logprobs is not None else None}
            response = {"id": f"cmpl-{self.request.id}", "object": "text_completion", "created": self.request.created,
                        "model": self.model.id, "choices": [choice], "usage": usage(stats)}
        payloads.append(final)
        if self.request.include_usage:
            payloads.append({**self._chunk({}, None), "choices": [], "usage": usage(stats)})
        return payloads, response

    def _payloads(self, parts: list[str | ToolCall], logprob: dict[str, Any] | None) -> list[dict[str, Any]]:
        payloads = []
        if self.request.chat and not self.started:
            payloads.append(self._chunk({"role": "assistant", "content": ""}, None))
        self.started = True
        text = "".join(p for p in parts if isinstance(p, str))
        self.content.append(text)
        calls = [p for p in parts if isinstance(p, ToolCall)]
        if text or logprob is not None:
            if self.request.chat:
                payload = self._chunk({"content": text}, None)
                if logprob is not None:
                    payload["choices"][0]["logprobs"] = {"content": [logprob]}
            else:
                payload = self._chunk(text, None)
                if logprob is not None:
                    payload["choices"][0]["logprobs"] = self._legacy_logprobs([logprob])
            payloads.append(payload)
        for call in calls:
            index = len(self.calls)
            self.calls.append(call)
            payloads.append(self._chunk({"tool_calls": [{"index": index, **call.to_openai(self._call_id(index))}]},
                                        None))
        if logprob is not None:
            self.logprobs.append(logprob)
        return payloads

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None) -> dict[str, Any]:
        if self.request.chat:
            return {"id": f"chatcmpl-{self.request.id}", "object": "chat.completion.chunk",
                    "created": self.request.created, "model": self.model.id,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return {"id": f"cmpl-{self.request.id}", "object": "text_completion", "created": self.request.created,
                "model": self.model.id,
                "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}]}

    def _call_id(self, index: int) -> str:
        return f"call_{self.request.id[:16]}_{index}"

    def _logprob(self, chunk: GenerationChunk) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            data = self.model.tokenizer.token_bytes[token] if token < len(self.model.tokenizer.token_bytes) else b""
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        return {**entry(chunk.token, chunk.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in chunk.top_logprobs or []]}

    def _legacy_logprobs(self, entries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """/v1/completions' older shape: parallel lists, and the alternatives as {token: logprob}."""
        entries = self.logprobs if entries is None else entries
        offsets, pos = [], 0
        for e in entries:
            offsets.append(pos)
            pos += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets,
        }
