"""Logits → next token: logits processors (repetition penalty; grammar.GrammarMask), then temperature, top-k, top-p
and min-p in transformers' order, drawn with a per-request PRNG key.

A logits processor is any callable `processor(tokens, logits) -> logits`:
- `tokens` is the sequence so far, prompt and reply (a list the loop owns: read it, do not keep or change it);
  `logits` are the next position's, shape (1, vocab); the result may be a new array or `logits` edited.
- Processors run in order, once per generated position. Between two calls all of `tokens` but its last id is a
  prefix of the previous call's `tokens`: plain decoding appends one id; speculative decoding first cuts back the
  draft ids it rejected. So a processor that keeps state derived from `tokens` (a grammar's parse) keeps the
  part for `tokens[:len(tokens) - 1]` it has seen, and updates from there.
- A processor that rules tokens out altogether may also say how many ids of a proposed continuation it allows,
  `allowed_draft(tokens, draft) -> int`, so speculative decoding never verifies ids that cannot be chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx

from qwen_mlx.config import read_json
from qwen_mlx.errors import QwenMLXError


class LogitsProcessor(Protocol):
    def __call__(self, tokens: Sequence[int], logits: mx.array) -> mx.array: ...


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise QwenMLXError(f"{name} must be a finite number, not {value!r}", name)
    return value


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            _number(name, getattr(self, name))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise QwenMLXError(f"top_k must be an integer, not {self.top_k!r}", "top_k")
        if self.temperature < 0:
            raise QwenMLXError(f"temperature {self.temperature} must be >= 0 (0 means greedy)", "temperature")
        if not 0 < self.top_p <= 1:
            raise QwenMLXError(f"top_p {self.top_p} must be in (0, 1]", "top_p")
        if self.top_k < 0:
            raise QwenMLXError(f"top_k {self.top_k} must be >= 0 (0 turns it off)", "top_k")
        if not 0 <= self.min_p < 1:
            raise QwenMLXError(f"min_p {self.min_p} must be in [0, 1)", "min_p")
        if self.repetition_penalty <= 0:
            raise QwenMLXError(f"repetition_penalty {self.repetition_penalty} must be > 0 (1 turns it off)",
                               "repetition_penalty")

    def updated(self, **overrides: Any) -> SamplingParams:
        """These params with the given fields replaced; None values leave a field as it is."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, folder: str | Path) -> SamplingParams:
        """The model's own defaults (generation_config.json), as transformers applies them.

        Qwen2.5-Instruct ships temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05. A config with
        `do_sample: false` means greedy.
        """
        path = Path(folder) / "generation_config.json"
        if not path.exists():
            return cls()
        g = read_json(path)
        try:
            params = cls().updated(
                temperature=g.get("temperature"),
                top_p=g.get("top_p"),
                top_k=g.get("top_k"),
                min_p=g.get("min_p"),
                repetition_penalty=g.get("repetition_penalty"),
            )
        except QwenMLXError as e:
            raise QwenMLXError(f"{path}: {e}; fix or remove that entry") from None
        return params.updated(temperature=0.0) if g.get("do_sample") is False else params


def apply_repetition_penalty(logits: mx.array, history: mx.array, penalty: float) -> mx.array:
    """CTRL's penalty (arXiv 1909.05858) as transformers applies it: divide positive logits of tokens already in
    the context by `penalty`, multiply negative ones."""
    if penalty == 1.0 or history.size == 0:
        return logits
    seen = logits[:, history]
    logits[:, history] = mx.where(seen < 0, seen * penalty, seen / penalty)
    return logits


class RepetitionPenalty:
    """The repetition penalty as a logits processor, over the whole context as transformers applies it. The ids
    live in an array grown with `tokens` (cut back after rejected drafts), not rebuilt from the list each step."""

    def __init__(self, penalty: float):
        self.penalty = penalty
        self.history = mx.array([], dtype=mx.int32)

    def __call__(self, tokens: Sequence[int], logits: mx.array) -> mx.array:
        keep = min(self.history.size, len(tokens) - 1)
        if keep < len(tokens):
            self.history = mx.concatenate([self.history[:keep], mx.array(tokens[keep:], dtype=mx.int32)])
        return apply_repetition_penalty(logits, self.history, self.penalty)


def filter_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Temperature-scaled logits with -inf wherever top-k, top-p or min-p rule a token out."""
    logits = logits.astype(mx.float32) / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(logits, axis=-1)[..., -params.top_k][..., None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if params.top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
        # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it is below top_p.
        mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < params.top_p
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        logits = mx.where(keep, logits, -mx.inf)
    if params.min_p > 0.0:
        probs = mx.softmax(logits, axis=-1)
        threshold = params.min_p * probs.max(axis=-1, keepdims=True)
        logits = mx.where(probs < threshold, -mx.inf, logits)
    return logits


class Sampler:
    """Draws tokens with its own PRNG key, so a seed reproduces a run and nothing global is touched."""

    def __init__(self, params: SamplingParams, seed: int | None = None):
        self.params = params
        # Any integer is a seed (OpenAI accepts negative and 64-bit ones): MLX's keys take 64 unsigned bits.
        self.key = mx.random.key(seed % 2**64) if seed is not None else None

    def __call__(self, logits: mx.array) -> mx.array:
        if self.params.greedy:
            return mx.argmax(logits, axis=-1)
        top_k = self.params.top_k
        if 0 < top_k < logits.shape[-1]:
            # Only the k best can be drawn: filter and draw among them instead of sorting the whole vocabulary
            # (Qwen2.5-Instruct samples with top_k 20 out of 152k).
            candidates, sub = self._top_k(logits)
            choice = self.categorical(sub)
            return mx.take_along_axis(candidates, choice[..., None], axis=-1)[..., 0]
        return self.categorical(filter_logits(logits, self.params))

    def probabilities(self, logits: mx.array) -> mx.array:
        """The distribution `__call__` draws from, over the whole vocabulary (one-hot on the argmax if greedy):
        what speculative sampling compares the target's and the draft's proposals by."""
        if self.params.greedy:
            return (mx.arange(logits.shape[-1]) == mx.argmax(logits, axis=-1, keepdims=True)).astype(mx.float32)
        if 0 < self.params.top_k < logits.shape[-1]:
            candidates, sub = self._top_k(logits)
            return mx.put_along_axis(mx.zeros(logits.shape, mx.float32), candidates, mx.softmax(sub, axis=-1),
                                     axis=-1)
        return mx.softmax(filter_logits(logits, self.params), axis=-1)

    def _top_k(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """The top-k candidates' ids and their filtered logits (top-p and min-p apply among them)."""
        candidates = mx.argpartition(-logits, kth=self.params.top_k - 1, axis=-1)[..., : self.params.top_k]
        sub = filter_logits(mx.take_along_axis(logits, candidates, axis=-1), replace(self.params, top_k=0))
        return candidates, sub

    def next_key(self) -> mx.array | None:
        """A fresh subkey from this sampler's key (None without a seed: MLX's global generator)."""
        if self.key is None:
            return None
        self.key, subkey = mx.random.split(self.key)
        return subkey

    def categorical(self, logits: mx.array) -> mx.array:
        return mx.random.categorical(logits, key=self.next_key())

    def uniform(self, shape: tuple[int, ...]) -> mx.array:
        return mx.random.uniform(shape=shape, key=self.next_key())
