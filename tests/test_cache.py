"""KV caches: the preallocated KVCache, the rotating cache against mlx-lm's, prompt-prefix reuse, save/load, CLI."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from hf_models import save_tiny_qwen2, write_tiny_tokenizer
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import RotatingKVCache as MlxLmRotatingKVCache

import qwen_mlx
from qwen_mlx import QwenMLXError
from qwen_mlx.cli import chat as chat_command
from qwen_mlx.cli import generate as generate_command
from qwen_mlx.cli import main as cli
from qwen_mlx.engine.generate import GenerationResult, GenerationStats
from qwen_mlx.model.cache import (
    CacheSettings,
    KVCache,
    PromptCache,
    RotatingKVCache,
    load_prompt_cache,
    make_cache,
    save_prompt_cache,
)
from qwen_mlx.model.qwen2 import Qwen2

W, KEEP = 32, 4  # the rotating window and its attention sinks, small enough that tests run far past it
PROMPT = list(range(40, 60))  # 20 token ids
NEW_MESSAGE = list(range(150, 165))  # 15 token ids

Loaded = tuple[Qwen2, qwen_mlx.Tokenizer]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2 that both qwen-mlx and mlx-lm load, whose greedy replies keep changing for hundreds of tokens.

    Wider than the default tiny model (at 64 its greedy replies settle into a two-token loop, where any two caches
    agree). rope_theta is 1e6 because mlx-lm 0.32 reads only a top-level `rope_theta`, not transformers 5's
    `rope_parameters`, and otherwise assumes 1e6. The vocabulary is the tokenizer's, so generated ids can be fed
    back as a prompt.
    """
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(tokenizer_dir)
    vocab_size = qwen_mlx.Tokenizer.from_folder(tokenizer_dir).vocab_size
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny"), seed=3, hidden_size=128, intermediate_size=256,
                           rope_theta=1e6, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def ours(folder: Path) -> Loaded:
    return qwen_mlx.load(folder)


@pytest.fixture(scope="module")
def theirs(folder: Path) -> nn.Module:
    """mlx-lm's own Qwen2 on the same weights."""
    return mlx_lm.load(str(folder))[0]


def greedy(ours: Loaded, prompt: list[int], max_tokens: int, **kwargs: object) -> GenerationResult:
    model, tokenizer = ours
    result = qwen_mlx.generate(model, tokenizer, prompt, max_tokens=max_tokens, temperature=0,
                               repetition_penalty=1.0, **kwargs)
    assert result.finish_reason == "length"  # no end-of-turn token: every comparison covers all the tokens
    return result


def mlx_lm_greedy(model: nn.Module, prompt: list[int], max_tokens: int, cache: list,
                  prefill_step_size: int) -> list[int]:
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, prompt_cache=cache,
                          prefill_step_size=prefill_step_size, sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    return [token for token, _ in steps]


def mlx_lm_rotating_cache(model: nn.Module) -> list[MlxLmRotatingKVCache]:
    return [MlxLmRotatingKVCache(W, keep=KEEP) for _ in model.layers]


def logits_of_every_step(model: nn.Module, caches: list, prompt: list[int], step: int, decode: int) -> list[mx.array]:
    """The logits of each prefill chunk, then of `decode` greedy single-token steps."""
    logits = [model(mx.array(prompt[i : i + step])[None], cache=caches) for i in range(0, len(prompt), step)]
    for _ in range(decode):
        token = mx.argmax(logits[-1][:, -1], axis=-1)
        logits.append(model(token[None], cache=caches))
    return logits


# --- the rotating cache ---


def test_rotating_cache_within_its_window_gives_the_plain_cache_logits(ours: Loaded) -> None:
    model, _ = ours
    window = 64
    plain = logits_of_every_step(model, make_cache(model), PROMPT, step=8, decode=40)
    rotating = logits_of_every_step(model, make_cache(model, CacheSettings(window, KEEP)), PROMPT, step=8, decode=40)
    assert len(PROMPT) + 40 < window
    for a, b in zip(plain, rotating, strict=True):
        assert mx.array_equal(a, b)


