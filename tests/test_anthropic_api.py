"""Anthropic's Messages API on `qwen-mlx serve --demo`, driven by the official `anthropic` client as it is: messages
streamed or not, `system`, `stop_sequences`, tools (forced through the grammar, streamed as input_json_delta),
tool_result turns, JSON output (`output_config.format`, `messages.parse`), and 400s that name what is not
supported. The demo model's words are random; the shapes, counts and constraints are what is checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import anthropic
import httpx
import jsonschema
import pytest
from conftest import DEMO_KEY
from pydantic import BaseModel, ConfigDict, Field

from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
from qwen_mlx.serving.anthropic_api import AnthropicReply, parse_messages
from qwen_mlx.serving.protocol import APIError, ServedModel

MODEL = "qwen2-demo"
USER = [{"role": "user", "content": "Tell me about Paris."}]
GREEDY = {"temperature": 0}  # this client version has no sampling arguments of its own
WEATHER = {"name": "get_weather", "description": "Current weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")  # no properties beyond these (whose strings could run on)

    name: str = Field(max_length=10)
    population: int = Field(ge=0)


class Forecast(BaseModel):
    """No free-length strings: the SDK's `parse` drops maxLength from the schema it sends, and the demo model's random
    words would run a string to max_tokens."""

    unit: Literal["celsius", "fahrenheit"]
    sunny: bool
    days: int


@pytest.fixture
def client(demo_server: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=demo_server, api_key=DEMO_KEY, max_retries=0, timeout=120)


def test_a_message_with_its_usage(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=8, messages=USER, system="Be brief.",
                                     extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_") and message.stop_reason == "max_tokens"
    [block] = message.content
    assert block.type == "text" and block.text
    usage = message.usage
    assert usage.output_tokens == 8 and usage.input_tokens + usage.cache_read_input_tokens > 10
    shorter = client.messages.create(model=MODEL, max_tokens=8, messages=USER, extra_body=GREEDY)
    # Qwen's template puts its own system prompt in when none is given; "Be brief." replaces it.
    assert shorter.usage.input_tokens + shorter.usage.cache_read_input_tokens != \
        usage.input_tokens + usage.cache_read_input_tokens


def test_a_resent_conversation_reads_its_earlier_turns_from_the_cache(client: anthropic.Anthropic) -> None:
    """Anthropic's clients resend the history as text; the reply the server generated matches the ids it was
    generated as, so the earlier turns are read from the cache (`cache_read_input_tokens`)."""
    first_turn = [{"role": "user", "content": "Name a mountain in Asia."}]
    first = client.messages.create(model=MODEL, max_tokens=12, messages=first_turn, extra_body={"temperature": 1.0})
    history = [*first_turn, {"role": "assistant", "content": first.content[0].text},
               {"role": "user", "content": "And one in South America?"}]
    second = client.messages.create(model=MODEL, max_tokens=4, messages=history, extra_body=GREEDY)
    seen_before = first.usage.input_tokens + first.usage.cache_read_input_tokens + first.usage.output_tokens
    assert second.usage.cache_read_input_tokens >= seen_before - 2


def test_the_stream_is_the_message_in_events(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=MODEL, max_tokens=12, messages=USER, extra_body=GREEDY)
    with client.messages.stream(model=MODEL, max_tokens=12, messages=USER, extra_body=GREEDY) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "content_block_stop" in events and "message_delta" in events
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12


def test_a_stop_sequence_ends_the_reply_and_is_named(client: anthropic.Anthropic) -> None:
    text = client.messages.create(model=MODEL, max_tokens=24, messages=USER, extra_body=GREEDY).content[0].text
    stop = text[len(text) // 2:][:3]
    stopped = client.messages.create(model=MODEL, max_tokens=24, messages=USER, stop_sequences=[stop],
                                     extra_body=GREEDY)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[:text.index(stop)]


def test_a_forced_tool_call_follows_its_schema(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=80, messages=USER, tools=[WEATHER],
                                     tool_choice={"type": "tool", "name": "get_weather"})
    [call] = message.content
    assert message.stop_reason == "tool_use" and call.type == "tool_use" and call.name == "get_weather"
    assert call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER["input_schema"])
    # Streamed, the input arrives as JSON pieces that add up to the same call.
    with client.messages.stream(model=MODEL, max_tokens=80, messages=USER, tools=[WEATHER],
                                tool_choice={"type": "any", "disable_parallel_tool_use": True}) as stream:
        pieces = [e.delta.partial_json for e in stream if e.type == "content_block_delta"
                  and e.delta.type == "input_json_delta"]
        final = stream.get_final_message()
    assert len(pieces) > 1 and json.loads("".join(pieces)) == final.content[0].input
    jsonschema.validate(final.content[0].input, WEATHER["input_schema"])

    # The call and its result go back as the next turn.
    turn = [*USER, {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                                      "input": call.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21C"},
                                         {"type": "text", "text": "Thanks! And tomorrow?"}]}]
    after = client.messages.create(model=MODEL, max_tokens=4, messages=turn, tools=[WEATHER], extra_body=GREEDY)
    assert after.usage.input_tokens + after.usage.cache_read_input_tokens > \
        message.usage.input_tokens + message.usage.cache_read_input_tokens + 10


def test_json_output_follows_the_schema(client: anthropic.Anthropic) -> None:
    schema = City.model_json_schema()
    message = client.messages.create(model=MODEL, max_tokens=120, messages=USER,
                                     output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(message.content[0].text), schema)
    parsed = client.messages.parse(model=MODEL, max_tokens=120, messages=USER, output_format=Forecast)
    assert isinstance(parsed.parsed_output, Forecast)


def test_count_tokens_is_the_prompt_a_message_reads(client: anthropic.Anthropic) -> None:
    """`messages.count_tokens`: the prompt /v1/messages would read for the same fields, counted without
    generating, after the same checks."""
    for fields in ({"messages": USER, "system": "Be brief."},
                   {"messages": USER, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}}):
        counted = client.messages.count_tokens(model=MODEL, **fields)
        message = client.messages.create(model=MODEL, max_tokens=1, **fields)
        assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    with pytest.raises(anthropic.BadRequestError, match="image"):
        client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}]}])
    with pytest.raises(anthropic.BadRequestError, match="max_tokens: this field is not supported"):
        client.messages.count_tokens(model=MODEL, messages=USER, extra_body={"max_tokens": 5})


def test_a_tool_call_the_model_chooses_is_a_tool_use_block(qwen_tokenizer_dir: Path) -> None:
    """tool_choice auto: a `<tool_call>` block in the reply, however it streams, is a tool_use block and no text."""
    from test_ollama_api import FakeModel

    from qwen_mlx.text.tokenizer import Tokenizer

    served = ServedModel(MODEL, FakeModel(), Tokenizer.from_folder(qwen_tokenizer_dir))
    request = parse_messages({"model": MODEL, "max_tokens": 50, "messages": USER, "tools": [WEATHER]}, served)
    reply = AnthropicReply(request, served)
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' \
           '\n</tool_call>'
    events = reply.start(9) + [e for i in range(0, len(text), 5) for e in reply.add(GenerationChunk(text[i:i + 5], 1))]
    closing, message = reply.finish(GenerationChunk("", None, "stop", GenerationStats(prompt_tokens=9,
                                                                                      generation_tokens=31)))
    events += closing
    assert [b["type"] for b in message["content"]] == ["text", "tool_use"] and message["stop_reason"] == "tool_use"
    assert message["content"][0]["text"] == "Checking."
    assert message["content"][1]["input"] == {"city": "Oslo", "unit": "celsius"}
    kinds = [name for name, _ in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2
    typed = anthropic.types.Message.model_validate(message)
    assert typed.content[1].type == "tool_use" and typed.usage.output_tokens == 31


@pytest.mark.parametrize(("extra", "needle"), [
    ({"container": "c1"}, "container"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64",
                                                                            "media_type": "image/png",
                                                                            "data": "aGk="}}]}]}, "image"),
    ({"temperature": 1.5}, "temperature"),
    ({"output_config": {"effort": "high"}}, "effort"),
    ({"stop_sequences": [f"stop {i}" for i in range(17)]}, "stop_sequences: at most 16"),
    ({"stop_sequences": ["x" * 513]}, "stop_sequences: a stop string of 513 characters"),
])
def test_what_is_not_supported_is_a_400_naming_it(client: anthropic.Anthropic, extra: dict, needle: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(model=MODEL, max_tokens=4, messages=USER, extra_body=extra)
    assert needle in error.value.message and error.value.body["error"]["type"] == "invalid_request_error"


def test_max_tokens_is_required_and_unknown_models_are_404(client: anthropic.Anthropic, demo_server: str) -> None:
    response = httpx.post(f"{demo_server}/v1/messages", headers={"x-api-key": DEMO_KEY},
                          json={"model": MODEL, "messages": USER}, timeout=30)
    assert response.status_code == 400 and response.json() == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}
    with pytest.raises(anthropic.NotFoundError, match="not on this machine"):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=USER)
    wrong = anthropic.Anthropic(base_url=demo_server, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model=MODEL, max_tokens=4, messages=USER)


def test_a_prompt_past_the_context_is_refused() -> None:
    with pytest.raises(APIError, match="max_tokens"):
        parse_messages({"model": MODEL, "messages": USER}, None)  # type: ignore[arg-type]
