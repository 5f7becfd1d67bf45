"""Prompt and generation speed, time to first token and peak memory, measured as mlx_lm.benchmark measures them
(the library side of `qwen-mlx bench`)."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.engine.generate import stream_generate
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.text.tokenizer import Tokenizer


@dataclass
class Trial:
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    time_to_first_token: float  # seconds
    peak_memory: float  # GB
    total_time: float  # seconds


def run_trial(model: nn.Module, tokenizer: Tokenizer, prompt: list[int], generation_tokens: int,
              **kwargs: Any) -> Trial:
    """One greedy generation of exactly `generation_tokens` tokens after `prompt`, timed."""
    eos, tokenizer.eos_token_ids = tokenizer.eos_token_ids, []  # every trial runs to its full length
    try:
        start = time.perf_counter()
        for chunk in stream_generate(model, tokenizer, prompt, max_tokens=generation_tokens, temperature=0,
                                     repetition_penalty=1.0, **kwargs):
            stats = chunk.stats
        total = time.perf_counter() - start
    finally:
        tokenizer.eos_token_ids = eos
    assert stats is not None  # the last chunk carries the statistics
    return Trial(stats.prompt_tokens, stats.generation_tokens, stats.prompt_tps, stats.generation_tps,
                 stats.time_to_first_token, stats.peak_memory_gb, total)


def random_prompt(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Token ids drawn uniformly from the vocabulary, as mlx_lm.benchmark draws its prompt."""
    return cast(list[int], mx.random.randint(0, vocab_size, (length,), key=mx.random.key(seed)).tolist())


def bench(model: nn.Module, tokenizer: Tokenizer, prompt_tokens: int, generation_tokens: int, num_trials: int,
          **kwargs: Any) -> list[Trial]:
    """Warm up, then run and print `num_trials` trials (`kwargs` go to `stream_generate`)."""
    context = model.config.context_length
    if prompt_tokens + generation_tokens >= context:
        raise QwenMLXError(
            f"-p {prompt_tokens} + -g {generation_tokens} tokens do not fit the model's context ({context})"
        )
    prompt = random_prompt(prompt_tokens, model.config.vocab_size)
    # A short run compiles and allocates what the timed ones need; a full-length one would double a CPU benchmark.
    print("Running warmup..", file=sys.stderr, flush=True)
    run_trial(model, tokenizer, prompt[:16], 2, **kwargs)
    print(f"Timing with prompt_tokens={prompt_tokens}, generation_tokens={generation_tokens}, "
          f"batch_size=1.", file=sys.stderr, flush=True)
    trials = []
    for i in range(num_trials):
        trial = run_trial(model, tokenizer, prompt, generation_tokens, **kwargs)
        if trial.generation_tokens != generation_tokens:
            raise AssertionError(f"trial {i + 1} generated {trial.generation_tokens} tokens")
        trials.append(trial)
        print(f"Trial {i + 1}:  {format_trial(trial)}, total_time={trial.total_time:.3f}", flush=True)
    return trials


def average(trials: list[Trial]) -> Trial:
    fields = asdict(trials[0])
    return Trial(**{k: sum(getattr(t, k) for t in trials) / len(trials) for k in fields})


def format_trial(trial: Trial) -> str:
    return (f"prompt_tps={trial.prompt_tps:.3f}, generation_tps={trial.generation_tps:.3f}, "
            f"time_to_first_token={trial.time_to_first_token:.3f}, peak_memory={trial.peak_memory:.3f}")
