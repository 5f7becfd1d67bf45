"""The serving pipeline the three wire formats share (`serving/protocol.py`): every API's chat request takes the
same path to a `GenerationRequest`, and every API's clients get their resent replies matched to the ids the
server generated them as."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
from qwen_mlx.engine.prefix_cache import ReplyMemory
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.serving import anthropic_api, ollama_api, openai_api
from qwen_mlx.serving.protocol import APIError, ReplyParts, ServedModel, ToolReading
from qwen_mlx.store.synthetic import TINY_QWEN2
from qwen_mlx.text.tokenizer import Tokenizer

REPLY = "Paris, of course."


class FakeModel:
    """What request checking reads of a model, without weights."""

    def __init__(self, context: int = 32768) -> None:
        self.config = ModelConfig.from_dict({**TINY_QWEN2, "max_position_embeddings": context})
        self.sampling_defaults = SamplingParams()


def openai_chat(served: ServedModel, history: list[dict[str, Any]], **extra: Any) -> list[int]:
    body = {"model": "m", "messages": history, "max_tokens": 4, **extra}
    return openai_api.parse_chat_request(body, served).generation.prompt_ids


def ollama_chat(served: ServedModel, history: list[dict[str, Any]], **extra: Any) -> list[int]:
    body = {"model": "m", "messages": history, "options": {"num_predict": 4}, **extra}
    return ollama_api.parse_chat(body, served).generation.prompt_ids


def anthropic_chat(served: ServedModel, history: list[dict[str, Any]], **extra: Any) -> list[int]:
    body = {"model": "m", "messages": history, "max_tokens": 4, **extra}
    return anthropic_api.parse_messages(body, served).generation.prompt_ids


APIS: dict[str, Callable[..., list[int]]] = {"openai": openai_chat, "ollama": ollama_chat,
                                             "anthropic": anthropic_chat}


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(qwen_tokenizer_dir)


def contains(ids: list[int], run: list[int]) -> bool:
    return any(ids[i:i + len(run)] == run for i in range(len(ids) - len(run) + 1))


@pytest.mark.parametrize("api", sorted(APIS))
def test_a_resent_reply_is_read_as_the_ids_it_was_generated_as(api: str, tokenizer: Tokenizer) -> None:
    # A reply generated a character at a time: the same text, other ids than encoding it would give.
    generated = [t for c in REPLY for t in tokenizer.encode(c)]
    assert generated != tokenizer.encode(REPLY) and tokenizer.decode(generated) == REPLY
    replies = ReplyMemory()
    replies.remember(REPLY, generated)
    history = [{"role": "user", "content": "The capital of France?"}, {"role": "assistant", "content": REPLY},
               {"role": "user", "content": "Why?"}]
    ids = APIS[api](ServedModel("m", FakeModel(), tokenizer, replies=replies), history)
    assert contains(ids, generated)
    plain = APIS[api](ServedModel("m", FakeModel(), tokenizer), history)
    assert not contains(plain, generated) and contains(plain, tokenizer.encode(REPLY))


@pytest.mark.parametrize("api", sorted(APIS))
def test_a_prompt_past_the_context_is_refused_in_the_same_words(api: str, tokenizer: Tokenizer) -> None:
    served = ServedModel("m", FakeModel(context=64), tokenizer)
    with pytest.raises(APIError) as error:
        APIS[api](served, [{"role": "user", "content": "word " * 80}])
    assert error.value.status == 400 and "maximum context length is 64 tokens" in error.value.message


@pytest.mark.parametrize("api", sorted(APIS))
def test_a_template_that_refuses_the_messages_is_a_400(api: str, qwen_tokenizer_dir: Path) -> None:
    strict = Tokenizer.from_folder(qwen_tokenizer_dir)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(APIError) as error:
        APIS[api](ServedModel("m", FakeModel(), strict), [{"role": "user", "content": "hi"}])
    assert error.value.status == 400 and "roles must alternate" in error.value.message


def test_a_finished_reply_is_remembered_once_and_never_with_a_tool_call(tokenizer: Tokenizer) -> None:
    replies = ReplyMemory()
    served = ServedModel("m", FakeModel(), tokenizer, replies=replies)
    parts = ReplyParts(served, ToolReading(parse=True))
    ids = tokenizer.encode(REPLY)
    for token in ids:
        parts.add(GenerationChunk(tokenizer.decode([token]), token))
    parts.finish(GenerationChunk("", None, "stop", GenerationStats()))
    assert replies.ids_for(REPLY) == ids
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    with_call = ReplyParts(served, ToolReading(parse=True))
    out = with_call.add(GenerationChunk(call, 1)) + with_call.finish(GenerationChunk("", None, "stop",
                                                                                     GenerationStats()))
    assert [type(p).__name__ for p in out] == ["ToolCall"] and replies.ids_for(call) is None


WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = {"openai": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}],
         "ollama": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}],
         "anthropic": [{"name": "get_weather", "input_schema": WEATHER_PARAMETERS}]}
PARIS = ("get_weather", {"city": "Paris"})
FENCED_CALL = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'


def scripted(api: str, served: ServedModel, text: str, step: int,
             **extra: Any) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """A scripted model reply through `api`'s request parser and reply builder, `step` characters a chunk: the
    text its stream showed, and the (name, arguments) of the calls in its whole response."""
    user = [{"role": "user", "content": "What's the weather in Paris?"}]
    chunks = [GenerationChunk(text[i : i + step], 1) for i in range(0, len(text), step)]
    last = GenerationChunk("", None, "stop", GenerationStats())
    body = {"model": "m", "messages": user, "tools": TOOLS[api], **extra}
    if api == "openai":
        reply = openai_api.ResponseBuilder(openai_api.parse_chat_request({**body, "max_tokens": 64}, served), served)
        payloads = [p for c in chunks for p in reply.add(c)]
        closing, response = reply.finish(last)
        shown = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads + closing if p["choices"])
        calls = response["choices"][0]["message"].get("tool_calls", [])
        return shown, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    if api == "ollama":
        ollama = ollama_api.OllamaReply(ollama_api.parse_chat({**body, "stream": True}, served), served)
        lines = [line for c in chunks for line in ollama.add(c)]
        closing, whole = ollama.finish(last)
        shown = "".join(line["message"]["content"] for line in lines + closing)
        return shown, [(c["function"]["name"], c["function"]["arguments"])
                       for c in whole["message"].get("tool_calls", [])]
    anthropic = anthropic_api.AnthropicReply(anthropic_api.parse_messages({**body, "max_tokens": 64}, served),
                                             served)
    events = [e for c in chunks for e in anthropic.add(c)]
    closing, message = anthropic.finish(last)
    shown = "".join(e["delta"]["text"] for _, e in events + closing if e.get("delta", {}).get("type") == "text_delta")
    return shown, [(b["name"], b["input"]) for b in message["content"] if b["type"] == "tool_use"]


@pytest.mark.parametrize("api", sorted(APIS))
def test_a_reply_that_is_only_a_fenced_json_call_is_a_tool_call_on_every_api(api: str, tokenizer: Tokenizer) -> None:
    """Qwen2.5-Coder-0.5B answers "What's the weather in Paris?" with tools this way; no part of it is content."""
    served = ServedModel("m", FakeModel(), tokenizer)
    for step in (1, 4, len(FENCED_CALL)):
        assert scripted(api, served, FENCED_CALL, step) == ("", [PARIS])
    other = FENCED_CALL.replace("get_weather", "get_stock")  # JSON naming no given tool is the model's text
    assert scripted(api, served, other, 3) == (other, [])


@pytest.mark.parametrize(("api", "off"), [("openai", {"parallel_tool_calls": False}),
                                          ("anthropic", {"tool_choice": {"type": "auto",
                                                                         "disable_parallel_tool_use": True}})])
def test_with_parallel_calls_off_only_a_json_list_of_one_call_is_a_call(api: str, off: dict[str, Any],
                                                                         tokenizer: Tokenizer) -> None:
    served = ServedModel("m", FakeModel(), tokenizer)
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert scripted(api, served, f"[{call}]", 5, **off) == ("", [PARIS])
    assert scripted(api, served, f"[{call}, {call}]", 5, **off) == (f"[{call}, {call}]", [])
    assert scripted(api, served, f"[{call}, {call}]", 5) == ("", [PARIS, PARIS])


@pytest.mark.parametrize(("api", "required"), [("openai", {"tool_choice": "required"}),
                                               ("anthropic", {"tool_choice": {"type": "any"}})])
def test_a_required_call_followed_by_the_newline_the_grammar_allows_shows_no_text(api: str, required: dict[str, Any],
                                                                                 tokenizer: Tokenizer) -> None:
    served = ServedModel("m", FakeModel(), tokenizer)
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    assert scripted(api, served, text, 3, **required) == ("", [PARIS])
