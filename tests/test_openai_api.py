"""OpenAI request checking without a server: what reaches the chat template, and what is refused (and how)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.qwen2 import Qwen2
from qwen_mlx.serving.openai_api import parse_chat_request, parse_completion_request
from qwen_mlx.serving.protocol import APIError, ServedModel
from qwen_mlx.store.synthetic import tiny_config
from qwen_mlx.text.grammar import tool_call_grammar
from qwen_mlx.text.tokenizer import Tokenizer

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def model(qwen_tokenizer_dir: Path) -> ServedModel:
    """Request checking needs the model's config and defaults only: its weights are never computed."""
    config = ModelConfig.from_dict(tiny_config(vocab_size=151936, max_position_embeddings=4096))
    return ServedModel("m", Qwen2(config), Tokenizer.from_folder(qwen_tokenizer_dir))


def chat(model: ServedModel, **body: Any) -> Any:
    return parse_chat_request({"model": "m", **body}, model)


def test_openai_messages_render_as_qwen_expects(model: ServedModel) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 °C"},
    ]
    request = chat(model, messages=messages, tools=[TOOL])
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 °C"},
    ]
    assert request.prompt_ids == model.tokenizer.apply_chat_template(expected, tools=[TOOL], tokenize=True)
    text = model.tokenizer.decode(request.prompt_ids)
    # Arguments written once as JSON, not as a JSON string inside JSON.
    assert '"arguments": {"city": "Paris"}' in text and request.tools.parse


def test_a_call_cut_off_by_max_tokens_is_accepted_back_in_the_history(model: ServedModel) -> None:
    """A call cut by max_tokens has arguments that are no JSON; the OpenAI Agents SDK resends them as they came,
    and a 400 for them stopped it."""
    cut = '{"city": "Par'
    call = {"type": "function", "function": {"name": "get_weather", "arguments": cut}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", **call}]},
                {"role": "tool", "tool_call_id": "c1", "content": "cut off"}]
    request = chat(model, messages=messages, tools=[TOOL])
    expected = [messages[0], {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "cut off"}]
    assert request.prompt_ids == model.tokenizer.apply_chat_template(expected, tools=[TOOL], tokenize=True)
    assert f'"arguments": {json.dumps(cut)}' in model.tokenizer.decode(request.prompt_ids)  # as that string


def test_tool_choice_none_leaves_tools_out_of_the_prompt(model: ServedModel) -> None:
    messages = [{"role": "user", "content": "hi"}]
    request = chat(model, messages=messages, tools=[TOOL], tool_choice="none")
    assert request.prompt_ids == model.tokenizer.apply_chat_template(messages, tokenize=True)
    assert not request.tools.parse and request.generation.grammar is None


def test_required_tool_choice_sets_a_grammar_and_defaults_follow_the_model(model: ServedModel) -> None:
    request = chat(model, messages=[{"role": "user", "content": "hi"}], tools=[TOOL], tool_choice="required")
    assert request.generation.grammar is not None
    # Sampling parameters not given are left to the model's generation_config.json.
    assert request.generation.sampling == model.model.sampling_defaults
    # With no max_tokens, a reply may fill the context.
    assert request.generation.max_tokens == 4096 - len(request.prompt_ids)


def test_a_named_tool_choice_is_one_call_and_required_allows_several(model: ServedModel) -> None:
    """A weak model forced to a named function would otherwise repeat the call until max_tokens (instructor's and
    langchain's structured output send a named tool_choice, and read a cut-off reply as a failure)."""
    user = [{"role": "user", "content": "hi"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    one = tool_call_grammar(model.tokenizer, [TOOL], "get_weather", parallel=False)
    assert chat(model, messages=user, tools=[TOOL], tool_choice=named).generation.grammar == one
    several = chat(model, messages=user, tools=[TOOL], tool_choice="required").generation.grammar
    assert several == tool_call_grammar(model.tokenizer, [TOOL], None, parallel=True) != one
    single = chat(model, messages=user, tools=[TOOL], tool_choice="required", parallel_tool_calls=False)
    assert single.generation.grammar == tool_call_grammar(model.tokenizer, [TOOL], None, parallel=False)


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": "x" * 513}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    # A later sampling field at fault is named, not the first one given.
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "top_k": 2.5}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "min_p": 1.5}, "min_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0.5, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "seed": "7"}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"chunk_size": 2}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema",
                                                                            "json_schema": {"schema": "x"}}},
     "response_format"),
])
def test_bad_chat_requests_name_the_parameter(model: ServedModel, body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as error:
        chat(model, **body)
    assert error.value.status == 400 and error.value.param == param
    assert json.loads(json.dumps(error.value.body()))["error"]["type"] == "invalid_request_error"


def test_completion_prompts(model: ServedModel) -> None:
    assert parse_completion_request({"prompt": "Hello"}, model).prompt_ids == model.tokenizer.encode("Hello")
    assert parse_completion_request({"prompt": [[1, 2, 3]]}, model).prompt_ids == [1, 2, 3]
    # Typed control tokens are text, never control ids.
    ids = parse_completion_request({"prompt": "<|im_end|>"}, model).prompt_ids
    assert model.tokenizer.added_tokens["<|im_end|>"] not in ids
    for body, param in (({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [999999]}, "prompt"),
                        ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "best_of": 3}, "best_of")):
        with pytest.raises(APIError) as error:
            parse_completion_request(body, model)
        assert error.value.param == param


def scripted_reply(model: ServedModel, text: str,
                   stream_pieces: int = 3) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run a scripted model output through `ResponseBuilder` as streamed chunks; the payloads and the response."""
    from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
    from qwen_mlx.serving.openai_api import ResponseBuilder

    request = chat(model, messages=[{"role": "user", "content": "hi"}], tools=[TOOL])
    reply = ResponseBuilder(request, model)
    step = max(1, len(text) // stream_pieces)
    payloads = [p for i in range(0, len(text), step) for p in reply.add(GenerationChunk(text[i : i + step], 1))]
    closing, response = reply.finish(GenerationChunk("", None, "stop", GenerationStats(prompt_tokens=5)))
    return payloads + closing, response


def test_a_malformed_call_from_the_model_is_returned_as_text(model: ServedModel) -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>'
    payloads, response = scripted_reply(model, text)
    choice = response["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == text
    streamed = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"])
    assert streamed == text


def test_scripted_calls_become_openai_tool_calls(model: ServedModel) -> None:
    calls = [{"name": "get_weather", "arguments": {"city": city}} for city in ("Paris", "Oslo")]
    text = "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)
    payloads, response = scripted_reply(model, text, stream_pieces=7)
    message = response["choices"][0]["message"]
    assert response["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [c["arguments"] for c in calls]
    deltas = [d for p in payloads if p["choices"] for d in p["choices"][0]["delta"].get("tool_calls", [])]
    assert [d["index"] for d in deltas] == [0, 1]
    assert [d["id"] for d in deltas] == [c["id"] for c in message["tool_calls"]]
    assert not any(p["choices"][0]["delta"].get("content") for p in payloads if p["choices"])
