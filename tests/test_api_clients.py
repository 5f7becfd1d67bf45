"""`qwen-mlx serve` against the clients people point at it, unchanged: the openai SDK, instructor, langchain-openai,
litellm and pydantic-ai, and the protocol details peer servers' suites check (issue: API conformance).

The server is a subprocess on 127.0.0.1 with a tiny random-weight Qwen2 and Qwen2.5's real tokenizer: whatever
valid structure comes back is the constrained decoder's doing.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field
from servers import free_port, start_server, stop_server

MODEL_ID = "tiny-qwen"
API_KEY = "clients-key"
ALLOWED_ORIGIN = "http://editor.example:3000"
USER = [{"role": "user", "content": "Who lives at the old mill?"}]


class Address(BaseModel):
    city: str = Field(max_length=12)
    zip: int = Field(ge=0, le=99999)


class Person(BaseModel):
    """A nested model: pydantic writes its parameters with $defs and $ref."""

    name: str = Field(max_length=12)
    address: Address


@pytest.fixture(scope="module")
def server(tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = tiny_model_dir(MODEL_ID, max_position_embeddings=1024)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(["serve", "--model", str(model), "--port", str(port), "--api-key", API_KEY,
                            "--cors", ALLOWED_ORIGIN], f"{url}/health",
                           tmp_path_factory.mktemp("logs") / "serve.log")
    yield url
    stop_server(process)


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server: str, body: dict[str, Any], path: str = "/v1/chat/completions", **headers: str) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}", **headers})


# --- frameworks ---


def test_openai_nested_pydantic_tool_under_a_forced_tool_choice(client: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(Person)
    assert "$defs" in json.dumps(tool)
    for choice in ("required", {"type": "function", "function": {"name": "Person"}}):
        reply = client.chat.completions.create(model=MODEL_ID, messages=USER, tools=[tool], tool_choice=choice,
                                               temperature=1.0, seed=2, max_tokens=300, parallel_tool_calls=False)
        (call,) = reply.choices[0].message.tool_calls
        Person.model_validate_json(call.function.arguments)


def test_instructor_tools_mode_returns_the_model(server: str) -> None:
    import instructor

    patched = instructor.from_openai(openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0),
                                     mode=instructor.Mode.TOOLS)
    person = patched.chat.completions.create(model=MODEL_ID, response_model=Person, messages=USER, max_retries=0,
                                             max_tokens=300, temperature=1.0, seed=4)
    assert isinstance(person, Person) and isinstance(person.address, Address)


def test_langchain_structured_output_and_tools(server: str) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=MODEL_ID, base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, max_tokens=300,
                      temperature=1.0, seed=5)
    person = chat.with_structured_output(Person, method="function_calling").invoke("Who lives at the old mill?")
    assert isinstance(person, Person)
    person = chat.with_structured_output(Person, method="json_schema").invoke("Who lives at the old mill?")
    assert isinstance(person, Person)
    streamed = "".join(chunk.content for chunk in chat.stream("Hello"))
    assert isinstance(streamed, str) and streamed


def test_pydantic_ai_default_tool_output(server: str) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(MODEL_ID, provider=OpenAIProvider(base_url=f"{server}/v1", api_key=API_KEY))
    agent = Agent(model, output_type=Person, model_settings={"max_tokens": 300, "temperature": 1.0, "seed": 6},
                  retries=0)
    assert isinstance(agent.run_sync("Who lives at the old mill?").output, Person)


def test_litellm_maps_an_overlong_prompt_to_its_context_window_error(server: str) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network for its price table
    import litellm

    long = [{"role": "user", "content": "hello " * 1100}]
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model=f"openai/{MODEL_ID}", api_base=f"{server}/v1", api_key=API_KEY, messages=long,
                           max_tokens=2, num_retries=0)
    reply = litellm.completion(model=f"openai/{MODEL_ID}", api_base=f"{server}/v1", api_key=API_KEY, messages=USER,
                               max_tokens=4, num_retries=0)
    assert reply.usage.completion_tokens == 4


# --- the protocol ---


def test_explicit_nulls_mean_left_out(server: str) -> None:
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 3, "tool_choice": None, "stream": None,
            "logprobs": None, "parallel_tool_calls": None, "tools": None, "stop": None, "seed": None,
            "response_format": None, "stream_options": None, "top_logprobs": None}
    response = post(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**64, 2**70])
def test_any_integer_seed_reproduces_a_reply(client: openai.OpenAI, seed: int) -> None:
    def reply() -> str:
        return client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=8, temperature=1.0,
                                              seed=seed).choices[0].message.content

    assert reply() == reply()


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_cut_off_keeps_its_arguments_and_never_shows_markup(client: openai.OpenAI,
                                                                               stream: bool) -> None:
    tool = openai.pydantic_function_tool(Person)
    kwargs = dict(model=MODEL_ID, messages=USER, tools=[tool], tool_choice="required", max_tokens=20,
                  temperature=1.0, seed=3)
    if stream:
        content, arguments, names, finish, pieces = "", "", [], None, 0
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                names += [call.function.name] if call.function.name else []
                arguments += call.function.arguments or ""
                pieces += bool(call.function.arguments)
            finish = chunk.choices[0].finish_reason or finish
        assert pieces > 1  # the arguments streamed in pieces, as OpenAI streams them
    else:
        reply = client.chat.completions.create(**kwargs)
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        content = message.content or ""
        names = [c.function.name for c in message.tool_calls or []]
        arguments = "".join(c.function.arguments for c in message.tool_calls or [])
    assert finish == "length" and names == ["Person"]
    assert "<" not in content and "tool_call" not in content
    assert arguments.startswith("{") and "tool_call" not in arguments
    with pytest.raises(ValueError):
        json.loads(arguments)  # cut off: as far as it came


def test_forced_tool_arguments_stream_in_pieces_that_add_up(client: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(Person)
    arguments, pieces = "", 0
    for chunk in client.chat.completions.create(model=MODEL_ID, messages=USER, tools=[tool], stream=True,
                                                tool_choice="required", parallel_tool_calls=False, max_tokens=300,
                                                temperature=1.0, seed=8):
        for call in chunk.choices[0].delta.tool_calls or []:
            arguments += call.function.arguments or ""
            pieces += bool(call.function.arguments)
    assert pieces > 3
    Person.model_validate_json(arguments)


def test_json_object_with_a_schema_is_held_to_it(server: str) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for seed in range(3):
        response = post(server, {"model": MODEL_ID, "messages": USER, "max_tokens": 40, "temperature": 1.0,
                                 "seed": seed, "response_format": {"type": "json_object", "schema": schema}})
        assert response.status_code == 200
        value = json.loads(response.json()["choices"][0]["message"]["content"])
        assert set(value) == {"n"} and 0 <= value["n"] <= 9
    bad = post(server, {"model": MODEL_ID, "messages": USER,
                        "response_format": {"type": "json_object", "schema": {"type": "nonsense"}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_bad_bodies_are_400s_and_the_connection_stays_usable(server: str) -> None:
    bad_bodies = [{"model": MODEL_ID, "messages": USER, "tools": [1]},
                  {"model": MODEL_ID, "messages": USER, "tools": ["x"]},
                  {"model": MODEL_ID, "messages": USER, "tools": [openai.pydantic_function_tool(Person)],
                   "tool_choice": {"type": "function", "function": "Person"}},
                  {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi", "tool_calls": 5}]}]
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as session:
        for body in bad_bodies:
            response = session.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, body
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["type"] == "invalid_request_error"
        for _ in range(10):  # the same keep-alive connection
            assert session.post("/v1/chat/completions",
                                json={"model": MODEL_ID, "messages": USER, "max_tokens": 1}).status_code == 200


def test_retrieving_a_model(client: openai.OpenAI) -> None:
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_stream_options_need_stream(server: str) -> None:
    response = post(server, {"model": MODEL_ID, "messages": USER, "stream": False,
                             "stream_options": {"include_usage": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


def test_streamed_completion_logprobs_carry_text_offsets(client: openai.OpenAI) -> None:
    entries = []
    for chunk in client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=6, temperature=0,
                                           logprobs=0, stream=True):
        if chunk.choices[0].logprobs is not None:
            entries.append(chunk.choices[0].logprobs)
    offsets = [e.text_offset[0] for e in entries]
    tokens = [e.tokens[0] for e in entries]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))] and offsets[-1] > 0
    # logprobs: 0 still lists the sampled token among the alternatives
    assert all(e.tokens[0] in e.top_logprobs[0] for e in entries)


def test_the_bearer_scheme_is_case_insensitive(server: str) -> None:
    for scheme in ("bearer", "BEARER", "Bearer"):
        response = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                              headers={"Authorization": f"{scheme} {API_KEY}"},
                              json={"model": MODEL_ID, "messages": USER, "max_tokens": 1})
        assert response.status_code == 200, scheme
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401


def test_context_errors_use_openais_words_and_code(server: str) -> None:
    response = post(server, {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello " * 1100}]})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in error["message"]


def test_cors_preflight_only_for_allowed_origins(server: str) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{server}/v1/chat/completions", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    refused = httpx.options(f"{server}/v1/chat/completions",
                            headers={"Origin": "http://evil.example", **preflight})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    reply = post(server, {"model": MODEL_ID, "messages": USER, "max_tokens": 1}, Origin=ALLOWED_ORIGIN)
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_concurrent_clients_of_different_kinds_share_the_server(server: str) -> None:
    """Frameworks and raw clients at once: every one gets a well-formed answer."""
    errors: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            response = post(server, {"model": MODEL_ID, "messages": USER, "max_tokens": 5, "seed": seed})
            assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5
        except BaseException as e:  # collected: a thread's assert would not fail the test
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
