"""`qwen-mlx serve` driven by the official `openai` client, as editors and agents drive it.

The servers run as subprocesses on free 127.0.0.1 ports with a tiny random-weight Qwen2 and Qwen2.5's real
tokenizer: its replies are gibberish, which is the point of the structured-output tests (whatever JSON or tool
call comes back is the constraint's doing, and without it the same model writes invalid JSON).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from servers import free_port, start_server, stop_server

from qwen_mlx.text.tokenizer import Tokenizer

API_KEY = "test-key-123"
CONTEXT = 1024
MODEL_ID = "tiny-qwen"


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "role", "tags", "address", "active"],
    "additionalProperties": False,
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}

USER = [{"role": "user", "content": "Tell me about Paris."}]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir(MODEL_ID, max_position_embeddings=CONTEXT)


def serve(model: Path, log_dir: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[Any, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # No other local model: /v1/models lists exactly the one served.
    empty = {"QWEN_MLX_HOME": str(log_dir / "home"), "HF_HOME": str(log_dir / "hf")}
    process = start_server(["serve", "--model", str(model), "--port", str(port), *extra], f"{url}/health",
                           log_dir / f"serve-{port}.log", env={**empty, **(env or {})})
    return process, url


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = serve(model_dir, tmp_path_factory.mktemp("logs"), "--api-key", API_KEY)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def slow_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Each model step sleeps 50 ms, so a client can leave mid-reply; one request runs, one may wait."""
    process, url = serve(model_dir, tmp_path_factory.mktemp("logs"), "--max-queue", "1", "--max-batch", "1",
                         env={"QWEN_MLX_TOKEN_DELAY": "0.05"})
    yield url
    stop_server(process)


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_idle(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = health(url)
        if not state["busy"] and state["waiting"] == 0:
            return state
        time.sleep(0.05)
    raise AssertionError("the server stayed busy")


# --- the basics ---


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_ID]


def test_api_key_is_required(server: str, model_dir: Path) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{server}/v1/chat/completions", headers=headers,
                              json={"model": MODEL_ID, "messages": USER, "max_tokens": 2})
        assert response.status_code == 401
        assert "api key" in response.json()["error"]["message"].lower()
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_chat_completion_counts_usage(client: openai.OpenAI, model_dir: Path) -> None:
    response = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=12, seed=3)
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.tool_calls is None
    prompt = Tokenizer.from_folder(model_dir).apply_chat_template(USER, tokenize=True)
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == len(prompt) + 12
    assert response.model == MODEL_ID


def test_streaming_matches_the_non_streamed_reply(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=16, seed=7)
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=16, seed=7, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_seed_reproduces_a_sampled_reply(client: openai.OpenAI) -> None:
    def reply(seed: int) -> str:
        return client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=12, seed=seed,
                                              temperature=1.0).choices[0].message.content

    assert reply(11) == reply(11)
    assert reply(11) != reply(12)


def test_stop_string_ends_the_reply_and_is_not_shown(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = text[10:13]
    stopped = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_logprobs_are_reported(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == 5
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        # Greedy: the chosen token is the likeliest.
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in entries) == response.choices[0].message.content


def test_text_completion(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=6, seed=1)
    assert response.choices[0].finish_reason == "length" and response.choices[0].text
    assert response.usage.completion_tokens == 6


def test_streamed_text_completion_matches(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_follow_up_request_reuses_the_conversation_cache(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "A colour of the French flag, please?"}]
    first = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, seed=5)
    follow_up = [*messages, {"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And another one?"}]
    second = client.chat.completions.create(model=MODEL_ID, messages=follow_up, max_tokens=8, seed=5)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


# --- structured output ---


def test_json_schema_output_always_parses_and_validates(client: openai.OpenAI) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(20):
        response = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Describe a person as JSON."}],
            response_format=response_format, temperature=1.0, seed=seed, max_tokens=300,
        )
        assert response.choices[0].finish_reason == "stop", response.choices[0].message.content
        jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)


def test_without_the_constraint_the_same_model_writes_invalid_json(client: openai.OpenAI) -> None:
    for seed in range(5):
        response = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Describe a person as JSON."}],
            temperature=1.0, seed=seed, max_tokens=60,
        )
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.choices[0].message.content)


