"""Continuous batching: sequences decoded together get the replies each gets alone, keep their own sampling,
grammar, stop strings, caches and cancel, join while others stream, and share each forward pass."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hf_models import save_tiny_qwen2

import qwen_mlx
from qwen_mlx import CacheSettings, PromptCache
from qwen_mlx.engine.decode import Decoder
from qwen_mlx.engine.request import prepare_request
from qwen_mlx.engine.worker import ModelWorker

GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "n"], "additionalProperties": False}
PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a long story about the river, the mill and the town by the bridge."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}],
    list(range(30, 200)),
]

Loaded = tuple[Any, qwen_mlx.Tokenizer]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny"), seed=2, hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def tiny(folder: Path) -> Loaded:
    return qwen_mlx.load(folder)


def alone(tiny: Loaded, prompt: Any, **kwargs: Any) -> qwen_mlx.GenerationResult:
    return qwen_mlx.generate(*tiny, prompt, **{**GREEDY, "max_tokens": 30, **kwargs})


@pytest.mark.parametrize("cache", [
    pytest.param({}, id="plain-cache"),
    pytest.param({"kv_bits": 8, "kv_group_size": 32}, id="quantized-cache"),
    pytest.param({"max_kv_size": 48}, id="rotating-cache"),
])
def test_greedy_replies_decoded_together_are_the_replies_each_gets_alone(tiny: Loaded,
                                                                         cache: dict[str, Any]) -> None:
    together = qwen_mlx.batch_generate(*tiny, PROMPTS, max_batch=4, **GREEDY, max_tokens=30, **cache)
    for prompt, result in zip(PROMPTS, together, strict=True):
        expected = alone(tiny, prompt, **cache)
        assert result.tokens == expected.tokens
        assert result.text == expected.text and result.finish_reason == expected.finish_reason


def test_four_prompts_together_take_under_a_third_of_a_pass_per_token(tiny: Loaded) -> None:
    model, tokenizer = tiny
    decoder = Decoder(model, tokenizer)
    requests = [prepare_request(model, tokenizer, p, **GREEDY, max_tokens=40) for p in PROMPTS]
    sequences = [decoder.add(r, PromptCache.new(model)) for r in requests]
    while decoder.sequences:
        decoder.step()
    generated = sum(s.generated for s in sequences)
    assert generated == 4 * 40
    assert decoder.passes / generated <= 0.3


def test_each_sequence_keeps_its_own_settings_in_a_batch(tiny: Loaded) -> None:
    """A seeded sampler, a JSON schema, a stop string and plain greedy, decoded together."""
    reference = alone(tiny, PROMPTS[1], max_tokens=40)
    stop = reference.text[10:13]
    runs = [
        ({"temperature": 1.0, "seed": 11}, PROMPTS[0]),
        ({"json_schema": SCHEMA, "max_tokens": 80}, PROMPTS[2]),
        ({"stop": [stop], "max_tokens": 40}, PROMPTS[1]),
        ({"max_tokens": 25}, PROMPTS[3]),
    ]
    model, tokenizer = tiny
    decoder = Decoder(model, tokenizer)
    from qwen_mlx.engine.generate import ReplyText, collect, text_chunks

    replies = {}
    for options, prompt in runs:
        request = prepare_request(model, tokenizer, prompt, **{**GREEDY, "max_tokens": 30, **options})
        sequence = decoder.add(request, PromptCache.new(model))
        replies[sequence] = ReplyText(tokenizer, sequence, model.config.context_length)
    chunks: dict[Any, list[Any]] = {s: [] for s in replies}
    while decoder.sequences:
        for reply, chunk in text_chunks(decoder, replies):
            chunks[reply.sequence].append(chunk)
    results = [collect(iter(c), None) for c in chunks.values()]
    for (options, prompt), result in zip(runs, results, strict=True):
        assert result.tokens == alone(tiny, prompt, **options).tokens, options
    jsonschema.validate(json.loads(results[1].text), SCHEMA)
    assert results[2].text == reference.text[: reference.text.index(stop)] and results[2].finish_reason == "stop"


def test_a_cancelled_sequence_leaves_the_batch_and_the_others_go_on(tiny: Loaded) -> None:
    model, tokenizer = tiny
    decoder = Decoder(model, tokenizer)
    cancel = threading.Event()
    requests = [prepare_request(model, tokenizer, p, **GREEDY, max_tokens=30) for p in PROMPTS[:3]]
    first = decoder.add(requests[0], PromptCache.new(model), cancel)
    others = [decoder.add(r, PromptCache.new(model)) for r in requests[1:]]
    finished: dict[Any, str] = {}
    while decoder.sequences:
        for event in decoder.step():
            if event.token is not None and event.sequence is first and first.generated == 5:
                cancel.set()
            if event.finish:
                finished[event.sequence] = event.finish
    assert finished[first] == "cancelled" and first.generated == 5
    for sequence, prompt in zip(others, PROMPTS[1:3], strict=True):
        assert finished[sequence] == "length"
        assert sequence.context[len(sequence.request.prompt_ids) :] == alone(tiny, prompt).tokens


def test_a_long_prompt_joins_a_chunk_at_a_time_while_another_streams(tiny: Loaded) -> None:
    """The running stream gets a token between every prefill chunk of the joining prompt."""
    model, tokenizer = tiny
    decoder = Decoder(model, tokenizer)
    running = decoder.add(prepare_request(model, tokenizer, PROMPTS[0], **GREEDY, max_tokens=40),
                          PromptCache.new(model))
    while running.generated < 3:
        decoder.step()
    joining = decoder.add(prepare_request(model, tokenizer, list(range(1, 300)), **GREEDY, max_tokens=5,
                                          prefill_step_size=32), PromptCache.new(model))
    tokens_during_prefill = []
    while joining.todo:
        events = decoder.step()
        tokens_during_prefill.append(sum(1 for e in events if e.sequence is running and e.token is not None))
    assert len(tokens_during_prefill) >= 9 and all(n == 1 for n in tokens_during_prefill[1:])


def test_the_worker_streams_several_replies_at_once_each_as_alone(folder: Path, tiny: Loaded) -> None:
    worker = ModelWorker(lambda: qwen_mlx.load(folder), max_batch=4, cache=CacheSettings())
    try:
        assert worker.wait_loaded(60)
        jobs = [worker.submit(f"s{i}", p, **GREEDY, max_tokens=30) for i, p in enumerate(PROMPTS)]
        first_tokens, finished = [], []
        outputs: dict[int, list[int]] = {i: [] for i in range(len(jobs))}
        done = 0
        while done < len(jobs):
            for i, job in enumerate(jobs):
                chunk = job.get(timeout=0.01)
                if chunk is None:
                    continue
                if chunk.token is not None:
                    if not outputs[i]:
                        first_tokens.append(len(finished))
                    outputs[i].append(chunk.token)
                if chunk.finish_reason:
                    finished.append(i)
                    done += 1
        assert first_tokens == [0, 0, 0, 0], "a reply only started after another had finished"
        for i, prompt in enumerate(PROMPTS):
            assert outputs[i] == alone(tiny, prompt).tokens
    finally:
        worker.close()
