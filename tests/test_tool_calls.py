"""`parse_tool_calls`: Qwen2.5's `<tool_call>{json}</tool_call>` blocks become calls; bad blocks become errors."""

from __future__ import annotations

import json

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