def test_named_tool_choice_returns_a_valid_call(client: openai.OpenAI) -> None:
    parameters = WEATHER_TOOL["function"]["parameters"]
    for seed in range(3):
        response = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=1.0, seed=seed, max_tokens=200,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and len({c.id for c in calls}) == len(calls)
        for call in calls:
            assert call.type == "function" and call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_parallel_tool_calls_false_gives_exactly_one_call(client: openai.OpenAI) -> None:
    for seed in range(3):
        response = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", parallel_tool_calls=False,
            temperature=1.0, seed=seed, max_tokens=200,
        )
        [call] = response.choices[0].message.tool_calls
        assert call.function.name in ("get_weather", "get_time")
        assert response.choices[0].finish_reason == "tool_calls"


def test_streamed_tool_call_never_shows_markup_in_content(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER_TOOL],
        tool_choice="required", temperature=1.0, seed=3, max_tokens=200, stream=True,
    )
    content, calls, finish = [], {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "arguments": ""})
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert "tool_call" not in "".join(content) and "<" not in "".join(content)
    assert [c["name"] for c in calls.values()] == ["get_weather"] and calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_TOOL["function"]["parameters"])


def test_tool_results_can_be_sent_back(client: openai.OpenAI, model_dir: Path) -> None:
    """The assistant's call (arguments as a JSON string, as OpenAI sends them) and the tool's answer render."""
    arguments = {"city": "Paris", "unit": "celsius", "days": 1}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 °C, sunny"},
    ]
    response = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=[WEATHER_TOOL], max_tokens=4)
    tokenizer = Tokenizer.from_folder(model_dir)
    expected = tokenizer.apply_chat_template([
        messages[0],
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "content": "18 °C, sunny"},
    ], tools=[WEATHER_TOOL], tokenize=True)
    assert response.usage.prompt_tokens == len(expected)
    rendered = tokenizer.decode(expected)
    assert '"arguments": {"city": "Paris", "unit": "celsius", "days": 1}' in rendered
    assert "<tool_response>\n18 °C, sunny\n</tool_response>" in rendered


def test_the_readme_example_runs(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    after = readme.split("<!-- tests/test_serve.py runs this example against a live server -->", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    code = (code.replace("http://127.0.0.1:8080/v1", f"{server}/v1").replace("sk-local-123", API_KEY)
            .replace('"mlx-community/Qwen2.5-7B-Instruct-4bit"', repr(MODEL_ID)))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "get_weather {'city': " in out and "'celsius': " in out


# --- bad requests ---


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"extra_body": {"mirostat": 2}}, "mirostat"),
])
def test_unsupported_parameter_is_a_400_naming_it(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2, **extra)
    assert error.value.body["param"] == param and param in error.value.body["message"]


def test_prompt_over_the_context_is_a_400_before_any_compute(client: openai.OpenAI, server: str) -> None:
    before = health(server)["generated_tokens"]
    long = [{"role": "user", "content": "hello " * CONTEXT}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_ID, messages=long, max_tokens=2)
    assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=CONTEXT)
    assert health(server)["generated_tokens"] == before


