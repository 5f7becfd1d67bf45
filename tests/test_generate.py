"""Generation: stop conditions, streaming text, statistics, tools, cancel, input forms and bad input."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import pytest
from hf_models import save_tiny_qwen2

import qwen_mlx
from qwen_mlx import QwenMLXError
from qwen_mlx.model.cache import PromptCache
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.generation_config import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[qwen_mlx.load, qwen_mlx.Tokenizer]:
    return qwen_mlx.load(save_tiny_qwen2(tmp_path_factory.mktemp("tiny")))


@dataclass
class ScriptedModel:
    """A stand-in model whose greedy choice follows a script, so tests can make it say a chosen reply.

    It keeps a real KV cache in step (one position per token) so prefix reuse and limits behave as with a model.
    """

    config: ModelConfig
    script: list[int]
    prompt_len: int = 0
    sampling_defaults: SamplingParams = field(default_factory=SamplingParams)

    @property
    def layers(self) -> list[None]:
        return [None]

    def __call__(self, ids: mx.array, cache: list) -> mx.array:
        L = ids.shape[1]
        cache[0].update_and_fetch(mx.zeros((1, 1, L, 2)), mx.zeros((1, 1, L, 2)))
        produced = cache[0].offset - self.prompt_len
        token = self.script[produced] if 0 <= produced < len(self.script) else 0
        return mx.broadcast_to((mx.arange(self.config.vocab_size) == token).astype(mx.float32) * 10,
                               (1, L, self.config.vocab_size))


def scripted(tokenizer: qwen_mlx.Tokenizer, prompt: list[int], reply: str, eos: bool = True) -> ScriptedModel:
    script = tokenizer.encode(reply, allow_special=True) + ([tokenizer.eos_token_ids[0]] if eos else [])
    config = ModelConfig(hidden_size=8, num_hidden_layers=1, intermediate_size=8, num_attention_heads=1,
                         num_key_value_heads=1, vocab_size=tokenizer.vocab_size, max_position_embeddings=4096)
    return ScriptedModel(config, script, len(prompt))


def chunks_for(model: ScriptedModel, tokenizer: qwen_mlx.Tokenizer, prompt: list[int], **kwargs: object) -> list:
    return list(qwen_mlx.stream_generate(model, tokenizer, prompt, temperature=0, **kwargs))


PROMPT = [1, 2, 3]


def test_reply_streams_and_ends_at_end_of_turn(tiny: tuple) -> None:
    _, tokenizer = tiny
    reply = "Hello 你好 👩‍💻 مرحبا!"
    model = scripted(tokenizer, PROMPT, reply)
    chunks = chunks_for(model, tokenizer, PROMPT)
    assert "".join(c.text for c in chunks) == reply
    assert all("\ufffd" not in c.text for c in chunks)
    final = chunks[-1]
    assert final.finish_reason == "stop" and final.token is None
    assert final.stats.generation_tokens == len(tokenizer.encode(reply))


def test_stop_string_straddling_tokens_is_never_shown(tiny: tuple) -> None:
    _, tokenizer = tiny
    model = scripted(tokenizer, PROMPT, "The answer is 42.\nObservation: none\nmore text")
    chunks = chunks_for(model, tokenizer, PROMPT, stop=["\nObservation:"])
    shown = [c.text for c in chunks]
    assert "".join(shown) == "The answer is 42."
    assert not any("\n" in s or "Obs" in s for s in shown)
    assert chunks[-1].finish_reason == "stop"


def test_text_held_for_a_possible_stop_is_released_when_it_is_not_one(tiny: tuple) -> None:
    _, tokenizer = tiny
    model = scripted(tokenizer, PROMPT, "a\nObserve the sky")
    chunks = chunks_for(model, tokenizer, PROMPT, stop=["\nObservation:"])
    assert "".join(c.text for c in chunks) == "a\nObserve the sky"


def test_max_tokens_ends_with_length(tiny: tuple) -> None:
    model, tokenizer = tiny
    result = qwen_mlx.generate(model, tokenizer, [{"role": "user", "content": "hi"}], temperature=0, max_tokens=7)
    assert result.finish_reason == "length"
    assert len(result.tokens) == result.stats.generation_tokens == 7


def test_tool_calls_are_parsed_from_the_reply(tiny: tuple) -> None:
    _, tokenizer = tiny
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    model = scripted(tokenizer, prompt, reply)
    result = qwen_mlx.generate(model, tokenizer, messages, tools=tools, temperature=0)
    assert result.text == reply
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert result.tool_call_errors == []


def test_cancel_stops_within_one_token(tiny: tuple) -> None:
    model, tokenizer = tiny
    cancel = threading.Event()
    tokens = []
    for chunk in qwen_mlx.stream_generate(model, tokenizer, "hello", temperature=0, max_tokens=200, cancel=cancel):
        if chunk.token is not None:
            tokens.append(chunk.token)
        if len(tokens) == 3:
            cancel.set()
        if chunk.finish_reason:
            assert chunk.finish_reason == "cancelled"
    assert len(tokens) == 3


def test_statistics_are_reported(tiny: tuple) -> None:
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "Tell me a story"}]
    result = qwen_mlx.generate(model, tokenizer, messages, temperature=0, max_tokens=10)
    stats = result.stats
    assert stats.prompt_tokens == len(tokenizer.apply_chat_template(messages, tokenize=True))
    assert stats.prefilled_tokens == stats.prompt_tokens
    assert stats.generation_tokens == 10
    assert stats.time_to_first_token > 0 and stats.prompt_tps > 0 and stats.generation_tps > 0
    assert stats.peak_memory_gb > 0
    assert stats.context_tokens == stats.prompt_tokens + 9  # the last token is sampled, never fed back
    assert stats.context_length == 2048


def test_prompt_forms_agree(tiny: tuple) -> None:
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "hi"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    text = tokenizer.apply_chat_template(messages)
    by_messages = qwen_mlx.generate(model, tokenizer, messages, temperature=0, max_tokens=8).tokens
    assert qwen_mlx.generate(model, tokenizer, ids, temperature=0, max_tokens=8).tokens == by_messages
    # A plain string is ordinary text: its `<|im_start|>` is not a control token, so the reply differs.
    assert tokenizer.encode(text) != ids


def test_seeded_sampling_reproduces_a_reply(tiny: tuple) -> None:
    model, tokenizer = tiny
    run = lambda seed: qwen_mlx.generate(model, tokenizer, "once upon", temperature=1.0, seed=seed,  # noqa: E731
                                         max_tokens=16).tokens
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_prompt_longer_than_the_context_fails_before_any_compute(tmp_path: Path) -> None:
    model, tokenizer = qwen_mlx.load(save_tiny_qwen2(tmp_path, max_position_embeddings=64))
    prompt_cache = PromptCache.new(model)
    with pytest.raises(QwenMLXError, match="prompt is 100 tokens but the model's context is 64"):
        qwen_mlx.generate(model, tokenizer, list(range(100)), prompt_cache=prompt_cache)
    assert prompt_cache.offset == 0


def test_generation_stops_at_the_context_limit(tmp_path: Path) -> None:
    model, tokenizer = qwen_mlx.load(save_tiny_qwen2(tmp_path, max_position_embeddings=64))
    result = qwen_mlx.generate(model, tokenizer, list(range(50)), temperature=0, max_tokens=100)
    assert result.finish_reason == "length"
    assert 50 + len(result.tokens) == 64


@pytest.mark.parametrize(
    ("prompt", "kwargs", "message"),
    [
        ([], {}, "prompt is empty"),
        ([10**7], {}, "outside the vocabulary"),
        ([{"content": "no role"}], {}, "needs a 'role'"),
        ("hi", {"max_tokens": 9000}, "between 1 and 8192"),
        ("hi", {"tools": [{"type": "function"}]}, "tools need chat messages"),
    ],
)
def test_bad_generation_input_is_a_user_error(tiny: tuple, prompt: object, kwargs: dict, message: str) -> None:
    model, tokenizer = tiny
    with pytest.raises(QwenMLXError, match=message):
        qwen_mlx.generate(model, tokenizer, prompt, **kwargs)


def test_cancel_during_a_long_prompt_stops_between_prefill_chunks(tiny: tuple) -> None:
    model, tokenizer = tiny
    cancel = threading.Event()
    prompt_cache = PromptCache.new(model)
    calls = 0
    original = model.__call__

    class CountingModel:
        """Cancels once the second prefill chunk has run, as a user pressing Stop mid-prompt would."""

        config, layers, sampling_defaults = model.config, model.layers, model.sampling_defaults

        def __call__(self, ids: mx.array, cache: list) -> mx.array:
            nonlocal calls
            calls += 1
            if calls == 2:
                cancel.set()
            return original(ids, cache=cache)

    chunks = list(qwen_mlx.stream_generate(CountingModel(), tokenizer, list(range(1, 101)), temperature=0,
                                           prefill_step_size=16, prompt_cache=prompt_cache, cancel=cancel))
    assert [c.finish_reason for c in chunks] == ["cancelled"]
    assert calls == 2
    assert prompt_cache.tokens == list(range(1, 33)) and prompt_cache.offset == 32


def test_prefill_progress_is_reported_after_each_chunk(tiny: tuple) -> None:
    model, tokenizer = tiny
    seen: list[tuple[int, int]] = []
    result = list(qwen_mlx.stream_generate(model, tokenizer, list(range(1, 101)), temperature=0, max_tokens=2,
                                           prefill_step_size=32, on_prefill=lambda done, total: seen.append(
                                               (done, total))))
    assert seen == [(32, 100), (64, 100), (96, 100), (99, 100)]
    assert result[-1].stats.prefilled_tokens == 100
