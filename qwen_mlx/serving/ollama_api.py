"""The Ollama wire format (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`, ...): requests checked
and turned into `GenerationRequest`s, replies, model listings and errors shaped as Ollama shapes them.

Ollama's field names throughout: `options.num_predict` is max_tokens, `repeat_penalty` the repetition penalty,
durations are nanoseconds, errors are `{"error": "message"}`. `format` ("json" or a JSON schema) is enforced by
the constrained decoder. Options that only tune Ollama's runner (threads, GPU layers, mmap...) change nothing
here and are accepted; options that would change the reply and that qwen-mlx cannot honour are refused by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

import mlx.core as mx

from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
from qwen_mlx.engine.registry import LONGEST_KEEP_ALIVE_S
from qwen_mlx.engine.request import GenerationRequest, is_int
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.serving.protocol import (
    APIError,
    ChatCall,
    ReplyParts,
    ServedModel,
    ToolChoice,
    ToolReading,
    checked_text,
    prepare_chat,
    prepare_prompt,
    render,
)
from qwen_mlx.store.catalog import LocalModel
from qwen_mlx.text.tool_calls import ToolCall

# The Ollama API version these routes follow; clients compare it to enable features.
OLLAMA_VERSION = "0.9.0"
CHAT_FIELDS = {"model", "messages", "tools", "format", "options", "stream", "keep_alive", "think"}
GENERATE_FIELDS = {"model", "prompt", "suffix", "system", "template", "context", "stream", "raw", "format", "options",
                   "keep_alive", "images", "think"}
MESSAGE_FIELDS = {"role", "content", "images", "tool_calls", "tool_name", "thinking"}
ROLES = ("system", "user", "assistant", "tool")
# option -> prepare_request's name
SAMPLING_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "repeat_penalty": "repetition_penalty", "seed": "seed"}
# Runner settings of Ollama's (llama.cpp's): how it runs, not what it answers; nothing to do on MLX.
RUNNER_OPTIONS = {"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "logits_all", "vocab_only", "use_mmap",
                  "use_mlock", "embedding_only", "num_thread", "num_keep", "penalize_newline", "mirostat_tau",
                  "mirostat_eta"}
# Accepted at the value that leaves the reply as it is, since that is all qwen-mlx does.
NEUTRAL_OPTIONS = {"presence_penalty": 0, "frequency_penalty": 0, "typical_p": 1, "tfs_z": 1, "mirostat": 0,
                   "repeat_last_n": -1}
# How /api/ps shows "never unloads" (as Ollama does: a date centuries away); no keep-alive is longer.
FOREVER = timedelta(seconds=LONGEST_KEEP_ALIVE_S)


def error_body(message: str) -> dict[str, Any]:
    return {"error": message}


def now_iso() -> str:
    return iso(time.time())


def iso(seconds: float) -> str:
    """RFC 3339 with a Z, as Go writes times."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def model_name(body: Any) -> str:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, "model is required", "model")
    return name


@dataclass
class OllamaRequest:
    """A checked /api/chat or /api/generate request."""

    chat: bool
    model: str  # the name as the client gave it: Ollama replies with it
    generation: GenerationRequest
    stream: bool = True
    tools: ToolReading = ToolReading()  # the tools offered: the reply's calls to them are parsed
    raw_context: bool = False  # /api/generate: answer with the token ids of the exchange (`context`)
    created: float = field(default_factory=time.time)


def parse_chat(body: dict[str, Any], served: ServedModel) -> OllamaRequest:
    _check_fields(body, CHAT_FIELDS, "/api/chat")
    _check_think(body, served)
    messages = _messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    if not messages:
        raise APIError(400, "messages must hold at least one message (an empty list only loads the model)",
                       "messages")
    call = _call(body, messages, tools)
    return OllamaRequest(True, body["model"], prepare_chat(served, call), stream_wanted(body),
                         tools=ToolReading.of(call.tools, call.choice))


