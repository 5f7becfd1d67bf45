"""Constrained decoding: a JSON schema or a tool-call format as a grammar, enforced as a mask on each step's logits.

The grammar engine is llguidance: it builds its token trie straight from our `tokenizer.json`, computes the mask
of a 152k vocabulary in about a millisecond, and compiles JSON schemas and Lark grammars (which the tool-call
envelope needs). The mask for step n+1 is computed on the host while the model computes step n+1's logits.
`GrammarMask` is the logits processor that applies it.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.text.tokenizer import Tokenizer
from qwen_mlx.text.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of the stub only: llguidance exports no such name

# JSON as Qwen writes it (and as json.dumps does): one space after ':' and ','; no other whitespace, so a
# model cannot pad its way past max_tokens. A schema's own "x-guidance" options still override these.
JSON_STYLE: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_ll_tokenizers: weakref.WeakKeyDictionary[Tokenizer, dict[int, llguidance.LLTokenizer]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def json_schema_grammar(schema: dict[str, Any] | None, field: str = "json_schema") -> str:
    """A grammar for one JSON value that validates against `schema` (None: any JSON object)."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise QwenMLXError(f"a JSON schema must be an object, not {type(schema).__name__}", field)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except ValueError as e:
        raise QwenMLXError(f"invalid JSON schema: {e}", field) from None


def output_grammar(
    json_schema: dict[str, Any] | None, response_format: dict[str, Any] | None, grammar: str | None
) -> str | None:
    """The one grammar that `json_schema`, an OpenAI `response_format` or an explicit `grammar` asks for.

    `response_format` is OpenAI's `{"type": "text" | "json_object" | "json_schema", ...}`; a `json_object` with a
    `schema` (llama.cpp's form) is held to that schema.
    """
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise QwenMLXError("response_format must be an object like {'type': 'json_object'}", "response_format")
        kind = response_format.get("type")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise QwenMLXError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': "
                                   "{...}}}", "response_format")
            json_schema = spec.get("schema", {})
        elif kind == "json_object":
            json_schema = response_format.get("schema", {"type": "object"})
            if not isinstance(json_schema, dict):
                raise QwenMLXError("response_format json_object's schema must be an object", "response_format")
        elif kind != "text":
            raise QwenMLXError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
                               "'json_schema'", "response_format")
        field = "response_format"
    else:
        field = "json_schema"
    if json_schema is not None and grammar is not None:
        raise QwenMLXError("give only one of json_schema / response_format and grammar", "grammar")
    if grammar is not None and not isinstance(grammar, str):
        raise QwenMLXError("grammar must be an llguidance grammar string", "grammar")
    return json_schema_grammar(json_schema, field) if json_schema is not None else grammar


def tool_call_grammar(
    tokenizer: Tokenizer, tools: list[dict[str, Any]], name: str | None = None, parallel: bool = True
) -> str:
    """A grammar for one or more Qwen2.5 tool calls and nothing else: `<tool_call>\\n{"name": ..., "arguments":
    {...}}\\n</tool_call>`, the arguments valid against the function's `parameters` schema.

    `name` restricts the calls to that function (OpenAI's named `tool_choice`); otherwise any of `tools`.
    `parallel=False` allows exactly one call. The reply may end after any call, and after the newline that
    follows one too: Qwen models put that newline after `</tool_call>` with near certainty before they end, and a
    grammar that let only another call follow it made them call again and again until max_tokens.
    """
    functions = [t["function"] for t in tools if t.get("type") == "function" and "function" in t]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise QwenMLXError(f"tool_choice names function {name!r}, which is not in tools")
    if not functions:
        raise QwenMLXError("tool calls were required but no function tools were given")
    definitions: dict[str, Any] = {}
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]},
                           "arguments": hoist_definitions(f.get("parameters") or {"type": "object"}, f"f{i}_",
                                                          definitions)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "x-guidance": JSON_STYLE,
        }
        for i, f in enumerate(functions)
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls, "x-guidance": JSON_STYLE}
    if definitions:
        schema = {**schema, "$defs": definitions}
    open_, close = (_marker(tokenizer, m) for m in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE))
    repeat = ' ("\\n" call)*' if parallel else ""
    lark = f'start: call{repeat} "\\n"?\ncall: {open_} "\\n" %json {json.dumps(schema)} "\\n" {close}\n'
    return llguidance.LLMatcher.grammar_from_lark(lark)


