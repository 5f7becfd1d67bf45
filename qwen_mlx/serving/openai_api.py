"""The OpenAI wire format: requests checked and turned into `GenerationRequest`s, replies shaped back.

Every parameter is either honoured or refused: one we do not support (e.g. `n` > 1) is a 400 error that names
it, never silently ignored. The values themselves are checked by the library (`request.prepare_request`), whose
errors name the argument; here they become OpenAI's `param`. Errors take OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`. A field sent as null means the field was left out, as for
OpenAI.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
from qwen_mlx.engine.request import MAX_TOKENS_LIMIT, MAX_TOP_LOGPROBS, GenerationRequest, is_int
from qwen_mlx.serving.protocol import (
    APIError,
    ChatCall,
    ReplyParts,
    ServedModel,
    ToolChoice,
    ToolReading,
    checked_text,
    known_fields,
    prepare_chat,
    prepare_prompt,
)
from qwen_mlx.text.tool_calls import CallPiece, ToolCall

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "stop", "n", "user", "presence_penalty",
                 "frequency_penalty", "logit_bias", "response_format", "logprobs", *SAMPLING_FIELDS}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "parallel_tool_calls", "prediction"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOP = 4  # OpenAI's limit
MAX_LEGACY_LOGPROBS = 5  # /v1/completions' limit
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]


@dataclass
class APIRequest:
    """A checked request: what to generate, and how to shape the reply."""

    chat: bool
    generation: GenerationRequest
    stream: bool = False
    include_usage: bool = False
    tools: ToolReading = ToolReading()  # how the reply's tool calls are read
    logprobs: int | None = None  # None: not asked; else how many alternatives per token
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_ids(self) -> list[int]:
        return self.generation.prompt_ids


def parse_chat_request(body: Any, served: ServedModel) -> APIRequest:
    body = _check_fields(body, CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body, tools)
    options = _options(body)
    logprobs = body.get("logprobs", False)
    top = body.get("top_logprobs")
    if not isinstance(logprobs, bool):
        raise APIError(400, "logprobs must be true or false", "logprobs")
    if top is not None and (not is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise APIError(400, f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if logprobs:
        options["logprobs"] = top or 0
    if "prediction" in body:
        options["prediction"] = _prediction(body["prediction"])
    max_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    params = {"max_tokens": max_name, "prompt": "messages", "logprobs": "top_logprobs",
              "grammar": "tool_choice" if choice.forced else "response_format"}
    generation = prepare_chat(served, ChatCall(messages, tools, choice, options, _max_tokens(body, max_name),
                                               params=params))
    return APIRequest(chat=True, generation=generation, stream=_stream(body), include_usage=_include_usage(body),
                      tools=ToolReading.of(tools, choice), logprobs=options.get("logprobs"))


def parse_completion_request(body: Any, served: ServedModel) -> APIRequest:
    body = _check_fields(body, COMPLETION_FIELDS)
    for name, off in (("echo", False), ("suffix", None), ("best_of", 1)):
        if body.get(name, off) != off:
            raise APIError(400, f"parameter '{name}' is not supported by this server", name, "unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        ids = served.tokenizer.encode(checked_text("prompt", prompt))
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        ids = list(prompt)
    else:
        raise APIError(400, "prompt must be a non-empty string or list of token ids (one prompt per request)",
                       "prompt")
    options = _options(body)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not is_int(logprobs) or not 0 <= logprobs <= MAX_LEGACY_LOGPROBS:
            raise APIError(400, f"logprobs must be an integer from 0 to {MAX_LEGACY_LOGPROBS}", "logprobs")
        options["logprobs"] = logprobs
    call = ChatCall([], options=options, max_tokens=_max_tokens(body, "max_tokens"), param="prompt")
    generation = prepare_prompt(served, ids, call)
    return APIRequest(chat=False, generation=generation, stream=_stream(body), include_usage=_include_usage(body),
                      logprobs=logprobs)


def _max_tokens(body: dict[str, Any], name: str) -> int | None:
    """max_tokens (or max_completion_tokens) as given; None lets the reply fill the context."""
    max_tokens = body.get(name)
    if max_tokens is not None and (not is_int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT):
        raise APIError(400, f"{name} must be an integer from 1 to {MAX_TOKENS_LIMIT}", name)
    return max_tokens


def _check_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    """The body's fields, nulls dropped (null means absent, as for OpenAI); unknown ones and values we cannot
    honour are refused by name."""
    body = known_fields(body, allowed)
    # Accepted only at the value that means "off", since that is all we do.
    for name, off in (("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0), ("logit_bias", {})):
        if body.get(name, off) != off:
            hint = "; use repetition_penalty" if name.endswith("_penalty") else ""
            raise APIError(400, f"parameter '{name}' = {body[name]!r} is not supported by this server{hint}",
                           name, "unsupported_parameter")
    return body


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """`prepare_request`'s keyword arguments from the fields both endpoints share (checked there)."""
    options = {name: body[name] for name in SAMPLING_FIELDS if name in body}
    temperature = options.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature > MAX_TEMPERATURE:
        raise APIError(400, f"temperature must be between 0 and {MAX_TEMPERATURE:g}", "temperature")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) for s in stops):
            raise APIError(400, f"stop must be a string or a list of up to {MAX_STOP} strings", "stop")
        options["stop"] = stops
    if "response_format" in body:
        options["response_format"] = body["response_format"]
    return options