@pytest.mark.parametrize(("body", "needle"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"model": MODEL_ID}).encode(), "messages"),
    (json.dumps({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}).encode(), "role"),
    (json.dumps({"model": MODEL_ID, "messages": USER, "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"model": MODEL_ID, "messages": USER, "response_format": {"type": "yaml"}}).encode(), "yaml"),
    (json.dumps({"model": MODEL_ID, "messages": USER, "tool_choice": "required"}).encode(), "tools"),
    (json.dumps({"model": "gpt-4o", "messages": USER}).encode(), "gpt-4o"),
])
def test_malformed_request_gets_a_clear_error(server: str, body: bytes, needle: str) -> None:
    response = httpx.post(f"{server}/v1/chat/completions", content=body,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code in (400, 404)
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


# --- disconnects and load ---


def test_client_disconnect_cancels_generation(slow_server: str) -> None:
    before = wait_idle(slow_server)["generated_tokens"]
    received = 0
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{slow_server}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"role"' not in line:
                received += 1
                if received == 5:
                    break  # leaving the block closes the connection mid-reply
    generated = wait_idle(slow_server)["generated_tokens"] - before
    # The next step may already be queued when the client leaves; nothing more.
    assert received <= generated <= received + 2, (received, generated)
    # And the server goes on serving.
    after = httpx.post(f"{slow_server}/v1/chat/completions", timeout=60,
                       json={"model": MODEL_ID, "messages": USER, "max_tokens": 2})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2


def test_flood_beyond_the_queue_gets_503_and_nothing_breaks(slow_server: str) -> None:
    wait_idle(slow_server)
    statuses: list[int] = []

    def request() -> None:
        response = httpx.post(f"{slow_server}/v1/chat/completions", timeout=60,
                              json={"model": MODEL_ID, "messages": USER, "max_tokens": 6})
        statuses.append(response.status_code)
        if response.status_code == 503:
            assert "busy" in response.json()["error"]["message"]

    threads = [threading.Thread(target=request) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    assert wait_idle(slow_server)["status"] == "ok"
    again = httpx.post(f"{slow_server}/v1/chat/completions", timeout=60,
                       json={"model": MODEL_ID, "messages": USER, "max_tokens": 2})
    assert again.status_code == 200


# --- the command line ---


@pytest.mark.parametrize(("args", "needle"), [
    (["--max-queue", "0"], "--max-queue"),
    (["--max-kv-size", "3"], "--max-kv-size"),
    (["--max-kv-size", "64", "--kv-bits", "8"], "not both"),
    (["--api-key", " "], "--api-key"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    # The tiny model's heads are 16 values wide: no 64-value group of the quantized cache fits.
    (["--kv-bits", "8"], "--kv-bits 8 (kv_bits=8) cannot store this model's KV cache: its head size 16"),
])
def test_bad_options_are_one_line_errors(args: list[str], needle: str, model_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from qwen_mlx.cli.main import main

    assert main(["serve", "--model", str(model_dir), "--port", str(free_port()), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and err[-1].startswith("qwen-mlx: error:")
    assert not any("Traceback" in line for line in err)


def test_a_port_in_use_is_reported_before_loading(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from qwen_mlx.cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(model_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "loading" not in err


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_shutdown_while_a_client_streams_ends_promptly_with_exit_0(model_dir: Path, tmp_path: Path,
                                                                   signal_name: str) -> None:
    import signal

    process, url = serve(model_dir, tmp_path, env={"QWEN_MLX_TOKEN_DELAY": "0.05"})
    streaming = threading.Event()

    def client() -> None:
        body = {"model": MODEL_ID, "messages": USER, "max_tokens": 500, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if '"content": "' in line:
                        streaming.set()
        except httpx.HTTPError:
            pass  # the server went away mid-stream: expected

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        assert streaming.wait(60)
        started = time.monotonic()
        process.send_signal(getattr(signal, signal_name))
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - started < 5
    finally:
        stop_server(process)
    thread.join(10)


# --- speculative decoding ---


def test_predicted_outputs_leave_the_reply_as_it_is_and_count_the_drafts(client: openai.OpenAI,
                                                                         model_dir: Path) -> None:
    """OpenAI's `prediction`: a greedy reply is unchanged, and with a seed the usage counts are the library's own
    (accepted + rejected = drafted)."""
    import qwen_mlx

    plain = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=24, temperature=0)
    text = plain.choices[0].message.content
    predicted = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=24, temperature=0,
                                               prediction={"type": "content", "content": text})
    assert predicted.choices[0].message.content == text
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens >= details.accepted_prediction_tokens

    model, tokenizer = qwen_mlx.load(model_dir)
    half = text[: len(text) // 2] + "something else entirely"
    sampled = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=24, temperature=1.0, seed=9,
                                             prediction={"type": "content", "content": [{"type": "text",
                                                                                         "text": half}]})
    expected = qwen_mlx.generate(model, tokenizer, USER, max_tokens=24, temperature=1.0, seed=9, prediction=half)
    assert sampled.choices[0].message.content == expected.text
    details = sampled.usage.completion_tokens_details
    assert details.accepted_prediction_tokens == expected.stats.accepted_draft_tokens
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == expected.stats.draft_tokens
    assert plain.usage.completion_tokens_details.rejected_prediction_tokens == 0


def test_a_server_side_draft_source_changes_no_reply(model_dir: Path, client: openai.OpenAI,
                                                     tmp_path: Path) -> None:
    process, url = serve(model_dir, tmp_path, "--prompt-lookup", "3", "--draft-model", str(model_dir))
    try:
        fast = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        for messages in (USER, [{"role": "user", "content": "Say it again: tick tock tick tock tick tock"}]):
            expected = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=24,
                                                      temperature=0)
            reply = fast.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=24, temperature=0)
            assert reply.choices[0].message.content == expected.choices[0].message.content
            details = reply.usage.completion_tokens_details
            assert details.accepted_prediction_tokens <= reply.usage.completion_tokens
    finally:
        stop_server(process)


@pytest.mark.parametrize("prediction", [{"type": "content"}, {"type": "image", "content": "x"}, "text"])
def test_a_malformed_prediction_is_a_400(client: openai.OpenAI, prediction: Any) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2, prediction=prediction)
    assert error.value.body["param"] == "prediction"


# --- continuous batching ---


@pytest.fixture(scope="module")
def batch_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Four rows; each model step sleeps 20 ms, so streams overlap long enough to see it."""
    process, url = serve(model_dir, tmp_path_factory.mktemp("logs"), "--max-batch", "4",
                         env={"QWEN_MLX_TOKEN_DELAY": "0.02"})
    yield url
    stop_server(process)


def test_concurrent_streams_are_decoded_together_each_as_alone(batch_server: str) -> None:
    client = openai.OpenAI(base_url=f"{batch_server}/v1", api_key="none", max_retries=0, timeout=120)
    requests: list[dict[str, Any]] = [
        {"messages": USER, "max_tokens": 30},
        {"messages": [{"role": "user", "content": "A much longer question about rivers, mills, bridges, old towns "
                                                  "and the people who lived by them, asked at length."}],
         "max_tokens": 40},
        {"messages": [{"role": "user", "content": "Describe a person as JSON."}], "max_tokens": 200,
         "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}},
        {"messages": USER, "max_tokens": 30, "stop": ["e"]},
    ]
    alone = [client.chat.completions.create(model=MODEL_ID, temperature=0, **r).choices[0].message.content
             for r in requests]
    wait_idle(batch_server)
    results: dict[int, dict[str, Any]] = {}

    def stream(i: int) -> None:
        start, first, parts = time.monotonic(), None, []
        for chunk in client.chat.completions.create(model=MODEL_ID, temperature=0, stream=True, **requests[i]):
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text and first is None:
                first = time.monotonic() - start
            parts.append(text or "")
        results[i] = {"text": "".join(parts), "first": first, "done": time.monotonic() - start}

    def cancelled() -> None:
        body = {"model": MODEL_ID, "messages": USER, "max_tokens": 500, "stream": True}
        with httpx.stream("POST", f"{batch_server}/v1/chat/completions", json=body, timeout=60) as response:
            for n, _ in enumerate(response.iter_lines()):
                if n == 10:
                    break  # leaves mid-reply: its row frees, the others go on

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(requests))]
    threads.append(threading.Thread(target=cancelled))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, expected in enumerate(alone):
        assert results[i]["text"] == expected, requests[i]
    jsonschema.validate(json.loads(results[2]["text"]), PERSON)
    # Every stream had its first token before any of them finished: they ran together, not one after another.
    # (Not counting the one cut short by its stop string: its prompt is cached, so it may be done in a step.)
    assert max(r["first"] for r in results.values()) < min(r["done"] for i, r in results.items() if i != 3)
    state = wait_idle(batch_server)
    assert state["max_batch"] == 4 and state["active"] == 0


def test_health_reports_rows_waiting_requests_and_aggregate_speed(batch_server: str) -> None:
    client = openai.OpenAI(base_url=f"{batch_server}/v1", api_key="none", max_retries=0, timeout=120)
    seen: list[dict[str, Any]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(health(batch_server))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=lambda: client.chat.completions.create(
        model=MODEL_ID, messages=USER, max_tokens=20, temperature=0)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    watcher.join()
    assert max(s["active"] for s in seen) == 4  # six requests, four rows ...
    assert max(s["waiting"] for s in seen) >= 1  # ... the others wait for one
    assert max(s["tokens_per_second"] for s in seen) > 0