def parse_generate(body: dict[str, Any], served: ServedModel) -> OllamaRequest:
    _check_fields(body, GENERATE_FIELDS, "/api/generate")
    _check_think(body, served)
    for name in ("suffix", "template", "images"):
        if body.get(name):
            what = {"suffix": "fill-in-the-middle (suffix)", "template": "a custom template",
                    "images": "images (the model reads text only)"}[name]
            raise APIError(400, f"{what} is not supported by qwen-mlx", name)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt must be a non-empty string (an empty one only loads the model)", "prompt")
    checked_text("prompt", prompt)
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise APIError(400, "raw must be true or false", "raw")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise APIError(400, "system must be a string", "system")
    if raw:
        ids = served.tokenizer.encode(prompt)
    else:
        messages = ([{"role": "system", "content": checked_text("system", system)}] if system else []) + \
            [{"role": "user", "content": prompt}]
        ids = render(served, messages, None, "prompt")
    context = body.get("context")
    if context is not None:
        if not isinstance(context, list) or not all(is_int(t) for t in context):
            raise APIError(400, "context must be the list of token ids a previous reply returned", "context")
        ids = list(context) + ids
    generation = prepare_prompt(served, ids, _call(body, [], None))
    return OllamaRequest(False, body["model"], generation, stream_wanted(body), raw_context=True)


def is_load_request(body: dict[str, Any], chat: bool) -> bool:
    """Ollama's idiom for "load (or, with keep_alive 0, unload) the model, generate nothing": no prompt/messages."""
    if chat:
        return body.get("messages") in (None, [])
    return body.get("prompt") in (None, "")


def _check_fields(body: dict[str, Any], allowed: set[str], route: str) -> None:
    for name in body:
        if name not in allowed:
            raise APIError(400, f"field '{name}' is not supported by qwen-mlx's {route}", name)


def _check_think(body: dict[str, Any], served: ServedModel) -> None:
    think = body.get("think")
    if think not in (None, False):
        raise APIError(400, f'"{served.id}" does not support thinking', "think")


def stream_wanted(body: dict[str, Any]) -> bool:
    """`stream` as every Ollama route takes it (/api/chat, /api/generate, /api/pull)."""
    stream = body.get("stream", True)  # Ollama streams unless told not to
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    return stream


def _messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise APIError(400, "messages must be a list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a role: one of {', '.join(ROLES)}", "messages")
        unknown = sorted(set(m) - MESSAGE_FIELDS)
        if unknown:
            raise APIError(400, f"messages[{i}]: field '{unknown[0]}' is not supported", "messages")
        if m.get("images"):
            raise APIError(400, f"messages[{i}]: images are not supported; the model reads text only", "messages")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", "messages")
        message: dict[str, Any] = {"role": m["role"], "content": checked_text(f"messages[{i}].content", content)}
        calls = m.get("tool_calls")
        if calls:
            message["tool_calls"] = [_tool_call_in(c, i) for c in calls] if isinstance(calls, list) else \
                _fail(f"messages[{i}].tool_calls must be a list")
        if m.get("tool_name"):
            message["name"] = m["tool_name"]
        out.append(message)
    return out


def _fail(message: str) -> NoReturn:
    raise APIError(400, message, "messages")