def _prediction(prediction: Any) -> str:
    """OpenAI's Predicted Outputs, `{"type": "content", "content": text or text parts}`, as the expected text."""
    content = prediction.get("content") if isinstance(prediction, dict) and prediction.get("type") == "content" \
        else None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, "prediction must be {'type': 'content', 'content': 'the expected reply'}", "prediction")
    return content


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> ToolChoice:
    """OpenAI's tool_choice and parallel_tool_calls; anything but OpenAI's forms is refused."""
    choice = body.get("tool_choice", "auto" if tools else "none")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise APIError(400, "parallel_tool_calls must be true or false", "parallel_tool_calls")
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        named = function.get("name") if isinstance(function, dict) else None
        if not isinstance(named, str):
            raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or "
                                "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        return ToolChoice("required", named, parallel)
    if choice not in ("auto", "none", "required"):
        raise APIError(400, f"tool_choice {choice!r} must be 'auto', 'none', 'required' or a named function",
                       "tool_choice")
    return ToolChoice(choice, None, parallel)


def _messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages as Qwen's chat template expects them: text content, tool-call arguments as objects."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in OPENAI_ROLES:
            raise APIError(400, f"messages[{i}] needs a role: one of {', '.join(sorted(OPENAI_ROLES))}", "messages")
        message: dict[str, Any] = {"role": OPENAI_ROLES[m["role"]], "content": _text(m.get("content"), i)}
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise APIError(400, f"messages[{i}].tool_calls must be a list", "messages")
            if calls:
                message["tool_calls"] = [_tool_call_in(c, i) for c in calls]
        if m.get("name") and m["role"] == "tool":
            message["name"] = m["name"]
        out.append(message)
    return out


def _text(content: Any, i: int) -> str:
    return checked_text("messages", _content(content, i), f"messages[{i}].content")


def _content(content: Any, i: int) -> str:
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
            # A call cut off by max_tokens (finish_reason "length") comes back as far as it came, which is no JSON:
            # agents (the OpenAI Agents SDK) resend it, so it goes to the template as the string it is.
            text = checked_text("messages", arguments, f"messages[{i}].tool_calls arguments")
            return {"type": "function", "function": {"name": function["name"], "arguments": text}}
    if not isinstance(arguments, dict):
        raise APIError(400, f"messages[{i}].tool_calls: arguments must be a JSON object", "messages")
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list", "tools")
    for t in tools:
        function = t.get("function") if isinstance(t, dict) else None
        parameters = function.get("parameters", {}) if isinstance(function, dict) else None
        if (not isinstance(t, dict) or t.get("type") != "function" or not isinstance(function, dict)
                or not isinstance(function.get("name"), str) or not isinstance(parameters, dict)):
            raise APIError(400, "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': "
                                "{...}}}", "tools")
    return tools


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    return stream


def _include_usage(body: dict[str, Any]) -> bool:
    if "stream_options" not in body:
        return False
    options = body["stream_options"]
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "stream_options supports only include_usage", "stream_options")
    if not body.get("stream"):
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    return bool(options.get("include_usage", False))