def test_rotating_cache_within_its_window_gives_the_plain_cache_greedy_tokens(ours: Loaded) -> None:
    plain = greedy(ours, PROMPT, 40, prefill_step_size=8)
    rotating = greedy(ours, PROMPT, 40, prefill_step_size=8, max_kv_size=64, keep=KEEP)
    assert rotating.tokens == plain.tokens


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "prefill_step_size"),
    [
        pytest.param(PROMPT[:10], 300, 8, id="short-prompt-long-generation"),
        pytest.param(list(range(100, 200)), 60, 8, id="prompt-longer-than-window-in-13-chunks"),
        pytest.param(list(range(100, 200)), 60, 48, id="prompt-chunks-longer-than-window"),
    ],
)
def test_rotating_cache_past_its_window_gives_mlx_lm_greedy_tokens(
    ours: Loaded, theirs: nn.Module, prompt: list[int], max_tokens: int, prefill_step_size: int
) -> None:
    expected = mlx_lm_greedy(theirs, prompt, max_tokens, mlx_lm_rotating_cache(theirs), prefill_step_size)
    rotating = greedy(ours, prompt, max_tokens, prefill_step_size=prefill_step_size, max_kv_size=W, keep=KEEP)
    assert rotating.tokens == expected
    # The window did change the reply: the test would notice a cache that kept everything.
    assert rotating.tokens != greedy(ours, prompt, max_tokens, prefill_step_size=prefill_step_size).tokens


@pytest.mark.parametrize("new_message", [NEW_MESSAGE[:5], NEW_MESSAGE * 3], ids=["short", "longer-than-window"])
def test_rotating_cache_second_turn_after_generation_gives_mlx_lm_greedy_tokens(
    ours: Loaded, theirs: nn.Module, new_message: list[int]
) -> None:
    model, _ = ours
    step = 8
    prompt_cache = PromptCache.new(model, CacheSettings(W, KEEP))
    first = greedy(ours, PROMPT[:10], 60, prompt_cache=prompt_cache, prefill_step_size=step)
    second = greedy(ours, PROMPT[:10] + first.tokens + new_message, 80, prompt_cache=prompt_cache,
                    prefill_step_size=step)
    assert second.stats.prefilled_tokens == len(new_message) + 1

    # qwen-mlx never runs its last reply token through the model (nothing needs its logits), so the follow-up
    # prefills it together with the new message. mlx-lm is driven alike: its generator runs each token it yields,
    # so it yields one token fewer, then gets the last reply token and the new message as its next prompt.
    cache = mlx_lm_rotating_cache(theirs)
    assert mlx_lm_greedy(theirs, PROMPT[:10], 59, cache, step) == first.tokens[:-1]
    assert mlx_lm_greedy(theirs, first.tokens[-1:] + new_message, 80, cache, step) == second.tokens


def test_rotating_cache_memory_stays_flat_however_long_it_generates(ours: Loaded) -> None:
    model, tokenizer = ours
    c = model.config
    position_bytes = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4  # keys + values, float32

    def held_and_cache_bytes(n_tokens: int, max_kv_size: int | None) -> tuple[int, int]:
        """The most memory a generation of `n_tokens` holds beyond what was there before (sampled at every token,
        where nothing is transient), and the cache's final size."""
        prompt_cache = PromptCache.new(model, CacheSettings(max_kv_size, KEEP))
        mx.clear_cache()
        before = highest = mx.get_active_memory()
        finish = None
        for chunk in qwen_mlx.stream_generate(model, tokenizer, PROMPT[:10], max_tokens=n_tokens, temperature=0,
                                              repetition_penalty=1.0, prompt_cache=prompt_cache):
            highest = max(highest, mx.get_active_memory())
            finish = chunk.finish_reason
        assert finish == "length"  # no end-of-turn token: it generated all of them
        return highest - before, prompt_cache.nbytes

    runs = [held_and_cache_bytes(n, W) for n in (2 * W, 10 * W, 20 * W)]
    assert {cache for _, cache in runs} == {W * position_bytes}  # the window, never more
    held = [h for h, _ in runs]
    # Ten times longer holds no more: a cache that kept growing would add 18 windows' worth here.
    assert max(held) - min(held) < W * position_bytes / 4

    # The same measurement does see a cache that grows: without a window, 8 windows more of positions.
    plain_2w, _ = held_and_cache_bytes(2 * W, None)
    plain_10w, _ = held_and_cache_bytes(10 * W, None)
    assert plain_10w - plain_2w >= 0.9 * 8 * W * position_bytes


def test_rotating_cache_must_be_larger_than_its_sinks() -> None:
    with pytest.raises(QwenMLXError, match="max_kv_size 4 must be larger than keep=4"):
        RotatingKVCache(4, keep=4)


