"""Constrained decoding from Python: `generate(json_schema=...)`, `response_format=`, tool-call grammars."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import pytest

from qwen_mlx import QwenMLXError, generate, load
from qwen_mlx.text.grammar import check_grammar, json_schema_grammar, ll_tokenizer, tool_call_grammar

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


@pytest.mark.parametrize("parallel", [True, False])
def test_a_required_call_may_end_after_the_call_and_after_its_newline(model: tuple[Any, Any],
                                                                        parallel: bool) -> None:
    """Qwen2.5-Coder-0.5B puts P("\\n") = 0.9996 right after `</tool_call>` and then wants to end: a grammar that
    allowed only another call after that newline made it call get_weather for city after city to max_tokens."""
    _, tokenizer = model
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    marker = tokenizer.added_tokens
    call = [marker["<tool_call>"], *tokenizer.encode('\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'),
            marker["</tool_call>"]]
    newline, end = tokenizer.encode("\n"), tokenizer.eos_token_ids[0]
    matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, 151936),
                                   tool_call_grammar(tokenizer, [tool], parallel=parallel), log_level=0)

    def accepted(reply: list[int]) -> bool:
        return matcher.validate_tokens(reply) == len(reply)

    assert accepted(call + [end]) and accepted(call + newline + [end])
    assert accepted(call + newline + call + [end]) == parallel  # another call only where several are allowed
    assert not accepted(call + newline + newline)  # one newline, not a way to pad until max_tokens
