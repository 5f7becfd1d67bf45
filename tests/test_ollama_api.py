"""Ollama's API on `qwen-mlx serve --demo`, driven by the official `ollama` client as it is: chat and generate,
streamed (NDJSON) or not, `format` as a JSON schema or "json" held by the constrained decoder, tools, the model
listings, keep_alive, and Ollama's error shape. The demo model's words are random: what the tests check is what
the API promises (shapes, counts, constraints), and that streamed and whole replies agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest
from conftest import DEMO_KEY

from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
from qwen_mlx.serving.ollama_api import OLLAMA_VERSION, OllamaReply, parameter_count, parse_chat
from qwen_mlx.serving.protocol import APIError, ServedModel
from qwen_mlx.store.synthetic import TINY_QWEN2

MODEL = "qwen2-demo"
USER = [{"role": "user", "content": "Tell me about Paris."}]
GREEDY = {"temperature": 0, "num_predict": 10}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "population": {"type": "integer", "minimum": 0}},
        "required": ["city", "population"], "additionalProperties": False}


def get_weather(city: str, unit: str) -> str:
    """Current weather in a city.

    Args:
        city: the city's name
        unit: celsius or fahrenheit
    """
    return f"sunny in {city}"


@pytest.fixture
def client(demo_server: str) -> ollama.Client:
    return ollama.Client(host=demo_server, headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=120)


def test_chat_counts_and_times_in_nanoseconds(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL, messages=USER, options=GREEDY)
    assert reply.model == MODEL and reply.done and reply.done_reason == "length"
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.eval_count == 10 and reply.prompt_eval_count >= 1  # what was evaluated: a cached prefix is not
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration > 1_000  # ns, not seconds
    assert reply.created_at.endswith("Z")


def test_a_resent_conversation_evaluates_only_its_new_turn(client: ollama.Client, qwen_tokenizer_dir: Path) -> None:
    """Ollama's clients resend the whole history as text each turn; the server matches the reply it generated to
    the ids it was generated as, so only the new turn is evaluated (`prompt_eval_count`)."""
    from qwen_mlx.text.tokenizer import Tokenizer

    first_turn = [{"role": "user", "content": "Name a river in Europe."}]
    first = client.chat(model=MODEL, messages=first_turn, options={"temperature": 0.9, "seed": 3, "num_predict": 12})
    history = [*first_turn, {"role": "assistant", "content": first.message.content},
               {"role": "user", "content": "And one in Africa?"}]
    second = client.chat(model=MODEL, messages=history, options=GREEDY)
    tokenizer = Tokenizer.from_folder(qwen_tokenizer_dir)
    prompt, earlier = (tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
                       for m in (history, first_turn))
    new_turn = len(prompt) - len(earlier) - first.eval_count
    assert second.prompt_eval_count <= new_turn + 2 < len(prompt)


def test_streamed_chat_is_the_whole_reply_in_pieces(client: ollama.Client) -> None:
    whole = client.chat(model=MODEL, messages=USER, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=USER, options=GREEDY, stream=True))
    assert len(parts) > 2 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason == "length"


def test_generate_templated_raw_and_continued_with_its_context(client: ollama.Client) -> None:
    first = client.generate(model=MODEL, prompt="Once upon a time", options=GREEDY)
    prompt = len(first.context) - first.eval_count  # `context`: the prompt's ids and the reply's
    assert first.response and first.done and 1 <= first.prompt_eval_count <= prompt
    streamed = list(client.generate(model=MODEL, prompt="Once upon a time", options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == first.response
    raw = client.generate(model=MODEL, prompt="Once upon a time", raw=True, options=GREEDY)
    assert len(raw.context) - raw.eval_count < prompt  # no chat template around it
    more = client.generate(model=MODEL, prompt="And then?", context=first.context, options=GREEDY)
    new = len(more.context) - more.eval_count - len(first.context)
    # The context it continues is in the cache: only the new prompt is evaluated.
    assert new > 0 and more.prompt_eval_count <= new + 2


@pytest.mark.parametrize("fmt", [CITY, "json"])
def test_format_holds_the_reply_to_json(client: ollama.Client, fmt: Any) -> None:
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "A city as JSON."}], format=fmt,
                        options={"num_predict": 200, "seed": 1})
    value = json.loads(reply.message.content)
    assert reply.done_reason == "stop"
    if isinstance(fmt, dict):
        jsonschema.validate(value, fmt)
    else:
        assert isinstance(value, dict)


def test_tools_reach_the_model_and_tool_results_go_back(client: ollama.Client) -> None:
    plain = client.chat(model=MODEL, messages=USER, options={"num_predict": 1})
    with_tools = client.chat(model=MODEL, messages=USER, tools=[get_weather], options={"num_predict": 1})
    assert with_tools.prompt_eval_count > plain.prompt_eval_count + 50  # the function's schema is in the prompt
    turn = [*USER, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "content": "sunny, 21 degrees", "tool_name": "get_weather"}]
    answered = client.chat(model=MODEL, messages=turn, tools=[get_weather], options={"num_predict": 1})
    assert answered.prompt_eval_count > 10  # the new turns (cached ones are not evaluated): the call, its result


def test_a_tool_call_in_the_reply_is_the_messages_tool_calls(qwen_tokenizer_dir: Path) -> None:
    """The model's `<tool_call>` markup, as it streams in pieces, becomes Ollama's tool_calls (arguments an object)
    and never content; the client's own response type reads it."""
    from qwen_mlx.text.tokenizer import Tokenizer

    served = ServedModel(MODEL, FakeModel(), Tokenizer.from_folder(qwen_tokenizer_dir))
    request = parse_chat({"model": MODEL, "messages": USER, "tools": [ollama._utils.convert_function_to_tool(
        get_weather).model_dump(exclude_none=True)]}, served)
    reply = OllamaReply(request, served)
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' \
           '\n</tool_call>'
    lines = [line for i in range(0, len(text), 7) for line in reply.add(GenerationChunk(text[i:i + 7], 1))]
    closing, whole = reply.finish(GenerationChunk("", None, "stop", GenerationStats(prompt_tokens=9,
                                                                                     generation_tokens=30)))
    streamed = [ollama.ChatResponse(**line) for line in lines + closing]
    assert "".join(p.message.content for p in streamed) == "Let me check."
    [call] = [c for p in streamed for c in p.message.tool_calls or []]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Oslo", "unit": "celsius"}
    response = ollama.ChatResponse(**whole)
    assert response.message.content == "Let me check." and response.message.tool_calls[0].function.name == \
        "get_weather" and response.eval_count == 30


