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

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import mlx.core as mx

from qwen_mlx.model.generation_config import SamplingParams


class LogitsProcessor(Protocol):
    def __call__(self, tokens: Sequence[int], logits: mx.array) -> mx.array: ...


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
            self.history = mx.concatenate([self.history[:keep], mx.array(list(tokens[keep:]), dtype=mx.int32)])
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