def hoist_definitions(parameters: dict[str, Any], prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """`parameters` ready to sit under `properties.arguments` of a larger schema: its `$defs` / `definitions` move
    into `definitions` (the larger schema's `$defs`), renamed with `prefix`, and every `$ref` into them (or to the
    parameters' own root, "#") is rewritten, so the pointers pydantic writes for nested models still resolve."""
    parameters = dict(parameters)
    local = {**parameters.pop("definitions", {}), **parameters.pop("$defs", {})}
    root = f"{prefix}parameters"

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            out = {k: rewrite(v) for k, v in value.items()}
            ref = out.get("$ref")
            if isinstance(ref, str):
                if ref == "#":
                    out["$ref"] = f"#/$defs/{root}"
                for head in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(head):
                        out["$ref"] = f"#/$defs/{prefix}{ref[len(head):]}"
            return out
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    definitions.update({f"{prefix}{name}": rewrite(schema) for name, schema in local.items()})
    parameters = rewrite(parameters)
    if '"$ref": "#/$defs/' + root + '"' in json.dumps(parameters) + json.dumps(definitions):
        definitions[root] = parameters
    return parameters


def _marker(tokenizer: Tokenizer, text: str) -> str:
    """A Lark term for a tool-call marker: Qwen2.5 has one added token for each, which the model emits (and which
    llguidance sees as a token, not as the marker's characters); other tokenizers spell it out."""
    token = tokenizer.added_tokens.get(text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer, over the model's (padded) vocabulary; built once (about 1 s)."""
    with _lock:
        by_size = _ll_tokenizers.setdefault(tokenizer, {})
        if vocab_size not in by_size:
            by_size[vocab_size] = llguidance.LLTokenizer(
                tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_token_ids
            )
        return by_size[vocab_size]


def check_grammar(tokenizer: Tokenizer, vocab_size: int, grammar: str) -> None:
    """Raise a one-line QwenMLXError if `grammar` does not compile (before any model work is queued)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, ll_tokenizer(tokenizer, vocab_size)
    )
    if is_error:
        raise QwenMLXError(f"cannot use this schema or grammar: {messages[0]}", "grammar")


class GrammarMask:
    """A logits processor (see `sample`) that masks every token the grammar rules out next; end-of-turn is allowed
    once the grammar is complete. Its parse follows `tokens` from the first call on (the reply), rolling back the
    draft ids speculative decoding rejected."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, grammar: str):
        self.vocab_size = vocab_size
        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self.matcher.is_error():
            raise QwenMLXError(f"cannot use this schema or grammar: {self.matcher.get_error()}", "grammar")
        self._bitmask = allocate_token_bitmask(1, vocab_size)
        self._start: int | None = None  # where the reply starts in `tokens`
        self._consumed = 0  # reply ids the matcher has taken

    def __call__(self, tokens: Sequence[int], logits: mx.array) -> mx.array:
        # Start the model on this step, and compute the grammar's mask on the host meanwhile.
        mx.async_eval(logits)
        self._follow(tokens)
        return mx.where(self.mask(), logits, -mx.inf)

    def allowed_draft(self, tokens: Sequence[int], draft: Sequence[int]) -> int:
        """How many leading ids of `draft` the grammar accepts after `tokens` (nothing is consumed)."""
        self._follow(tokens)
        return self.matcher.validate_tokens(list(draft))

    def _follow(self, tokens: Sequence[int]) -> None:
        if self._start is None:
            self._start = len(tokens)
        reply = tokens[self._start :]
        keep = max(0, min(self._consumed, len(reply) - 1))
        if keep < self._consumed:
            self.matcher.rollback(self._consumed - keep)
        for token in reply[keep:]:
            if not self.matcher.consume_token(token):
                raise QwenMLXError(f"the grammar rejected token {token}: {self.matcher.get_error()}", "grammar")
        self._consumed = len(reply)

    def mask(self) -> mx.array:
        """Which tokens may come next, as a boolean (vocab_size,) array."""
        fill_next_token_bitmask(self.matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self.vocab_size]
        return mx.array(bits.astype(np.bool_))
