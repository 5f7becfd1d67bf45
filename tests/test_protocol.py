"""The serving pipeline the three wire formats share (`serving/protocol.py`): every API's chat request takes the
same path to a `GenerationRequest`, and every API's clients get their resent replies matched to the ids the
server generated them as."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
from qwen_mlx.engine.prefix_cache import ReplyMemory
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.serving import anthropic_api, ollama_api, openai_api
from qwen_mlx.serving.protocol import APIError, ReplyParts, ServedModel
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
    parts = ReplyParts(served, parse_tools=True, forced_tools=False)
    ids = tokenizer.encode(REPLY)
    for token in ids:
        parts.add(GenerationChunk(tokenizer.decode([token]), token))
    parts.finish(GenerationChunk("", None, "stop", GenerationStats()))
    assert replies.ids_for(REPLY) == ids
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    with_call = ReplyParts(served, parse_tools=True, forced_tools=False)
    out = with_call.add(GenerationChunk(call, 1)) + with_call.finish(GenerationChunk("", None, "stop",
                                                                                     GenerationStats()))
    assert [type(p).__name__ for p in out] == ["ToolCall"] and replies.ids_for(call) is None
