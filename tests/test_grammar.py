"""Constrained decoding from Python: `generate(json_schema=...)`, `response_format=`, tool-call grammars."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from qwen_mlx import QwenMLXError, generate, load
from qwen_mlx.text.grammar import check_grammar, json_schema_grammar, tool_call_grammar

CONFIG = {"vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048}
ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "label": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["a", "b"]},
        "dims": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
    },
    "required": ["id", "label", "kind", "dims"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "An item as JSON, please."}]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Callable[..., Path]) -> tuple[Any, Any]:
    """A random one-layer Qwen2 with Qwen2.5's real tokenizer, its vocabulary padded as Qwen2.5-0.5B's is."""
    return load(tiny_model_dir("grammar", **CONFIG))


def test_json_schema_reply_validates_for_every_seed(model: tuple[Any, Any]) -> None:
    for seed in range(8):
        result = generate(*model, MESSAGES, json_schema=ITEM, temperature=1.0, seed=seed, max_tokens=200)
        assert result.finish_reason == "stop"
        jsonschema.validate(json.loads(result.text), ITEM)
        assert result.tokens[-1] < 151665  # never a padding id past the tokenizer's vocabulary


def test_response_format_is_the_same_constraint(model: tuple[Any, Any]) -> None:
    by_schema = generate(*model, MESSAGES, json_schema=ITEM, temperature=1.0, seed=4, max_tokens=200)
    by_format = generate(*model, MESSAGES, temperature=1.0, seed=4, max_tokens=200,
                         response_format={"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM}})
    assert by_format.text == by_schema.text


def test_tool_call_grammar_yields_a_parsed_call(model: tuple[Any, Any]) -> None:
    _, tokenizer = model
    tool = {"type": "function", "function": {"name": "lookup", "parameters": ITEM}}
    result = generate(*model, MESSAGES, tools=[tool], grammar=tool_call_grammar(tokenizer, [tool], parallel=False),
                      temperature=1.0, seed=0, max_tokens=200)
    [call] = result.tool_calls
    assert call.name == "lookup" and result.tool_call_errors == []
    jsonschema.validate(call.arguments, ITEM)


def test_logprobs_exclude_what_the_grammar_rules_out(model: tuple[Any, Any]) -> None:
    from qwen_mlx import stream_generate

    model_, tokenizer = model
    chunks = [c for c in stream_generate(model_, tokenizer, MESSAGES, json_schema={"enum": ["yes", "no"]},
                                         temperature=0, logprobs=5) if c.token is not None]
    first = chunks[0]
    assert tokenizer.decode([first.token]).startswith('"')
    assert all(tokenizer.decode([t]).startswith('"') for t, _ in first.top_logprobs)
    assert first.logprob == pytest.approx(first.top_logprobs[0][1])


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "nowhere"),
    ({"json_schema": {"type": "bogus"}}, "bogus"),
    ({"response_format": {"type": "yaml"}}, "yaml"),
    ({"json_schema": ITEM, "grammar": "start: /x/"}, "only one"),
])
def test_bad_constraints_are_one_line_errors(model: tuple[Any, Any], kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(QwenMLXError, match=needle) as error:
        generate(*model, MESSAGES, max_tokens=2, **kwargs)
    assert "\n" not in str(error.value).strip()


def test_tool_call_grammar_checks_the_named_function(model: tuple[Any, Any]) -> None:
    _, tokenizer = model
    tool = {"type": "function", "function": {"name": "lookup", "parameters": ITEM}}
    with pytest.raises(QwenMLXError, match="'nope'"):
        tool_call_grammar(tokenizer, [tool], "nope")
    check_grammar(tokenizer, 151936, tool_call_grammar(tokenizer, [tool], "lookup"))
    check_grammar(tokenizer, 151936, json_schema_grammar(None))
