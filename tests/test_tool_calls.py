"""`parse_tool_calls`: Qwen2.5's `<tool_call>{json}</tool_call>` blocks become calls; bad blocks become errors. A
reply that is only a call written as JSON, bare or fenced, naming a given tool, is a call too."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qwen_mlx.engine.generate import GenerationChunk, GenerationStats, collect
from qwen_mlx.text.tool_calls import ToolCall, ToolCallParse, ToolCallStream, parse_tool_calls


def _block(call: dict, inner_padding: str = "\n") -> str:
    """A call as Qwen2.5's chat template writes it (and the model therefore emits it)."""
    return f"<tool_call>{inner_padding}{json.dumps(call, ensure_ascii=False)}{inner_padding}</tool_call>"


def test_well_formed_call_is_parsed() -> None:
    call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    result = parse_tool_calls(_block(call))
    assert result == ToolCallParse(calls=[ToolCall(call["name"], call["arguments"])], content="", errors=[])


def test_several_calls_are_returned_in_order() -> None:
    calls = [
        {"name": "get_weather", "arguments": {"city": "東京"}},
        {"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}},
        {"name": "get_weather", "arguments": {"city": "Zürich", "nested": {"list": [1, 2, {"x": None}]}}},
    ]
    result = parse_tool_calls("\n".join(_block(c) for c in calls))
    assert [(c.name, c.arguments) for c in result.calls] == [(c["name"], c["arguments"]) for c in calls]
    assert result.errors == []


def test_whitespace_around_the_json_is_tolerated() -> None:
    call = {"name": "search", "arguments": {"query": "  keep inner spaces  "}}
    for padding in ("", " ", "\n\n", "\t \n  ", "\r\n"):
        result = parse_tool_calls(_block(call, padding))
        assert [(c.name, c.arguments) for c in result.calls] == [(call["name"], call["arguments"])]
        assert result.errors == []
    pretty = f"<tool_call>\n{json.dumps(call, indent=4)}\n</tool_call>"
    assert parse_tool_calls(pretty).calls == [ToolCall(call["name"], call["arguments"])]


def test_malformed_json_is_reported_in_errors_not_raised() -> None:
    good = {"name": "get_time", "arguments": {"tz": "UTC"}}
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>\n' + _block(good)
    result = parse_tool_calls(text)
    assert result.calls == [ToolCall(good["name"], good["arguments"])]
    assert len(result.errors) == 1
    assert "not valid JSON" in result.errors[0] and "get_weather" in result.errors[0]


def test_missing_or_non_string_name_is_an_error() -> None:
    for body in ({"arguments": {"city": "Paris"}}, {"name": 42, "arguments": {}}, ["get_weather", {}]):
        result = parse_tool_calls(_block(body))
        assert result.calls == []
        assert len(result.errors) == 1 and "name" in result.errors[0]


def test_arguments_that_are_not_an_object_are_an_error() -> None:
    result = parse_tool_calls(_block({"name": "f", "arguments": [1, 2]}))
    assert result.calls == [] and len(result.errors) == 1


def test_arguments_given_as_a_json_string_are_decoded() -> None:
    arguments = {"city": "Paris"}
    result = parse_tool_calls(_block({"name": "get_weather", "arguments": json.dumps(arguments)}))
    assert result.calls == [ToolCall("get_weather", arguments)]


def test_call_without_arguments_gets_empty_arguments() -> None:
    assert parse_tool_calls(_block({"name": "now"})).calls == [ToolCall("now", {})]


def test_text_around_calls_is_kept_as_content() -> None:
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    before, after = "Let me check the weather for you.", "I'll report back shortly."
    result = parse_tool_calls(f"{before}\n{_block(call)}\n{after}")
    assert result.calls == [ToolCall(call["name"], call["arguments"])]
    assert before in result.content and after in result.content
    assert "tool_call" not in result.content and "get_weather" not in result.content


def test_text_without_calls_is_all_content() -> None:
    text = "Paris is sunny today, 18 °C. No tool needed."
    assert parse_tool_calls(text) == ToolCallParse(calls=[], content=text, errors=[])


def test_unterminated_last_call_with_complete_json_is_parsed() -> None:
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    result = parse_tool_calls(f"Checking.\n<tool_call>\n{json.dumps(call)}\n")
    assert result.calls == [ToolCall(call["name"], call["arguments"])]
    assert result.content == "Checking."


def test_unterminated_call_cut_mid_json_is_an_error() -> None:
    result = parse_tool_calls('<tool_call>\n{"name": "get_weather", "argu')
    assert result.calls == [] and len(result.errors) == 1


def _stream(text: str, step: int) -> tuple[list[str], list[ToolCall], list[str]]:
    """Feed `text` `step` characters at a time, as a streamed reply arrives; the content pieces, calls, errors."""
    stream = ToolCallStream()
    parts = [p for i in range(0, len(text), step) for p in stream.feed(text[i : i + step])] + stream.finish()
    return [p for p in parts if isinstance(p, str)], [p for p in parts if isinstance(p, ToolCall)], stream.errors


def test_streamed_markup_never_reaches_content_at_any_split() -> None:
    calls = [{"name": "get_weather", "arguments": {"city": "Zürich"}}, {"name": "get_time", "arguments": {}}]
    text = "Let me look.\n" + "\n".join(_block(c) for c in calls) + "\n"
    for step in (1, 2, 3, 5, 11, len(text)):
        content, got, errors = _stream(text, step)
        assert "".join(content) == "Let me look."
        assert not any("<" in piece or "tool" in piece for piece in content)
        assert [(c.name, c.arguments) for c in got] == [(c["name"], c["arguments"]) for c in calls]
        assert errors == []


def test_streamed_text_that_only_looks_like_markup_is_content() -> None:
    text = "if a <b and b < tool then <tool_> holds\n  "
    for step in (1, 4, len(text)):
        content, calls, _ = _stream(text, step)
        assert "".join(content) == text and calls == []


def test_streamed_malformed_call_is_released_as_text() -> None:
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    for step in (1, 7):
        content, calls, errors = _stream(bad, step)
        assert "".join(content) == bad and calls == [] and len(errors) == 1


# Calls as small Qwen2.5 (Coder) models write them when they do not use the markup: the whole reply is JSON.
TOOLS = ("get_weather", "get_time")
WEATHER = {"name": "get_weather", "arguments": {"city": "Paris"}}
JSON_CALLS = {
    "bare": json.dumps(WEATHER),
    "fenced as json": f"```json\n{json.dumps(WEATHER)}\n```",
    "fenced, pretty, whitespace around": f"\n  ```\n{json.dumps(WEATHER, indent=2)}\n```\n\n",
    "arguments as a JSON string": json.dumps({"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}),
    "parameters instead of arguments": json.dumps({"name": "get_weather", "parameters": {"city": "Paris"}}),
    "arguments first": json.dumps({"arguments": {"city": "Paris"}, "name": "get_weather"}),
    "a list of one": f"```json\n[{json.dumps(WEATHER)}]\n```",
}
NOT_JSON_CALLS = {
    "no given tool named": json.dumps({"name": "get_stock", "arguments": {"ticker": "X"}}),
    "text before": f"Here you go: {json.dumps(WEATHER)}",
    "text after": f"```json\n{json.dumps(WEATHER)}\n```\nThis gets the weather.",
    "other JSON in a code block": '```json\n{"city": "Paris", "sky": "clear"}\n```',
    "a name among other keys": json.dumps({"name": "get_weather", "arguments": {}, "reason": "asked"}),
    "a code block of code": "```python\nget_weather(city='Paris')\n```",
    "a list of numbers": "[1, 2, 3]",
    "inline code": "`get_weather` tells the weather.",
}


def _stream_with(text: str, step: int, **options: Any) -> tuple[list[str], list[ToolCall], list[str]]:
    stream = ToolCallStream(TOOLS, **options)
    parts = [p for i in range(0, len(text), step) for p in stream.feed(text[i : i + step])] + stream.finish()
    return [p for p in parts if isinstance(p, str)], [p for p in parts if isinstance(p, ToolCall)], stream.errors


@pytest.mark.parametrize("form", sorted(JSON_CALLS))
def test_a_reply_that_is_only_a_json_call_naming_a_tool_is_a_call(form: str) -> None:
    assert parse_tool_calls(JSON_CALLS[form], TOOLS) == ToolCallParse(calls=[ToolCall("get_weather",
                                                                                       {"city": "Paris"})])
    # Without the tools' names nothing tells a call from a JSON answer: it stays text.
    assert parse_tool_calls(JSON_CALLS[form]).calls == []


def test_a_json_list_of_calls_is_several_calls() -> None:
    text = json.dumps([WEATHER, {"name": "get_time", "arguments": {"tz": "UTC"}}])
    assert parse_tool_calls(text, TOOLS).calls == [ToolCall("get_weather", {"city": "Paris"}),
                                                   ToolCall("get_time", {"tz": "UTC"})]


@pytest.mark.parametrize("form", sorted(NOT_JSON_CALLS))
def test_json_that_is_not_only_a_call_to_a_given_tool_stays_text(form: str) -> None:
    text = NOT_JSON_CALLS[form]
    result = parse_tool_calls(text, TOOLS)
    assert result.calls == [] and result.content == text.strip()
    for step in (1, 3, len(text)):
        content, calls, _ = _stream_with(text, step)
        assert "".join(content) == text and calls == []


@pytest.mark.parametrize("form", sorted(JSON_CALLS))
def test_a_streamed_json_call_never_reaches_content_at_any_split(form: str) -> None:
    text = JSON_CALLS[form]
    for step in (1, 2, 3, 5, 11, len(text)):
        content, calls, errors = _stream_with(text, step)
        assert content == [] and calls == [ToolCall("get_weather", {"city": "Paris"})] and errors == []


def test_text_that_cannot_be_a_json_call_is_released_as_soon_as_that_is_clear() -> None:
    for text, decided in (('{"city": "Paris"}', '{"c'), ("```python\nx = 1\n", "```p"),
                          ('{"name": "get_stock"}', '{"name": "get_s'), ("[1, 2]", "[1")):
        stream = ToolCallStream(TOOLS)
        shown = [(i, p) for i, char in enumerate(text, 1) for p in stream.feed(char)]
        assert shown[0] == (len(decided), decided)
        assert "".join(p for _, p in shown) + "".join(stream.finish()) == text


def test_with_parallel_calls_off_a_json_list_counts_only_when_it_holds_one() -> None:
    one = json.dumps([WEATHER])
    assert _stream_with(one, 4, parallel=False)[1] == [ToolCall("get_weather", {"city": "Paris"})]
    two = json.dumps([WEATHER, WEATHER])
    content, calls, errors = _stream_with(two, 4, parallel=False)
    assert "".join(content) == two and calls == [] and "only one" in errors[0]


def test_a_json_call_cut_off_is_an_error_and_never_content() -> None:
    text = '```json\n{"name": "get_weather", "arguments": {"city": "Par'
    for step in (1, len(text)):
        content, calls, errors = _stream_with(text, step)
        assert content == [] and calls == [] and "ended inside a tool call" in errors[0]


def test_a_json_call_with_bad_arguments_stays_text_with_the_reason() -> None:
    text = json.dumps({"name": "get_weather", "arguments": [1, 2]})
    result = parse_tool_calls(text, TOOLS)
    assert result.calls == [] and result.content == text and "not an object" in result.errors[0]


def test_markup_calls_are_read_as_before_when_tools_are_named() -> None:
    text = "Let me look.\n" + _block(WEATHER) + "\n"
    for step in (1, 4, len(text)):
        content, calls, errors = _stream_with(text, step)
        assert "".join(content) == "Let me look." and calls == [ToolCall("get_weather", {"city": "Paris"})]


def test_generate_reads_a_json_call_to_one_of_its_tools() -> None:
    """`qwen_mlx.generate(..., tools=...)` passes the tools' names to the parser (`collect` is its last step)."""
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}} for name in TOOLS]
    chunks = [GenerationChunk(JSON_CALLS["fenced as json"], 1), GenerationChunk("", None, "stop", GenerationStats())]
    result = collect(iter(chunks), tools)
    assert result.tool_calls == [ToolCall("get_weather", {"city": "Paris"})] and result.tool_call_errors == []