def usage(stats: GenerationStats) -> dict[str, Any]:
    """OpenAI's usage; accepted / rejected prediction tokens count the drafts of any speculation source."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generation_tokens,
        "total_tokens": stats.prompt_tokens + stats.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.prompt_tokens - stats.prefilled_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": stats.accepted_draft_tokens,
            "rejected_prediction_tokens": stats.draft_tokens - stats.accepted_draft_tokens,
        },
    }


class ResponseBuilder:
    """Builds the answer to one request from its `GenerationChunk`s: streamed chunk payloads as they come
    (`add`), then the closing payloads or the whole non-streamed response (`finish`).

    Tool calls never show as markup in content. A call the model chose freely (tool_choice "auto") is sent whole
    once its block closes (a malformed one is kept as the model's text); a call the grammar forces streams its
    arguments in pieces as OpenAI does, and one cut off by max_tokens keeps the arguments it had."""

    def __init__(self, request: APIRequest, served: ServedModel):
        self.request, self.model = request, served
        self.parts = ReplyParts(served, request.tools, chat=request.chat)
        self.content: list[str] = []
        self.calls: list[list[str]] = []  # [name, arguments' JSON text] per call
        self.logprobs: list[dict[str, Any]] = []
        self.text_offsets: list[int] = []  # where each token's text starts in the reply (/v1/completions)
        self.started = False

    def add(self, chunk: GenerationChunk) -> list[dict[str, Any]]:
        """Stream payloads for one chunk (possibly none: text held back as a possible stop or tool markup)."""
        logprob = self._logprob(chunk) if chunk.token is not None and self.request.logprobs is not None else None
        return self._payloads(*self._sorted(self.parts.add(chunk)), logprob)

    def finish(self, last: GenerationChunk) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The closing stream payloads and the complete response, from the last chunk (finish reason, stats)."""
        payloads = self._payloads(*self._sorted(self.parts.finish(last)), None)
        reason = "length" if last.finish_reason == "length" else "tool_calls" if self.calls else "stop"
        stats = last.stats or GenerationStats()
        if self.request.chat:
            final = self._chunk({}, reason)
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
            if self.calls:
                message["tool_calls"] = [{"id": self._call_id(i), "type": "function",
                                          "function": {"name": name, "arguments": arguments}}
                                         for i, (name, arguments) in enumerate(self.calls)]
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

    def _sorted(self, parts: list[str | ToolCall | CallPiece]) -> tuple[str, list[dict[str, Any]]]:
        """A chunk's parts as (content, tool-call deltas)."""
        text = "".join(p for p in parts if isinstance(p, str))
        deltas = []
        for part in parts:
            if isinstance(part, ToolCall):
                self.calls.append([part.name, json.dumps(part.arguments, ensure_ascii=False)])
                deltas.append(self._call_delta(len(self.calls) - 1, part.name, self.calls[-1][1]))
            elif isinstance(part, CallPiece):
                deltas.append(self._piece_delta(part))
        return text, deltas

    def _piece_delta(self, piece: CallPiece) -> dict[str, Any]:
        if piece.name is not None:
            self.calls.append([piece.name, ""])
            return self._call_delta(piece.index, piece.name, "")
        self.calls[piece.index][1] += piece.arguments
        return self._call_delta(piece.index, None, piece.arguments)

    def _call_delta(self, index: int, name: str | None, arguments: str) -> dict[str, Any]:
        """A streamed tool_calls entry: the first for a call has its id, type and name; later ones add arguments."""
        if name is None:
            return {"index": index, "function": {"arguments": arguments}}
        return {"index": index, "id": self._call_id(index), "type": "function",
                "function": {"name": name, "arguments": arguments}}

    def _payloads(self, text: str, calls: list[dict[str, Any]], logprob: dict[str, Any] | None) -> list[dict[str, Any]]:
        payloads = []
        if self.request.chat and not self.started:
            payloads.append(self._chunk({"role": "assistant", "content": ""}, None))
        self.started = True
        self.content.append(text)
        if text or logprob is not None:
            if self.request.chat:
                payload = self._chunk({"content": text}, None)
                if logprob is not None:
                    payload["choices"][0]["logprobs"] = {"content": [logprob]}
            else:
                payload = self._chunk(text, None)
                if logprob is not None:
                    payload["choices"][0]["logprobs"] = self._legacy_logprobs([logprob], [self._next_offset()])
            payloads.append(payload)
        for call in calls:
            payloads.append(self._chunk({"tool_calls": [call]}, None))
        if logprob is not None:
            self.text_offsets.append(self._next_offset())
            self.logprobs.append(logprob)
        return payloads

    def _next_offset(self) -> int:
        return self.text_offsets[-1] + len(self.logprobs[-1]["token"]) if self.logprobs else 0

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
        def entry(token: int, logprob: float | None) -> dict[str, Any]:
            data = self.model.tokenizer.token_bytes[token] if token < len(self.model.tokenizer.token_bytes) else b""
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        assert chunk.token is not None  # `add` asks only for a token's chunk
        return {**entry(chunk.token, chunk.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in chunk.top_logprobs or []]}

    def _legacy_logprobs(self, entries: list[dict[str, Any]] | None = None,
                         offsets: list[int] | None = None) -> dict[str, Any]:
        """/v1/completions' older shape: parallel lists, the alternatives as {token: logprob} with the sampled
        token always among them (so `logprobs: 0` still lists it), and each token's offset in the text."""
        entries = self.logprobs if entries is None else entries
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{**{t["token"]: t["logprob"] for t in e["top_logprobs"]}, e["token"]: e["logprob"]}
                             for e in entries],
            "text_offset": self.text_offsets if offsets is None else offsets,
        }
