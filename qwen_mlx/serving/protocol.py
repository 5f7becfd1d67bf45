"""What the three wire formats share: the model behind a request, the error every API shapes its own way, one path
from a chat request to a `GenerationRequest`, and one reading of a reply's chunks as text and tool calls.

Each API module (openai_api, ollama_api, anthropic_api) only translates: its JSON into a `ChatCall`, and the parts
`ReplyParts` yields back into its JSON. Everything a chat request means beyond its wire format lives here once:
resent replies matched to the ids they were generated as, tool_choice as a grammar, the chat template, the
context check, and the library's own checks with their fields renamed to the API's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.nn as nn

from qwen_mlx.engine.generate import GenerationChunk
from qwen_mlx.engine.prefix_cache import ReplyMemory
from qwen_mlx.engine.request import MAX_TOKENS_LIMIT, GenerationRequest, check_text, prepare_request
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.text.grammar import tool_call_grammar
from qwen_mlx.text.tokenizer import Tokenizer
from qwen_mlx.text.tool_calls import (
    TOOL_CALL_CLOSE,
    CallPiece,
    ToolArgumentsStream,
    ToolCall,
    ToolCallStream,
    tool_names,
)


class APIError(Exception):
    """An error answered with an HTTP status; each API shapes the body its own way (see `serving/app.py`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        """OpenAI's shape, the default one."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServedModel:
    """The model behind the endpoints, as request checking sees it."""

    id: str
    model: nn.Module
    tokenizer: Tokenizer
    options: dict[str, Any] = field(default_factory=dict)  # the server's own (a draft model, prompt lookup)
    replies: ReplyMemory | None = None  # the ids recent replies were generated as (prompts match their cache)

    @property
    def context_length(self) -> int:
        return int(self.model.config.context_length)


def known_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    """The body's fields with nulls dropped (null means absent, as for OpenAI); a field this server does not know
    is a 400 naming it, never silently ignored (OpenAI's wording, which its clients show as is)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise APIError(400, f"parameter '{name}' is not supported by this server", name, "unsupported_parameter")
    return {k: v for k, v in body.items() if v is not None}


def checked_text(field_name: str, text: str, what: str | None = None) -> str:
    """`text` as a request gave it in `field_name` (`what`: where in it, for the message), once
    `request.check_text` has passed it (else a 400)."""
    try:
        check_text(what or field_name, text, field_name)
    except QwenMLXError as e:
        raise APIError(400, str(e), field_name) from None
    return text


@dataclass(frozen=True)
class ToolChoice:
    """tool_choice in every API's terms: "auto" (the model decides), "none", or "required" (a call and nothing
    else; `named`: that function's), and whether several calls may follow one another."""

    mode: Literal["auto", "none", "required"] = "auto"
    named: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode == "required"


@dataclass(frozen=True)
class ToolReading:
    """How a reply's tool calls are read, as the request's tools and tool_choice say: parsed at all (`parse`),
    forced by the grammar (`forced`), the names a reply written as bare JSON may call, several calls or one."""

    parse: bool = False
    forced: bool = False
    names: tuple[str, ...] = ()
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[dict[str, Any]] | None, choice: ToolChoice) -> ToolReading:
        return cls(choice.mode != "none" and bool(tools), choice.forced, tool_names(tools), choice.parallel)


@dataclass
class ChatCall:
    """One chat request in the library's terms, whatever API it came through.

    `messages` are as Qwen's chat template reads them (OpenAI's shape, tool-call arguments as objects).
    `max_tokens` None means "as many as the context leaves"; with `clip_max_tokens` a larger one is a ceiling
    (Anthropic's, Ollama's num_predict), without it a 400 (OpenAI's). `context` narrows the model's context
    (Ollama's num_ctx). `params` renames the library's fields to the API's parameters in errors (and "context"
    names the field that narrows it); `param` names the field that holds the prompt.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    choice: ToolChoice = ToolChoice("none")
    options: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    clip_max_tokens: bool = False
    context: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    param: str = "messages"


def prepare_chat(served: ServedModel, call: ChatCall) -> GenerationRequest:
    """The checked `GenerationRequest` for a chat call: the one path all three APIs take."""
    messages = with_reply_ids(call.messages, served.replies)
    ids = render(served, messages, call.tools if call.choice.mode != "none" else None, call.param)
    return prepare_prompt(served, ids, call)


def prepare_prompt(served: ServedModel, ids: list[int], call: ChatCall) -> GenerationRequest:
    """The checked `GenerationRequest` for prompt ids already encoded (a completion, Ollama's raw generate)."""
    options = {**call.options, **tool_choice_options(served, call)}
    response_format = next((k for k in ("json_schema", "response_format") if k in call.options), None)
    if call.choice.forced and response_format is not None:
        name = call.params.get(response_format, response_format)
        raise APIError(400, f"{name} cannot be combined with a required tool_choice", name)
    options["max_tokens"] = fit_context(len(ids), call, served.context_length)
    return prepared(served, ids, options, call.params)


def tool_choice_options(served: ServedModel, call: ChatCall) -> dict[str, Any]:
    """The generation options tool_choice means: a grammar that allows only calls when one is required, a stop
    after the first call when only one is allowed."""
    choice = call.choice
    if choice.mode != "none" and not call.tools:
        raise APIError(400, "tool_choice needs tools", call.params.get("grammar", "tool_choice"))
    if choice.forced:
        try:
            # A named function is called once (as vLLM does): a weak model could otherwise repeat it to max_tokens.
            grammar = tool_call_grammar(served.tokenizer, call.tools or [], choice.named,
                                        choice.parallel and choice.named is None)
        except QwenMLXError as e:
            raise APIError(400, str(e), call.params.get("grammar", "tool_choice")) from None
        return {"grammar": grammar}
    if choice.mode == "auto" and not choice.parallel:
        # At most one call: stop where the first one closes (the tool-call parser takes an unclosed last block).
        return {"stop": [*call.options.get("stop", []), TOOL_CALL_CLOSE]}
    return {}


def with_reply_ids(messages: list[dict[str, Any]], replies: ReplyMemory | None) -> list[dict[str, Any]]:
    """The messages with each reply this server generated carrying the ids it was generated as: every API's
    clients resend the conversation as text, which need not tokenize back to those ids, and the cached turns
    match only the ids."""
    if replies is None:
        return messages
    out = []
    for message in messages:
        generated = replies.ids_for(message["content"]) if message["role"] == "assistant" else None
        out.append({**message, "token_ids": generated} if generated else message)
    return out


def render(served: ServedModel, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
           param: str = "messages") -> list[int]:
    """The prompt's ids through the model's own chat template; a template that refuses the messages (its
    `raise_exception`, a bad role order) is the request's mistake."""
    try:
        return served.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                    tokenize=True)
    except QwenMLXError as e:
        raise APIError(400, str(e), param) from None
    except Exception as e:  # the model's own Jinja template, which may raise anything
        raise APIError(400, f"the chat template cannot render these messages: {e}", param) from None


def fit_context(n: int, call: ChatCall, model_context: int) -> int:
    """max_tokens once the prompt is known to leave room to answer, refused before any compute otherwise. The
    wording is OpenAI's, which clients (litellm, langchain) map to their context-window errors."""
    context, max_tokens = call.context, call.max_tokens
    limit = min(model_context, context) if context else model_context
    hint = f" (or raise {call.params['context']})" if context and "context" in call.params else ""
    if n >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your messages "
                            f"resulted in {n} tokens. Please reduce the length of the messages{hint}.",
                       call.param, "context_length_exceeded")
    room = min(MAX_TOKENS_LIMIT, limit - n)
    if max_tokens is None:
        return room
    if not call.clip_max_tokens and n + max_tokens > limit:
        name = call.params.get("max_tokens", "max_tokens")
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{n + max_tokens} tokens ({n} in the messages, {max_tokens} in the completion). "
                            f"Please reduce the length of the messages or completion ({name}).",
                       name, "context_length_exceeded")
    return min(max_tokens, room)


