"""YaRN on demand (`load(..., context_length=N)`): plain RoPE while a sequence fits the original context, static
YaRN's logits and tokens once it outgrows it, against transformers on a tiny random Qwen2 whose original context
is 64 positions, so the switch comes within a few dozen tokens."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from hf_models import load_hf, save_tiny_qwen2

import qwen_mlx
from qwen_mlx import QwenMLXError
from qwen_mlx.model.cache import PromptCache, load_prompt_cache, make_cache, save_prompt_cache
from qwen_mlx.model.config import ModelConfig

ORIGINAL = 64  # max_position_embeddings of the tiny model: the switch
CONTEXT = 256  # what it is loaded with: YaRN factor 4, as 131072 over Qwen2.5's 32768
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}  # the reference below takes plain argmaxes


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The checkpoint (no rope_scaling), and the same weights with the static YaRN transformers runs."""
    root = tmp_path_factory.mktemp("yarn")
    plain = save_tiny_qwen2(root / "plain", max_position_embeddings=ORIGINAL)
    static = root / "static"
    shutil.copytree(plain, static)
    config = json.loads((static / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": config["rope_parameters"]["rope_theta"], "rope_type": "yarn",
                                 "factor": CONTEXT / ORIGINAL, "original_max_position_embeddings": ORIGINAL}
    (static / "config.json").write_text(json.dumps(config))
    return {"plain": plain, "static": static}


@pytest.fixture(scope="module")
def hf(folders: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {name: load_hf(folder) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def on_demand(folders: dict[str, Path]) -> tuple[qwen_mlx.load, qwen_mlx.Tokenizer]:
    return qwen_mlx.load(folders["plain"], context_length=CONTEXT)


def hf_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def reference_greedy(hf: dict[str, torch.nn.Module], ids: list[int], n: int, eos: list[int]) -> list[int]:
    """What YaRN on demand promises, from transformers: each next token is the unscaled model's while the context
    fits the original length, and static YaRN's over the whole context once it does not."""
    ids, reply = list(ids), []
    for _ in range(n):
        token = int(hf_logits(hf["static"] if len(ids) > ORIGINAL else hf["plain"], ids)[-1].argmax())
        if token in eos:
            break
        reply.append(token)
        ids.append(token)
    return reply


def random_ids(length: int, seed: int = 0) -> list[int]:
    return np.random.RandomState(seed).randint(0, 300, length).tolist()


def test_context_length_makes_yarn_on_demand_or_a_limit() -> None:
    config = ModelConfig(hidden_size=8, num_hidden_layers=1, intermediate_size=8, num_attention_heads=1,
                         num_key_value_heads=1, vocab_size=8, max_position_embeddings=32768)
    card = config.with_context(131072)
    assert card.context_length == 131072 and card.yarn_switch == 32768
    assert card.dynamic_rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    limited = config.with_context(8192)
    assert limited.context_length == 8192 and limited.yarn_switch is None
    static = ModelConfig.from_dict({"model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 1,
                                    "intermediate_size": 8, "num_attention_heads": 1, "vocab_size": 8,
                                    "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32768}})
    assert static.with_context(65536).context_length == 65536 and static.with_context(65536).yarn_switch is None
    with pytest.raises(QwenMLXError, match="rope_scaling gives 131072") as e:
        static.with_context(262144)
    assert e.value.field == "context_length"
    with pytest.raises(QwenMLXError, match="at least 2"):
        config.with_context(0)


def test_within_the_original_context_logits_are_the_unscaled_models(on_demand, hf) -> None:
    model, _ = on_demand
    ids = random_ids(ORIGINAL)
    assert np.abs(np.array(model(mx.array([ids]))[0]) - hf_logits(hf["plain"], ids)).max() <= 1e-4
    cache = make_cache(model)
    pieces = [model(mx.array([ids[:40]]), cache=cache)] + [model(mx.array([[t]]), cache=cache) for t in ids[40:]]
    stepped = np.concatenate([np.array(p[0]) for p in pieces])
    assert not cache[0].rope_scaled
    assert np.abs(stepped - hf_logits(hf["plain"], ids)).max() <= 1e-4


def test_past_the_original_context_logits_are_static_yarns(on_demand, hf) -> None:
    model, _ = on_demand
    ids = random_ids(150, seed=1)
    reference = hf_logits(hf["static"], ids)
    assert np.abs(np.array(model(mx.array([ids]))[0]) - reference).max() <= 1e-4
    # A new cache that a prompt takes past the switch starts under YaRN; a plain one cannot be taken past it.
    cache = make_cache(model)
    assert np.abs(np.array(model(mx.array([ids]), cache=cache)[0]) - reference).max() <= 1e-4
    assert all(c.rope_scaled for c in cache)
    plain = make_cache(model)
    model(mx.array([ids[:60]]), cache=plain)
    with pytest.raises(ValueError, match="re-encode"):
        model(mx.array([ids[60:70]]), cache=plain)


def test_a_config_with_rope_scaling_stays_static(folders, hf) -> None:
    model, _ = qwen_mlx.load(folders["static"], context_length=200)
    assert model.config.context_length == 200 and model.config.yarn_switch is None
    ids = random_ids(40, seed=2)  # short: static YaRN all the same, as transformers runs it
    assert np.abs(np.array(model(mx.array([ids]))[0]) - hf_logits(hf["static"], ids)).max() <= 1e-4
    with pytest.raises(QwenMLXError, match="rope_scaling gives 256"):
        qwen_mlx.load(folders["static"], context_length=512)


@pytest.mark.parametrize("prompt_length", [100, 30])
def test_greedy_tokens_are_static_yarns_past_the_switch(on_demand, hf, prompt_length: int) -> None:
    """A prompt already past the switch prefills under YaRN; one below it switches while the reply grows."""
    model, tokenizer = on_demand
    prompt = random_ids(prompt_length, seed=3)
    result = qwen_mlx.generate(model, tokenizer, prompt, **GREEDY, max_tokens=60, prefill_step_size=16)
    assert result.tokens == reference_greedy(hf, prompt, 60, tokenizer.eos_token_ids)
    assert prompt_length + len(result.tokens) > ORIGINAL + 4  # the reply went past the switch
    assert result.stats.reencoded_tokens == (ORIGINAL if prompt_length < ORIGINAL else 0)


def test_a_chat_crosses_the_switch_with_one_re_encode(on_demand, hf) -> None:
    model, tokenizer = on_demand
    prompt_cache = PromptCache.new(model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    progress: list[tuple[int, int]] = []
    for turn, (question, limit) in enumerate([("", 12), ("and then?", 12), ("go on", 12)]):
        if question:
            messages.append({"role": "user", "content": question})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        result = qwen_mlx.generate(model, tokenizer, messages, **GREEDY, max_tokens=limit,
                                   prompt_cache=prompt_cache, on_prefill=lambda d, t: progress.append((d, t)))
        assert result.tokens == reference_greedy(hf, ids, limit, tokenizer.eos_token_ids), turn
        assert prompt_cache.rope_scaled == (len(ids) > ORIGINAL)
        # Turn 2 is the first past the switch: it re-encodes what the cache held, turn 3 reuses it.
        assert (result.stats.reencoded_tokens > 0) == (turn == 1)
        messages.append({"role": "assistant", "content": result.text})
    assert progress and all(0 <= d <= t for d, t in progress)


def test_a_batch_runs_each_sequence_under_its_own_rope(on_demand) -> None:
    model, tokenizer = on_demand
    prompts = [random_ids(20, seed=4), random_ids(58, seed=5), random_ids(90, seed=6)]
    alone = [qwen_mlx.generate(model, tokenizer, p, **GREEDY, max_tokens=24).tokens for p in prompts]
    batched = qwen_mlx.batch_generate(model, tokenizer, prompts, **GREEDY, max_tokens=24)
    assert [r.tokens for r in batched] == alone


def test_speculative_decoding_across_the_switch_is_exact(on_demand) -> None:
    model, tokenizer = on_demand
    prompt = random_ids(12, seed=7) * 4  # repeats: prompt lookup finds drafts
    plain = qwen_mlx.generate(model, tokenizer, prompt, **GREEDY, max_tokens=40)
    drafted = qwen_mlx.generate(model, tokenizer, prompt, **GREEDY, max_tokens=40, prompt_lookup=4,
                                draft_model=(model, tokenizer))
    assert drafted.tokens == plain.tokens and drafted.stats.reencoded_tokens > 0


def test_a_cancelled_re_encode_resumes_on_the_next_turn(on_demand, hf) -> None:
    model, tokenizer = on_demand
    prompt_cache = PromptCache.new(model)
    first = random_ids(50, seed=8)
    qwen_mlx.generate(model, tokenizer, first, **GREEDY, max_tokens=4, prompt_cache=prompt_cache)
    cancel = threading.Event()
    longer = prompt_cache.tokens + random_ids(40, seed=9)

    def stop_midway(done: int, total: int) -> None:
        if done >= 16:
            cancel.set()

    stopped = qwen_mlx.generate(model, tokenizer, longer, **GREEDY, max_tokens=8, prompt_cache=prompt_cache,
                                cancel=cancel, on_prefill=stop_midway, prefill_step_size=8)
    assert stopped.finish_reason == "cancelled" and stopped.tokens == []
    assert prompt_cache.rope_scaled and 0 < len(prompt_cache.tokens) < len(longer)
    again = qwen_mlx.generate(model, tokenizer, longer, **GREEDY, max_tokens=8, prompt_cache=prompt_cache)
    assert again.tokens == reference_greedy(hf, longer, 8, tokenizer.eos_token_ids)


def test_a_rotating_window_within_the_original_context_never_switches(on_demand) -> None:
    model, tokenizer = on_demand
    prompt_cache = PromptCache.new(model, qwen_mlx.CacheSettings(max_kv_size=48))
    result = qwen_mlx.generate(model, tokenizer, random_ids(70, seed=10), **GREEDY, max_tokens=10,
                               max_kv_size=48, prompt_cache=prompt_cache)
    assert not prompt_cache.rope_scaled and result.stats.reencoded_tokens == 0


def test_a_saved_prompt_cache_keeps_its_rope(on_demand, tmp_path: Path) -> None:
    model, tokenizer = on_demand
    prompt_cache = PromptCache.new(model)
    prompt_cache.prefill(model, prompt_cache.fit_rope(model.config.yarn_switch, random_ids(80, seed=11)))
    save_prompt_cache(tmp_path / "c.safetensors", prompt_cache)
    loaded, _ = load_prompt_cache(tmp_path / "c.safetensors")
    assert loaded.rope_scaled and all(c.rope_scaled for c in loaded.caches)


def test_chat_file_puts_a_document_into_the_conversation_with_a_progress_bar(
        folders, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from qwen_mlx.cli.main import main

    document = tmp_path / "report.txt"
    document.write_text("the quarterly figures rose. " * 45)  # 1,260 bytes: past PrefillProgress.MIN_TOKENS
    lines = iter(["summarise it"])

    def typed(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)
    args = ["chat", "--model", str(folders["plain"]), "--context", "2048", "--file", str(document), "-v",
            "--temp", "0", "--max-tokens", "3"]
    assert main(args) == 0
    err = capsys.readouterr().err
    prompt_tokens = int(err.split("prompt: ")[1].split()[0])
    assert prompt_tokens > 1100  # the document (1,260 bytes, a few merges in this tokenizer) went with it
    assert "prefill (YaRN)" in err  # past the original 64 positions: encoded with YaRN from the start
    assert main([*args[:5], "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err


def test_ctrl_c_cancels_the_reply_and_a_second_one_interrupts() -> None:
    import os
    import signal

    from qwen_mlx.cli.terminal import interrupt_cancels

    with interrupt_cancels() as cancel:
        os.kill(os.getpid(), signal.SIGINT)
        assert cancel.wait(5)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0.1) if hasattr(signal, "sigtimedwait") else None
            for _ in range(100):
                threading.Event().wait(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