# --- the plain cache ---


def kv(length: int, seed: int) -> tuple[mx.array, mx.array]:
    keys = mx.random.normal((1, 2, length, 8), key=mx.random.key(seed))
    return keys, keys + 1


def test_kv_cache_grows_in_steps_of_256_positions_not_per_token() -> None:
    cache = KVCache()
    inputs = [kv(10, 0)] + [kv(1, i) for i in range(1, 247)]
    for keys, values in inputs:
        cache.update_and_fetch(keys, values)
        assert cache.keys.shape[2] == 256  # written into the slack, never regrown
    assert cache.offset == 256
    keys, values = cache.update_and_fetch(*kv(1, 247))
    assert cache.keys.shape[2] == 512 and cache.offset == 257
    assert mx.array_equal(keys[..., :256, :], mx.concatenate([k for k, _ in inputs], axis=2))
    assert mx.array_equal(values[..., :256, :], mx.concatenate([v for _, v in inputs], axis=2))
    assert cache.nbytes == 2 * (1 * 2 * 512 * 8) * 4  # keys and values, float32


def test_kv_cache_prefill_longer_than_a_step_takes_whole_steps() -> None:
    cache = KVCache()
    keys, _ = cache.update_and_fetch(*kv(300, 0))
    assert cache.keys.shape[2] == 512 and keys.shape[2] == 300


def test_kv_cache_trim_rewinds_and_the_next_positions_overwrite() -> None:
    cache = KVCache()
    first_keys, first_values = kv(20, 0)
    cache.update_and_fetch(first_keys, first_values)
    assert cache.trim(5) == 5 and cache.offset == 15
    new_keys, new_values = kv(3, 1)
    keys, values = cache.update_and_fetch(new_keys, new_values)
    assert mx.array_equal(keys, mx.concatenate([first_keys[..., :15, :], new_keys], axis=2))
    assert mx.array_equal(values, mx.concatenate([first_values[..., :15, :], new_values], axis=2))
    assert cache.trim(100) == 18 and cache.offset == 0


# --- prompt-prefix reuse ---


@pytest.mark.parametrize("max_kv_size", [None, 256], ids=["plain", "rotating-within-window"])
def test_second_turn_prefills_only_the_new_tokens_and_equals_a_fresh_run(ours: Loaded, max_kv_size: int | None) -> None:
    model, _ = ours
    prompt_cache = PromptCache.new(model, CacheSettings(max_kv_size))
    first = greedy(ours, PROMPT, 12, prompt_cache=prompt_cache)
    assert first.stats.prefilled_tokens == len(PROMPT)
    conversation = PROMPT + first.tokens + NEW_MESSAGE
    second = greedy(ours, conversation, 12, prompt_cache=prompt_cache)
    # The new message, and the last reply token: it was sampled but never run through the model.
    assert second.stats.prefilled_tokens == len(NEW_MESSAGE) + 1
    assert second.stats.prompt_tokens == len(conversation)
    assert second.tokens == greedy(ours, conversation, 12, max_kv_size=max_kv_size).tokens
    assert prompt_cache.tokens == conversation + second.tokens[:-1]


DIVERGING_PROMPTS: dict[str, tuple[Callable[[list[int]], list[int]], int]] = {
    # (the new prompt, made from the first reply; the number of tokens it prefills)
    # The last prompt token is always run again: its logits pick the first reply token.
    "regenerate": (lambda reply: PROMPT, 1),
    "edited-message": (lambda reply: PROMPT[:12] + NEW_MESSAGE[:8], 8),
    "edited-reply": (lambda reply: PROMPT + reply[:5] + NEW_MESSAGE, len(NEW_MESSAGE)),
}


@pytest.mark.parametrize("max_kv_size", [None, 256], ids=["plain", "rotating-within-window"])
@pytest.mark.parametrize("case", DIVERGING_PROMPTS)
def test_diverging_prompt_trims_the_cache_and_equals_a_fresh_run(ours: Loaded, case: str,
                                                                  max_kv_size: int | None) -> None:
    model, _ = ours
    make_prompt, prefilled = DIVERGING_PROMPTS[case]
    prompt_cache = PromptCache.new(model, CacheSettings(max_kv_size))
    first = greedy(ours, PROMPT, 12, prompt_cache=prompt_cache)
    prompt = make_prompt(first.tokens)
    again = greedy(ours, prompt, 12, prompt_cache=prompt_cache)
    assert again.stats.prefilled_tokens == prefilled
    assert again.tokens == greedy(ours, prompt, 12, max_kv_size=max_kv_size).tokens