class FakeModel:
    """What request checking reads of a model, without weights."""

    def __init__(self) -> None:
        from qwen_mlx.model.config import ModelConfig
        from qwen_mlx.model.generation_config import SamplingParams

        self.config = ModelConfig.from_dict(TINY_QWEN2)
        self.sampling_defaults = SamplingParams()


def test_listings_show_ps_and_version(client: ollama.Client, demo_server: str) -> None:
    client.chat(model=MODEL, messages=USER, options={"num_predict": 1})
    [model] = client.list().models
    assert model.model == MODEL and model.size > 0 and model.details.family == "qwen2"
    assert model.details.format == "safetensors" and model.details.quantization_level == "F16"
    shown = client.show(MODEL)
    assert shown.modelinfo["qwen2.context_length"] == TINY_QWEN2["max_position_embeddings"]
    assert shown.modelinfo["general.parameter_count"] == parameter_count(TINY_QWEN2)
    assert "<|im_start|>" in shown.template and "tools" in shown.capabilities
    [running] = client.ps().models
    assert running.model == MODEL and running.size > 0 and running.context_length == 32768
    version = httpx.get(f"{demo_server}/api/version", timeout=10).json()
    assert version == {"version": OLLAMA_VERSION}


@pytest.mark.parametrize("keep_alive", ["300000000000", 1e300, "2562047h"])
def test_a_keep_alive_of_centuries_keeps_the_model_and_ps_answers(client: ollama.Client, keep_alive: Any) -> None:
    """A keep-alive too long for a date (past Go's 292-year Duration, as Ollama parses it) is "for ever": /api/ps
    shows the far date it shows for -1 instead of failing while the model stays loaded."""
    forever = client.generate(model=MODEL, keep_alive=-1)
    [pinned] = client.ps().models
    assert client.generate(model=MODEL, keep_alive=keep_alive).done_reason == "load"
    [running] = client.ps().models
    assert running.model == MODEL and running.expires_at.year == pinned.expires_at.year > 2200
    assert forever.done and client.generate(model=MODEL, keep_alive="5m").done_reason == "load"


