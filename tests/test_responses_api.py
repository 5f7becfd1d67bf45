"""OpenAI's Responses API on `qwen-mlx serve --demo`, driven by the official `openai` client and the OpenAI Agents
SDK as they are: responses streamed or not (every event as the SDK's typed models read it), JSON output through
`responses.parse`, function tools forced through the grammar, `previous_response_id` continuing from the prefix
cache, GET / DELETE of stored responses, and 400s that name what is not supported. The demo model's words are
random; the shapes, counts and constraints are what is checked."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from conftest import DEMO_KEY
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
from qwen_mlx.serving.protocol import APIError, ServedModel
from qwen_mlx.serving.responses_api import ResponsesReply, ResponseStore, parse_request

MODEL = "qwen2-demo"
QUESTION = "What's the weather in Paris?"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}


class Forecast(BaseModel):
    """No free-length strings: the demo model's random words would run a string to max_output_tokens."""

    unit: Literal["celsius", "fahrenheit"]
    sunny: bool


@pytest.fixture
def client(demo_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_server}/v1", api_key=DEMO_KEY, max_retries=0, timeout=120)


def post(server: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server}/v1/responses", json={"model": MODEL, **body}, timeout=120,
                      headers={"Authorization": f"Bearer {DEMO_KEY}"})


def raw_events(server: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A streamed response's server-sent events as (event name, data)."""
    with httpx.stream("POST", f"{server}/v1/responses", json={"model": MODEL, "stream": True, **body}, timeout=120,
                      headers={"Authorization": f"Bearer {DEMO_KEY}"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        blocks = "".join(response.iter_text()).strip().split("\n\n")
    events = []
    for block in blocks:
        name, data = block.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def test_a_response_is_the_sdks_response_object(client: openai.OpenAI, demo_server: str) -> None:
    response = client.responses.create(model=MODEL, input=QUESTION, instructions="Be brief.", max_output_tokens=8,
                                       temperature=0, metadata={"run": "7"}, user="ada")
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    [part] = message.content
    assert part.type == "output_text" and part.text == response.output_text and part.annotations == []
    usage = response.usage
    assert usage.output_tokens == 8 and usage.input_tokens > 10 and usage.output_tokens_details.reasoning_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert (response.instructions, response.metadata, response.user, response.temperature) == \
        ("Be brief.", {"run": "7"}, "ada", 0)
    assert response.tools == [] and response.tool_choice == "auto" and response.parallel_tool_calls is True
    # Every field the SDK's model requires is there, with the type it expects (the SDK itself reads leniently).
    raw = post(demo_server, {"input": QUESTION, "max_output_tokens": 4}).json()
    Response.model_validate(raw)


def test_the_stream_replays_the_response(client: openai.OpenAI, demo_server: str) -> None:
    whole = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0)
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0) as stream:
        events = list(stream)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text and [e.text for e in events if e.type == "response.output_text.done"] == [text]
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]
    assert [e.type for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                             "response.output_item.done", "response.incomplete"]
    assert events[-1].response.output_text == text and events[-1].response.usage.output_tokens == 12
    # Each event as OpenAI sends it: named, numbered in order, and valid against the SDK's own models.
    raw = raw_events(demo_server, {"input": QUESTION, "max_output_tokens": 6, "temperature": 0})
    assert [data["sequence_number"] for _, data in raw] == list(range(len(raw)))
    adapter = TypeAdapter(ResponseStreamEvent)
    for name, data in raw:
        assert name == data["type"]
        adapter.validate_python(data)