def test_rotating_cache_past_its_window_is_rebuilt_for_a_diverging_prompt(ours: Loaded) -> None:
    model, _ = ours
    prompt_cache = PromptCache.new(model, CacheSettings(W, KEEP))
    first = greedy(ours, PROMPT, 40, prompt_cache=prompt_cache)
    prompt = PROMPT + first.tokens[:30] + NEW_MESSAGE  # evicted positions cannot be trimmed back to
    again = greedy(ours, prompt, 20, prompt_cache=prompt_cache)
    assert again.stats.prefilled_tokens == len(prompt)
    assert again.tokens == greedy(ours, prompt, 20, max_kv_size=W, keep=KEEP).tokens


@pytest.mark.parametrize("max_kv_size", [None, W], ids=["plain", "rotating-past-window"])
def test_saved_and_loaded_prompt_cache_continues_like_the_one_in_memory(ours: Loaded, tmp_path: Path,
                                                                         max_kv_size: int | None) -> None:
    model, _ = ours
    prompt_cache = PromptCache.new(model, CacheSettings(max_kv_size, KEEP))
    first = greedy(ours, PROMPT, 40, prompt_cache=prompt_cache)
    path = tmp_path / "conversation.safetensors"
    save_prompt_cache(path, prompt_cache, {"note": "first turn"})
    loaded, metadata = load_prompt_cache(path)
    assert metadata == {"note": "first turn"} and loaded.tokens == prompt_cache.tokens

    conversation = PROMPT + first.tokens + NEW_MESSAGE
    from_disk = greedy(ours, conversation, 40, prompt_cache=loaded)
    in_memory = greedy(ours, conversation, 40, prompt_cache=prompt_cache)
    assert from_disk.stats.prefilled_tokens == in_memory.stats.prefilled_tokens == len(NEW_MESSAGE) + 1
    assert from_disk.tokens == in_memory.tokens


def test_prompt_cache_file_may_have_any_name(ours: Loaded, tmp_path: Path) -> None:
    model, _ = ours
    prompt_cache = PromptCache.new(model)
    greedy(ours, PROMPT, 4, prompt_cache=prompt_cache)
    save_prompt_cache(tmp_path / "system-prompt.cache", prompt_cache)
    assert load_prompt_cache(tmp_path / "system-prompt.cache")[0].tokens == prompt_cache.tokens


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("model.safetensors", "not a qwen-mlx prompt cache"),
        ("notes.safetensors", "cannot read the prompt cache"),
        ("missing.safetensors", "cannot read the prompt cache"),
    ],
)
def test_loading_a_file_that_is_not_a_prompt_cache_is_a_user_error(folder: Path, tmp_path: Path, name: str,
                                                                    message: str) -> None:
    (tmp_path / "notes.safetensors").write_text("not a cache")
    path = folder / name if name == "model.safetensors" else tmp_path / name
    with pytest.raises(QwenMLXError, match=message):
        load_prompt_cache(path)


# --- the command line ---


@pytest.fixture
def printed_stats(monkeypatch: pytest.MonkeyPatch) -> list[GenerationStats]:
    """The statistics the CLI prints after each reply, as objects."""
    stats: list[GenerationStats] = []
    for command in (generate_command, chat_command):
        monkeypatch.setattr(command, "print_stats", lambda s, file=None: stats.append(s))
    return stats


