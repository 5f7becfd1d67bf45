"""Speculative decoding: every draft source leaves greedy replies exactly as plain decoding gives them, speculative
sampling keeps the model's distribution, and a right guess saves forward passes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from hf_models import save_tiny_qwen2

import qwen_mlx
from qwen_mlx import CacheSettings, PromptCache, QwenMLXError
from qwen_mlx.engine.sample import Sampler
from qwen_mlx.engine.speculative import PredictionSource, PromptLookup, accept_drafts
from qwen_mlx.model.generation_config import SamplingParams

GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
MESSAGES = [{"role": "user", "content": "Tell me about the old town by the river."}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "n": {"type": "integer"}}, "required": ["name", "n"],
          "additionalProperties": False}

Loaded = tuple[Any, qwen_mlx.Tokenizer]


@pytest.fixture(scope="module", params=[
    pytest.param({"tie_word_embeddings": True}, id="tied"),
    pytest.param({"tie_word_embeddings": False, "num_attention_heads": 4, "num_key_value_heads": 1}, id="untied-gqa4"),
])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return qwen_mlx.load(save_tiny_qwen2(tmp_path_factory.mktemp("target"), seed=1, hidden_size=128,
                                         intermediate_size=256, **request.param))


@pytest.fixture(scope="module")
def draft(tmp_path_factory: pytest.TempPathFactory) -> qwen_mlx.DraftModel:
    """Another random model with the same tokenizer: its guesses are mostly wrong."""
    return qwen_mlx.load_draft(save_tiny_qwen2(tmp_path_factory.mktemp("draft"), seed=7, num_hidden_layers=1))


def plain(target: Loaded, prompt: Any, **kwargs: Any) -> qwen_mlx.GenerationResult:
    return qwen_mlx.generate(*target, prompt, **{**GREEDY, "max_tokens": 40, **kwargs})


def half_wrong(tokens: list[int], vocab: int) -> str | list[int]:
    """The reply with every other run of 6 tokens replaced by other ids."""
    return [t if (i // 6) % 2 == 0 else (t + 1 + i) % vocab for i, t in enumerate(tokens)]


# --- exact greedy replies, whatever the source ---


def test_a_prediction_that_is_the_reply_gives_it_in_under_a_third_of_the_passes(target: Loaded) -> None:
    model, tokenizer = target
    expected = plain(target, MESSAGES)
    fast = plain(target, MESSAGES, prediction=expected.tokens)
    assert fast.tokens == expected.tokens
    stats = fast.stats
    assert stats.decode_passes / stats.generation_tokens <= 0.35
    # Each pass gives one token of the model's own choosing; the rest are drafts it agreed with.
    assert stats.generation_tokens == stats.decode_passes + stats.accepted_draft_tokens
    assert stats.draft_tokens == stats.accepted_draft_tokens


@pytest.mark.parametrize("source", ["half-wrong prediction", "wrong prediction", "prompt lookup", "draft model",
                                    "the model itself as draft"])
def test_greedy_replies_are_the_plain_ones_with_every_source(target: Loaded, draft: qwen_mlx.DraftModel,
                                                             source: str) -> None:
    model, tokenizer = target
    expected = plain(target, MESSAGES)
    kwargs: dict[str, Any] = {
        "half-wrong prediction": {"prediction": half_wrong(expected.tokens, 300)},
        "wrong prediction": {"prediction": "nothing like the reply at all, not one token of it"},
        "prompt lookup": {"prompt_lookup": 4},
        "draft model": {"draft_model": draft, "num_draft_tokens": 3},
        "the model itself as draft": {"draft_model": target},
    }[source]
    result = plain(target, MESSAGES, **kwargs)
    assert result.tokens == expected.tokens
    assert result.text == expected.text


@pytest.mark.parametrize("extra", [
    pytest.param({"repetition_penalty": 1.3}, id="repetition-penalty"),
    pytest.param({"json_schema": SCHEMA, "max_tokens": 60}, id="json-schema"),
    pytest.param({"logprobs": 3}, id="logprobs"),
    pytest.param({"kv_bits": 8, "kv_group_size": 32}, id="quantized-kv-cache"),
])
def test_greedy_replies_stay_the_plain_ones_with_processors_and_caches(target: Loaded, extra: dict[str, Any]) -> None:
    expected = plain(target, MESSAGES, **extra)
    for kwargs in ({"prediction": expected.tokens}, {"draft_model": target, "num_draft_tokens": 3},
                   {"prediction": half_wrong(expected.tokens, 300)}):
        result = plain(target, MESSAGES, **extra, **kwargs)
        assert result.tokens == expected.tokens, kwargs
        assert result.stats.accepted_draft_tokens > 0, kwargs
    if "logprobs" in extra:
        chunks = [c for c in qwen_mlx.stream_generate(*target, MESSAGES, **GREEDY, max_tokens=40, logprobs=3,
                                                      prediction=expected.tokens) if c.token is not None]
        reference = [c for c in qwen_mlx.stream_generate(*target, MESSAGES, **GREEDY, max_tokens=40, logprobs=3)
                     if c.token is not None]
        for a, b in zip(chunks, reference, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


def test_stop_strings_end_a_speculated_reply_where_they_end_the_plain_one(target: Loaded) -> None:
    model, tokenizer = target
    reference = plain(target, MESSAGES)
    stop = reference.text[len(reference.text) // 2 : len(reference.text) // 2 + 3]
    expected = plain(target, MESSAGES, stop=[stop])
    fast = plain(target, MESSAGES, stop=[stop], prediction=reference.tokens)
    assert fast.text == expected.text and fast.finish_reason == expected.finish_reason == "stop"
    assert fast.tokens == expected.tokens


def test_several_turns_with_prompt_caches_for_the_model_and_its_draft(target: Loaded) -> None:
    model, tokenizer = target
    conversation = list(MESSAGES)
    fast_cache, plain_cache = PromptCache.new(model), PromptCache.new(model)
    for question in ("And then?", "Why?"):
        expected = plain(target, conversation, prompt_cache=plain_cache)
        fast = plain(target, conversation, prompt_cache=fast_cache, draft_model=target, num_draft_tokens=3)
        assert fast.tokens == expected.tokens
        assert fast.stats.prefilled_tokens == expected.stats.prefilled_tokens
        assert fast_cache.tokens == plain_cache.tokens
        assert fast_cache.draft is not None and fast_cache.draft.tokens == fast_cache.tokens[: len(
            fast_cache.draft.tokens)]
        conversation += [{"role": "assistant", "content": expected.text}, {"role": "user", "content": question}]


def test_the_context_limit_holds_with_drafts(tmp_path: Path) -> None:
    target = qwen_mlx.load(save_tiny_qwen2(tmp_path, max_position_embeddings=64))
    expected = plain(target, list(range(50)), max_tokens=100)
    fast = plain(target, list(range(50)), max_tokens=100, prediction=expected.tokens)
    assert fast.tokens == expected.tokens and 50 + len(fast.tokens) == 64
    assert fast.finish_reason == "length"


# --- what is refused ---


def test_a_rotating_cache_is_refused_with_speculation(target: Loaded) -> None:
    with pytest.raises(QwenMLXError, match="rotating"):
        plain(target, MESSAGES, max_kv_size=64, prompt_lookup=4)
    rotating = PromptCache.new(target[0], CacheSettings(max_kv_size=64))
    with pytest.raises(QwenMLXError, match="rotating"):
        plain(target, MESSAGES, prompt_cache=rotating, prompt_lookup=4)


def test_a_draft_with_another_tokenizer_is_refused(target: Loaded, qwen_tokenizer_dir: Path) -> None:
    other = qwen_mlx.Tokenizer.from_folder(qwen_tokenizer_dir)
    with pytest.raises(QwenMLXError, match="tokenizer differs"):
        plain(target, MESSAGES, draft_model=(target[0], other))
    with pytest.raises(QwenMLXError, match="draft_model must be"):
        plain(target, MESSAGES, draft_model=target[0])


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"num_draft_tokens": 0, "prompt_lookup": 2}, "num_draft_tokens"),
    ({"prompt_lookup": 17}, "prompt_lookup"),
    ({"prediction": 5}, "prediction"),
    ({"prediction": [1, "x"]}, "prediction"),
])
def test_bad_speculation_settings_are_one_line_errors(target: Loaded, kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(QwenMLXError, match=needle) as error:
        plain(target, MESSAGES, **kwargs)
    assert error.value.field == needle


def test_drafts_over_a_larger_or_smaller_vocabulary_are_handled(tmp_path: Path) -> None:
    """Qwen2.5-0.5B's embedding has 151,936 rows and the 7B's 152,064: distributions are compared over the ids
    both have, and a draft id the model does not have is never proposed."""
    target = qwen_mlx.load(save_tiny_qwen2(tmp_path / "t", vocab_size=384))
    for rows in (330, 448):
        model, _ = qwen_mlx.load(save_tiny_qwen2(tmp_path / str(rows), seed=rows, vocab_size=rows))
        draft = (model, target[1])
        for temperature in (0, 1.0):
            expected = plain(target, MESSAGES, temperature=temperature, seed=3)
            result = plain(target, MESSAGES, temperature=temperature, seed=3, draft_model=draft)
            assert all(t < 384 for t in result.tokens)
            if temperature == 0:
                assert result.tokens == expected.tokens


# --- sampling keeps the model's distribution ---


def test_the_acceptance_rule_draws_from_the_models_distribution() -> None:
    """Over many rounds with a draft distribution q unlike p, the first token that stands is distributed as p."""
    p = mx.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = mx.array([[0.05, 0.1, 0.15, 0.2, 0.5]])
    sampler = Sampler(SamplingParams(temperature=1.0), seed=0)
    draws = mx.random.categorical(mx.log(q[0]), shape=(6000,), key=mx.random.key(1)).tolist()
    counts = [0] * 5
    for d in draws:
        n, following = accept_drafts(p, q, [d], sampler)
        counts[d if n == 1 else following] += 1
    for i, expected in enumerate(p[0].tolist()):
        assert counts[i] / len(draws) == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / 6000))


def test_the_acceptance_rule_with_guesses_chosen_outright() -> None:
    """Lookup guesses have q(x) = 1: x stands with probability p(x), else the token is drawn from p without x."""
    p = mx.array([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    sampler = Sampler(SamplingParams(temperature=1.0), seed=5)
    counts = [0, 0, 0]
    for _ in range(4000):
        n, following = accept_drafts(p, None, [1], sampler)
        counts[1 if n == 1 else following] += 1
    for i, expected in enumerate([0.6, 0.3, 0.1]):
        assert counts[i] / 4000 == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / 4000))


def test_a_seed_reproduces_a_speculatively_sampled_reply(target: Loaded, draft: qwen_mlx.DraftModel) -> None:
    def reply(seed: int) -> list[int]:
        return plain(target, MESSAGES, temperature=1.0, seed=seed, draft_model=target, num_draft_tokens=3).tokens

    assert reply(4) == reply(4)
    assert reply(4) != reply(5)


# --- the draft sources themselves ---


def test_prompt_lookup_proposes_what_followed_the_last_ngram() -> None:
    lookup = PromptLookup()
    context = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]
    assert lookup.propose(context, 0, 3).tokens == [8, 9, 1]  # after "5 6 7"
    assert lookup.propose(context + [3], 0, 3) is None  # "3" never came before
    assert PromptLookup().propose([1, 2, 1, 2, 9, 1, 2], 0, 2).tokens == [9, 1]  # the latest earlier "1 2"


def test_a_prediction_is_aligned_with_the_reply_so_far() -> None:
    prediction = PredictionSource([10, 11, 12, 13, 14, 15, 16, 17])
    prompt = [1, 2, 3]
    assert prediction.propose(prompt, 3, 3).tokens == [10, 11, 12]
    assert prediction.propose(prompt + [10, 11, 99], 3, 3) is None  # the reply left the prediction
    assert prediction.propose(prompt + [10, 11, 99, 14], 3, 2).tokens == [15, 16]  # ... and came back