def prepared(served: ServedModel, ids: list[int], options: dict[str, Any],
             params: dict[str, str]) -> GenerationRequest:
    """The library's checked request; its errors name the API's parameter (`params` maps the library's names),
    in the message too where the library's wording does not."""
    try:
        return prepare_request(served.model, served.tokenizer, ids, **{**served.options, **options})
    except QwenMLXError as e:
        name = params.get(e.field or "", e.field)
        message = str(e) if name is None or name in str(e) else f"{name}: {e}"
        raise APIError(400, message, name) from None


Part = str | ToolCall | CallPiece


class ReplyParts:
    """One reply's chunks as the parts every API shapes: text; tool calls the model chose freely (whole, once
    their block closes; a malformed block stays text); and calls the grammar forced (a `CallPiece` with the name,
    then pieces of the arguments). Tool markup never shows as text, not even in part while streaming.

    With the tools' names, a reply that is only a call written as JSON (bare or fenced) naming one of them is a call
    too, whole at the end; with `parallel` False a JSON list of calls counts only when it holds one, as the
    markup's stop after the first call allows only one (see `text/tool_calls.py`).

    At the end, a chat reply that made no call is remembered with the ids it was generated as, so the client's
    next turn, which resends it as text, matches the cached prefix (the same for every API).
    """

    def __init__(self, served: ServedModel, tools: ToolReading, chat: bool = True):
        self.served, self.chat = served, chat
        self.forced = ToolArgumentsStream() if tools.forced else None
        self.tools = ToolCallStream(tools.names, tools.parallel) if tools.parse and not tools.forced else None
        self.tokens: list[int] = []  # the reply's ids
        self.text: list[str] = []
        self.made_call = False

    def add(self, chunk: GenerationChunk) -> list[Part]:
        if chunk.token is not None:
            self.tokens.append(chunk.token)
        return self._split(chunk.text)

    def finish(self, last: GenerationChunk) -> list[Part]:
        parts = self._split(last.text)
        if self.tools is not None:
            parts += self._seen(self.tools.finish())
        if self.chat and not self.made_call and self.served.replies is not None:
            self.served.replies.remember("".join(self.text), self.tokens)
        return parts

    def _split(self, text: str) -> list[Part]:
        if not text:
            return []
        if self.forced is not None:
            return self._seen(list(self.forced.feed(text)))
        if self.tools is not None:
            return self._seen(self.tools.feed(text))
        return self._seen([text])

    def _seen(self, parts: list[Any]) -> list[Part]:
        for part in parts:
            if isinstance(part, str):
                self.text.append(part)
            else:
                self.made_call = True
        return parts