def _tool_call_in(call: Any, i: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        _fail(f"messages[{i}].tool_calls entries need function.name")
    arguments = function.get("arguments", {})
    if not isinstance(arguments, dict):
        _fail(f"messages[{i}].tool_calls: arguments must be an object")
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools in (None, []):
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list", "tools")
    for t in tools:
        function = t.get("function") if isinstance(t, dict) else None
        if (not isinstance(function, dict) or t.get("type", "function") != "function"
                or not isinstance(function.get("name"), str)
                or not isinstance(function.get("parameters", {}), dict)):
            raise APIError(400, "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': "
                                "{...}}}", "tools")
    return tools


def _call(body: dict[str, Any], messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> ChatCall:
    """What /api/chat or /api/generate asks, in the library's terms: Ollama always offers the tools it is given."""
    options = _options(body.get("options"))
    num_ctx = options.pop("num_ctx", None)
    predict = options.pop("num_predict", None)
    fmt = body.get("format")
    if fmt == "json":
        options["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        options["json_schema"] = fmt
    elif fmt not in (None, ""):
        raise APIError(400, "format must be \"json\" or a JSON schema object", "format")
    params = {"repetition_penalty": "options.repeat_penalty", "json_schema": "format", "grammar": "format",
              "response_format": "format", "context": "options.num_ctx", "stop": "options.stop"}
    # num_predict -1 (no limit) and -2 (fill the context) both end at the context's end, as for Ollama.
    return ChatCall(messages, tools, ToolChoice("auto" if tools else "none"), options,
                    None if predict is None or predict < 0 else predict, clip_max_tokens=True, context=num_ctx,
                    params=params, param="messages" if messages else "prompt")


def _options(options: Any) -> dict[str, Any]:
    """prepare_request's arguments (and num_ctx, num_predict) from Ollama's options, each checked."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise APIError(400, "options must be an object", "options")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None or name in RUNNER_OPTIONS:
            continue
        if name in SAMPLING_OPTIONS:
            out[SAMPLING_OPTIONS[name]] = value
        elif name in NEUTRAL_OPTIONS:
            if value != NEUTRAL_OPTIONS[name]:
                raise APIError(400, f"options.{name} = {value!r} is not supported by qwen-mlx (only "
                                    f"{NEUTRAL_OPTIONS[name]!r}, which changes nothing)", f"options.{name}")
        elif name in ("num_ctx", "num_predict"):
            if not is_int(value) or (name == "num_ctx" and value < 1) or (name == "num_predict" and value == 0):
                raise APIError(400, f"options.{name} must be {'a positive' if name == 'num_ctx' else 'a nonzero'} "
                                    "integer", f"options.{name}")
            out[name] = value
        elif name == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise APIError(400, "options.stop must be a list of strings", "options.stop")
            out["stop"] = value
        else:
            raise APIError(400, f"options.{name} is not an option qwen-mlx knows", f"options.{name}")
    return out


class OllamaReply:
    """Builds the NDJSON chunks (or the one response) of an /api/chat or /api/generate reply from its
    `GenerationChunk`s. With tools, `<tool_call>` blocks become `message.tool_calls` and never show as content."""

    def __init__(self, request: OllamaRequest, served: ServedModel, load_seconds: float = 0.0):
        self.request = request
        self.parts = ReplyParts(served, request.tools, chat=request.chat)
        self.started = time.perf_counter_ns()
        self.first_token: int | None = None
        self.load_ns = int(load_seconds * 1e9)
        self.content: list[str] = []
        self.calls: list[ToolCall] = []

    def add(self, chunk: GenerationChunk) -> list[dict[str, Any]]:
        if chunk.token is not None and self.first_token is None:
            self.first_token = time.perf_counter_ns()
        return self._payloads(self.parts.add(chunk))

    def finish(self, last: GenerationChunk) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The closing stream lines, and the whole non-streamed response."""
        lines = self._payloads(self.parts.finish(last))
        final = {**self._base(), "done": True, "done_reason": "length" if last.finish_reason == "length" else "stop",
                 **self._durations(last.stats or GenerationStats())}
        if self.request.chat:
            final["message"] = {"role": "assistant", "content": ""}
        else:
            final["response"] = ""
            final["context"] = [*self.request.generation.prompt_ids, *self.parts.tokens]
        whole = dict(final)
        if self.request.chat:
            whole["message"] = self._message("".join(self.content), self.calls)
        else:
            whole["response"] = "".join(self.content)
        return [*lines, final], whole

    def _payloads(self, parts: list[Any]) -> list[dict[str, Any]]:
        """Ollama's lines for a chunk's parts: its text and its (whole) tool calls in one message."""
        text = "".join(p for p in parts if isinstance(p, str))
        calls = [p for p in parts if isinstance(p, ToolCall)]
        self.content.append(text)
        self.calls.extend(calls)
        if not text and not calls:
            return []
        if self.request.chat:
            return [{**self._base(), "message": self._message(text, calls), "done": False}]
        return [{**self._base(), "response": text, "done": False}]

    def _message(self, text: str, calls: list[ToolCall]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return message

    def _base(self) -> dict[str, Any]:
        return {"model": self.request.model, "created_at": now_iso()}

    def _durations(self, stats: GenerationStats) -> dict[str, Any]:
        end = time.perf_counter_ns()
        first = self.first_token or end
        return {"total_duration": end - self.started + self.load_ns, "load_duration": self.load_ns,
                "prompt_eval_count": stats.prefilled_tokens, "prompt_eval_duration": first - self.started,
                "eval_count": stats.generation_tokens, "eval_duration": end - first}


def load_reply(model: str, unloaded: bool, load_seconds: float) -> dict[str, Any]:
    """The answer to a request with no prompt: the model loaded (or unloaded), nothing generated."""
    ns = int(load_seconds * 1e9)
    return {"model": model, "created_at": now_iso(), "response": "", "done": True,
            "done_reason": "unload" if unloaded else "load", "total_duration": ns, "load_duration": ns}


def parameter_count(config: dict[str, Any]) -> int:
    """A Qwen2's parameters, from its config alone (quantized weights pack several into one stored number)."""
    c = ModelConfig.from_dict(config)
    kv = c.num_key_value_heads * c.head_dim
    attention = c.hidden_size * c.hidden_size * 2 + c.hidden_size * kv * 2 + c.hidden_size + 2 * kv
    layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return embeddings + c.num_hidden_layers * layer + c.hidden_size


def details(model: LocalModel) -> dict[str, Any]:
    try:
        count = parameter_count(model.config)
        size = f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"
    except QwenMLXError:
        size = ""
    level = {"4-bit": "Q4", "8-bit": "Q8", "bf16": "BF16", "fp16": "F16", "fp32": "F32"}.get(model.bits, model.bits)
    return {"parent_model": "", "format": "safetensors", "family": "qwen2", "families": ["qwen2"],
            "parameter_size": size, "quantization_level": level}


def tag(model: LocalModel) -> dict[str, Any]:
    """A model as /api/tags lists it."""
    return {"name": model.name, "model": model.name, "modified_at": iso(model.modified), "size": model.size,
            "digest": model.digest, "details": details(model)}


def show(model: LocalModel, template: str, sampling: SamplingParams) -> dict[str, Any]:
    """/api/show: the model's details, its chat template, its default sampling as Modelfile parameters."""
    config = ModelConfig.from_dict(model.config)
    parameters = "\n".join(f"{name} {value}" for name, value in (
        ("temperature", sampling.temperature), ("top_p", sampling.top_p), ("top_k", sampling.top_k),
        ("repeat_penalty", sampling.repetition_penalty)) if value is not None)
    info = {
        "general.architecture": "qwen2", "general.basename": model.name,
        "general.parameter_count": parameter_count(model.config),
        "qwen2.context_length": config.context_length, "qwen2.embedding_length": config.hidden_size,
        "qwen2.block_count": config.num_hidden_layers, "qwen2.feed_forward_length": config.intermediate_size,
        "qwen2.attention.head_count": config.num_attention_heads,
        "qwen2.attention.head_count_kv": config.num_key_value_heads,
        "qwen2.attention.layer_norm_rms_epsilon": config.rms_norm_eps, "qwen2.rope.freq_base": config.rope_theta,
        "qwen2.vocab_size": config.vocab_size,
    }
    modelfile = f"# qwen-mlx: {model.name}\nFROM {model.folder}\n" + "".join(
        f"PARAMETER {line}\n" for line in parameters.splitlines())
    return {"modelfile": modelfile, "parameters": parameters, "template": template, "details": details(model),
            "model_info": info, "capabilities": ["completion", "tools"], "modified_at": iso(model.modified)}


def process(model: LocalModel, size: int, expires_in: float | None, context_length: int) -> dict[str, Any]:
    """A loaded model as /api/ps lists it; on Apple silicon its memory is the GPU's (unified)."""
    # A registry built with a longer keep-alive than a request may give still shows a date, not an OverflowError.
    span = FOREVER if expires_in is None else timedelta(seconds=min(expires_in, LONGEST_KEEP_ALIVE_S))
    expires = datetime.now(timezone.utc) + span
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    return {"name": model.name, "model": model.name, "size": size, "digest": model.digest,
            "details": details(model), "expires_at": expires.isoformat().replace("+00:00", "Z"),
            "size_vram": size if on_gpu else 0, "context_length": context_length}