def test_parameter_count_of_qwen25_7b_is_its_published_size() -> None:
    from qwen_mlx.store.synthetic import SHAPES

    assert round(parameter_count(SHAPES["qwen2.5-7b"]) / 1e9, 2) == 7.62
    assert round(parameter_count(SHAPES["qwen2.5-0.5b"]) / 1e9, 2) == 0.49


def test_empty_requests_load_and_unload_the_model(client: ollama.Client) -> None:
    unloaded = client.generate(model=MODEL, keep_alive=0)
    assert unloaded.done_reason == "unload" and client.ps().models == []
    loaded = client.generate(model=MODEL)
    assert loaded.done_reason == "load" and [m.model for m in client.ps().models] == [MODEL]


@pytest.mark.parametrize(("call", "status", "needle"), [
    ({"model": "no-such-model", "messages": USER}, 404, "qwen-mlx pull no-such-model"),
    ({"model": MODEL, "messages": USER, "options": {"mirostat": 2}}, 400, "options.mirostat"),
    ({"model": MODEL, "messages": USER, "options": {"num_gpus": 1}}, 400, "options.num_gpus"),
    ({"model": MODEL, "messages": USER, "think": True}, 400, "thinking"),
    ({"model": MODEL, "messages": USER, "format": {"type": "object", "properties": 5}}, 400, "format: "),
    ({"model": MODEL, "messages": USER, "keep_alive": "soon"}, 400, "keep_alive"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400, "images"),
    ({"model": MODEL, "messages": USER, "options": {"num_ctx": 8}}, 400, "num_ctx"),
    ({"model": MODEL, "messages": USER, "options": {"stop": [str(i) for i in range(17)]}}, 400,
     "options.stop: at most 16"),
    ({"model": MODEL, "messages": USER, "options": {"stop": "x" * 513}}, 400, "of 513 characters"),
])
def test_mistakes_are_ollama_errors(client: ollama.Client, call: dict[str, Any], status: int, needle: str) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(**call)
    assert error.value.status_code == status and needle in error.value.error


def test_runner_options_change_nothing_and_are_accepted(client: ollama.Client) -> None:
    plain = client.chat(model=MODEL, messages=USER, options=GREEDY)
    tuned = client.chat(model=MODEL, messages=USER, options={**GREEDY, "num_thread": 4, "num_gpu": 99,
                                                             "use_mmap": True, "num_batch": 512})
    assert tuned.message.content == plain.message.content


def test_the_api_key_is_required(demo_server: str) -> None:
    response = httpx.post(f"{demo_server}/api/chat", json={"model": MODEL, "messages": USER}, timeout=30)
    assert response.status_code == 401 and "API key" in response.json()["error"]
    unknown = httpx.get(f"{demo_server}/api/embed", timeout=30)
    assert unknown.status_code == 404 and "/api/chat" in unknown.json()["error"]


@pytest.mark.parametrize("stream", ["no", 0, [], {"on": False}])
def test_pull_refuses_a_stream_that_is_not_true_or_false(demo_server: str, stream: Any) -> None:
    """Before anything is looked up or fetched: a string or number is no answer to "stream?"."""
    response = httpx.post(f"{demo_server}/api/pull", json={"model": "qwen2.5:0.5b", "stream": stream},
                          headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=30)
    assert response.status_code == 400 and response.json() == {"error": "stream must be true or false"}


def test_an_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(APIError, match="'raw'"):
        parse_chat({"model": MODEL, "messages": USER, "raw": True}, None)  # type: ignore[arg-type]