def test_json_output_through_responses_parse(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model=MODEL, input=QUESTION, text_format=Forecast, max_output_tokens=60)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Forecast)
    with client.responses.stream(model=MODEL, input=QUESTION, text_format=Forecast, max_output_tokens=60) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and isinstance(final.output_parsed, Forecast)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    plain = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=60, text={"format": {
        "type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(plain.output_text), schema)
    assert plain.text.format.type == "json_schema" and plain.text.format.name == "answer"


def test_a_forced_function_call_follows_its_schema_and_goes_back_as_input(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input=QUESTION, tools=[WEATHER], max_output_tokens=80,
                                       tool_choice={"type": "function", "name": "get_weather"})
    [call] = response.output  # a named function is called exactly once
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and response.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert response.tools[0].name == "get_weather" and response.tool_choice.name == "get_weather"
    # Streamed, the arguments arrive in pieces that add up to the call.
    with client.responses.stream(model=MODEL, input=QUESTION, tools=[WEATHER], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=80) as stream:
        pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    [streamed] = final.output
    assert len(pieces) > 1 and "".join(pieces) == streamed.arguments
    jsonschema.validate(json.loads(streamed.arguments), WEATHER["parameters"])

    # The call and its output go back as the next turn's input, as the SDKs send them.
    turn = [{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21C"},
            {"role": "user", "content": [{"type": "input_text", "text": "And tomorrow?"}]}]
    after = client.responses.create(model=MODEL, input=turn, tools=[WEATHER], max_output_tokens=4, temperature=0)
    assert after.output[0].type == "message"
    assert after.usage.input_tokens > response.usage.input_tokens + 10


def test_previous_response_id_continues_from_the_cache(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="Name a mountain in Asia.", max_output_tokens=12,
                                    temperature=1.0)
    second = client.responses.create(model=MODEL, input="And one in South America?", max_output_tokens=4,
                                     temperature=0, previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # The first turn, its reply included, is read from the prefix cache (the reply as the ids it was generated as).
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.total_tokens - 2
    third = client.responses.create(model=MODEL, input="Thanks.", max_output_tokens=2, previous_response_id=second.id)
    assert third.usage.input_tokens > second.usage.total_tokens


def test_stored_responses_are_retrieved_and_deleted(client: openai.OpenAI, demo_server: str) -> None:
    created = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3)
    assert client.responses.retrieve(created.id).model_dump() == created.model_dump()
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    unstored = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model=MODEL, input="More?", previous_response_id=unstored.id)
    assert error.value.body["param"] == "previous_response_id"
    assert error.value.body["code"] == "previous_response_not_found"
    assert httpx.get(f"{demo_server}/v1/responses/{created.id}", timeout=10).status_code == 401  # behind the key


@pytest.mark.parametrize(("extra", "param", "needle"), [
    ({"tools": [{"type": "web_search"}]}, "tools", "'web_search' is not supported"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools", "'file_search'"),
    ({"tools": [{"type": "computer_use_preview", "display_width": 1024, "display_height": 768,
                 "environment": "browser"}]}, "tools", "'computer_use_preview'"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "does not reason"),
    ({"background": True}, "background", "background"),
    ({"include": ["file_search_call.results"]}, "include", "include"),
    ({"truncation": "auto"}, "truncation", "truncation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "'prompt' is not supported"),
    ({"conversation": "conv_1"}, "conversation", "'conversation' is not supported"),
    ({"text": {"verbosity": "high"}}, "text.verbosity", "verbosity"),
    ({"temperature": 3}, "temperature", "between 0 and 2"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "built-in"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, "input",
     "text only"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "'reasoning' is not supported"),
])
def test_what_is_not_supported_is_a_400_naming_it(client: openai.OpenAI, extra: dict[str, Any], param: str,
                                                  needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=4, extra_body=extra)
    assert error.value.body["param"] == param and needle in error.value.body["message"]


def test_a_call_the_model_chooses_is_a_function_call_item(qwen_tokenizer_dir: Path) -> None:
    """tool_choice auto: a `<tool_call>` block in the reply, however it streams, is a function_call item after the
    text's message item, and the stored conversation holds both as one assistant turn."""
    from test_ollama_api import FakeModel

    from qwen_mlx.text.tokenizer import Tokenizer

    served = ServedModel(MODEL, FakeModel(), Tokenizer.from_folder(qwen_tokenizer_dir))
    store = ResponseStore()
    request = parse_request({"model": MODEL, "input": QUESTION, "tools": [WEATHER]}, served, store)
    reply = ResponsesReply(request, served, store)
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' \
           '\n</tool_call>'
    events = reply.start() + [e for i in range(0, len(text), 5) for e in reply.add(GenerationChunk(text[i:i + 5], 1))]
    closing, response = reply.finish(GenerationChunk("", None, "stop", GenerationStats(prompt_tokens=9,
                                                                                       generation_tokens=31)))
    events += closing
    assert [item["type"] for item in response["output"]] == ["message", "function_call"]
    assert response["output"][0]["content"][0]["text"] == "Checking."
    assert json.loads(response["output"][1]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    kinds = [name for name, _ in events]
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 2
    assert kinds[-1] == "response.completed" and Response.model_validate(response).status == "completed"
    assert store.conversation(response["id"])[-1] == {
        "role": "assistant", "content": "Checking.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                         "arguments": {"city": "Oslo", "unit": "celsius"}}}]}
    # A failure mid-stream is OpenAI's `error` event, numbered after the rest.
    name, error = reply.error_event(APIError(503, "the server is shutting down", kind="server_error"))
    assert name == "error" and error["sequence_number"] == len(events)
    assert TypeAdapter(ResponseStreamEvent).validate_python(error).message == "the server is shutting down"


# --- the OpenAI Agents SDK, unchanged: only its client's base_url and api_key point here ---

@pytest.fixture
def agents_client(demo_server: str) -> Any:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # its traces would go to OpenAI's servers
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=f"{demo_server}/v1", api_key=DEMO_KEY,
                                                        max_retries=0, timeout=120))
    return agents


def weather_tool(agents: Any, calls: list[str]) -> Any:
    def get_weather(city: Literal["Paris", "Oslo"]) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    return agents.function_tool(get_weather)


def test_an_agent_calls_its_tool_then_answers_in_its_output_type(agents_client: Any) -> None:
    agents, calls = agents_client, []
    # The named call is forced once; the SDK then resets tool_choice, and the schema ends the reply.
    agent = agents.Agent(name="weather", instructions="Use the tool.", model=MODEL, output_type=Forecast,
                         tools=[weather_tool(agents, calls)],
                         model_settings=agents.ModelSettings(tool_choice="get_weather", max_tokens=80))
    plain = agents.Agent(name="forecast", instructions="Answer.", model=MODEL, output_type=Forecast,
                         model_settings=agents.ModelSettings(max_tokens=60))

    async def run() -> tuple[Any, Any]:  # one event loop: the client's connections belong to it
        return await agents.Runner.run(agent, QUESTION), await agents.Runner.run(plain, QUESTION)

    result, answer = asyncio.run(run())
    assert len(calls) == 1 and isinstance(result.final_output, Forecast)
    kinds = [type(item).__name__ for item in result.new_items]
    assert kinds == ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"]
    assert isinstance(answer.final_output, Forecast)


def test_an_agent_runs_streamed(agents_client: Any) -> None:
    agents, calls = agents_client, []
    agent = agents.Agent(name="weather", instructions="Use the tool.", model=MODEL, output_type=Forecast,
                         tools=[weather_tool(agents, calls)],
                         model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                                             max_tokens=80))

    async def run() -> tuple[Any, list[str]]:
        result = agents.Runner.run_streamed(agent, QUESTION)
        raw = [event.data.type async for event in result.stream_events() if event.type == "raw_response_event"]
        return result, raw

    result, raw = asyncio.run(run())
    assert len(calls) >= 1 and isinstance(result.final_output, Forecast)
    assert raw.count("response.completed") == 2 and "response.function_call_arguments.delta" in raw
    assert "response.output_text.delta" in raw