def test_cache_prompt_then_generate_reuses_the_cached_tokens(ours: Loaded, folder: Path, tmp_path: Path,
                                                             printed_stats: list[GenerationStats],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    document = "The river runs north through the old town, then turns east at the mill."
    cache_file = tmp_path / "document.safetensors"
    assert cli.main(["cache-prompt", "--model", str(folder), "--prompt", document, "--output", str(cache_file)]) == 0
    cached_tokens = len(load_prompt_cache(cache_file)[0].tokens)
    capsys.readouterr()

    assert cli.main(["generate", "--model", str(folder), "--prompt-cache", str(cache_file), "--prompt", "Where?",
                 "--max-tokens", "8", "--temp", "0"]) == 0
    (stats,) = printed_stats
    assert stats.prompt_tokens - stats.prefilled_tokens == cached_tokens
    model, tokenizer = ours
    expected = qwen_mlx.generate(model, tokenizer, [{"role": "user", "content": document},
                                                    {"role": "user", "content": "Where?"}],
                                 temperature=0, max_tokens=8)
    assert capsys.readouterr().out == expected.text + "\n"


def test_chat_with_max_kv_size_keeps_the_cache_bounded(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                       printed_stats: list[GenerationStats]) -> None:
    lines = iter(["Hello there", "Tell me more about the river", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    made: list[PromptCache] = []
    new = PromptCache.new
    monkeypatch.setattr(PromptCache, "new", lambda *args, **kwargs: made.append(new(*args, **kwargs)) or made[-1])

    assert cli.main(["chat", "--model", str(folder), "--max-kv-size", "48", "--max-tokens", "40", "--temp", "0",
                 "-v"]) == 0
    assert len(printed_stats) == 2  # two replies
    (prompt_cache,) = made
    assert prompt_cache.offset == printed_stats[-1].context_tokens > 48  # the conversation went past the window ...
    assert all(isinstance(c, RotatingKVCache) and c.keys.shape[2] == 48 for c in prompt_cache.caches)  # ... in it


# --- the quantized cache (kv_bits) ---


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_gives_mlx_lm_quantized_cache_greedy_tokens(ours: Loaded, theirs: nn.Module,
                                                                     bits: int) -> None:
    from mlx_lm.models.cache import QuantizedKVCache as MlxLmQuantizedKVCache

    ids = greedy(ours, PROMPT, 40, kv_bits=bits, kv_group_size=32, prefill_step_size=8).tokens
    cache = [MlxLmQuantizedKVCache(group_size=32, bits=bits) for _ in theirs.layers]
    assert ids == mlx_lm_greedy(theirs, PROMPT, 40, cache, prefill_step_size=8)


def test_quantized_cache_stays_close_to_the_float_cache_in_less_memory(ours: Loaded) -> None:
    model, _ = ours
    plain, quantized = make_cache(model), make_cache(model, CacheSettings(kv_bits=8, kv_group_size=32))
    exact = logits_of_every_step(model, plain, PROMPT, step=8, decode=20)
    approx = logits_of_every_step(model, quantized, PROMPT, step=8, decode=20)
    # Measured: max |Δlogit| 0.004-0.006 at 8 bits on this model, whose logits span about ±3.
    for a, b in zip(exact, approx, strict=True):
        assert mx.abs(a - b).max().item() < 0.03
    # Per 32 values: 32 bytes of 8-bit codes + a float32 scale and bias, against 128 bytes of float32.
    assert quantized[0].nbytes * 128 == plain[0].nbytes * 40


def test_quantized_cache_reuses_prefixes_and_survives_save_and_load(ours: Loaded, tmp_path: Path) -> None:
    model, _ = ours
    prompt_cache = PromptCache.new(model, CacheSettings(kv_bits=8, kv_group_size=32))
    first = greedy(ours, PROMPT, 10, prompt_cache=prompt_cache)
    save_prompt_cache(tmp_path / "q.safetensors", prompt_cache)
    loaded, _ = load_prompt_cache(tmp_path / "q.safetensors")
    conversation = PROMPT + first.tokens + NEW_MESSAGE
    from_disk = greedy(ours, conversation, 10, prompt_cache=loaded)
    in_memory = greedy(ours, conversation, 10, prompt_cache=prompt_cache)
    assert from_disk.stats.prefilled_tokens == in_memory.stats.prefilled_tokens == len(NEW_MESSAGE) + 1
    assert from_disk.tokens == in_memory.tokens
    edited = greedy(ours, PROMPT[:10] + NEW_MESSAGE, 10, prompt_cache=prompt_cache)
    assert edited.stats.prefilled_tokens == len(NEW_MESSAGE)
    assert edited.tokens == greedy(ours, PROMPT[:10] + NEW_MESSAGE, 10, kv_bits=8, kv_group_size=32).tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"kv_bits": 3}, "kv_bits 3"), ({"kv_bits": 8, "max_kv_size": 64}, "not both"),
     ({"kv_bits": 8, "kv_group_size": 64}, "head size 32 is not a multiple of the 64-value groups")],
)
def test_bad_quantized_cache_settings_are_user_errors(ours: Loaded, kwargs: dict, message: str) -> None:
    model, tokenizer = ours
    with pytest.raises(QwenMLXError, match=message):
        qwen_mlx.generate(model, tokenizer, PROMPT, max_tokens=2, **kwargs)
