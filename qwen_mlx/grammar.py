"""Constrained decoding: a JSON schema or a tool-call format as a grammar, enforced as a mask on each step's logits.

The grammar engine is llguidance: it builds its token trie straight from our `tokenizer.json`, computes the mask
of a 152k vocabulary in about a millisecond, and compiles JSON schemas and Lark grammars (which the tool-call
envelope needs). The mask for step n+1 is computed on the host while the model computes step n+1's logits.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import llguidance
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from qwen_mlx.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.tokenizer import Tokenizer

# JSON as Qwen writes it (and as json.dumps does): one space after ':' and ','; no other whitespace, so a
# model cannot pad its way past max_tokens. A schema's own "x-guidance" options still override these.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_ll_tokenizers: weakref.WeakKeyDictionary[Tokenizer, dict[int, llguidance.LLTokenizer]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """A grammar for one JSON value that validates against `schema` (None: any JSON object)."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise QwenMLXError(f"a JSON schema must be an object, not {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except ValueError as e:
        raise QwenMLXError(f"invalid JSON schema: {e}") from None


def tool_call_grammar(
    tokenizer: Tokenizer, tools: list[dict[str, Any]], name: str | None = None, parallel: bool = True
) -> str:
    """A grammar for one or more Qwen2.5 tool calls and nothing else: `<tool_call>\\n{"name": ..., "arguments":
    {...}}\\n</tool_call>`, the arguments valid against the function's `parameters` schema.

    `name` restricts the calls to that function (OpenAI's named `tool_choice`); otherwise any of `tools`.
    `parallel=False` allows exactly one call.
    """
    functions = [t["function"] for t in tools if t.get("type") == "function" and "function" in t]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise QwenMLXError(f"tool_choice names function {name!r}, which is not in tools")
    if not functions:
        raise QwenMLXError("tool calls were required but no function tools were given")
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "x-guidance": JSON_STYLE,
        }
        for f in functions
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls, "x-guidance": JSON_STYLE}
    open_, close = (_marker(tokenizer, m) for m in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE))
    repeat = ' ("\\n" call)*' if parallel else ""
    lark = f'start: call{repeat}\ncall: {open_} "\\n" %json {json.dumps(schema)} "\\n" {close}\n'
    return llguidance.LLMatcher.grammar_from_lark(lark)


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
        raise QwenMLXError(f"cannot use this schema or grammar: {messages[0]}")


class TokenConstraint:
    """The tokens a grammar allows next, tracked as the reply grows; end-of-turn is allowed once it is complete."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, grammar: str):
        self.vocab_size = vocab_size
        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self.matcher.is_error():
            raise QwenMLXError(f"cannot use this schema or grammar: {self.matcher.get_error()}")
        self._bitmask = allocate_token_bitmask(1, vocab_size)

    def mask(self) -> mx.array:
        """Which tokens may come next, as a boolean (vocab_size,) array."""
        fill_next_token_bitmask(self.matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self.vocab_size]
        return mx.array(bits.astype(np.bool_))

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise QwenMLXError(f"the grammar rejected token {token}: {self.matcher.get_error()}")

    def apply(self, logits: mx.array) -> mx.array:
        return mx.where(self.mask(), logits, -mx.inf)
