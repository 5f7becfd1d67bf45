"""Logits → next token: repetition penalty, temperature, top-k, top-p, min-p, in transformers' order."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from qwen_mlx.config import read_json
from qwen_mlx.errors import QwenMLXError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise QwenMLXError(f"temperature {self.temperature} must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise QwenMLXError(f"top_p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise QwenMLXError(f"top_k {self.top_k} must be >= 0 (0 turns it off)")
        if not 0 <= self.min_p < 1:
            raise QwenMLXError(f"min_p {self.min_p} must be in [0, 1)")
        if self.repetition_penalty <= 0:
            raise QwenMLXError(f"repetition_penalty {self.repetition_penalty} must be > 0 (1 turns it off)")

    def updated(self, **overrides: Any) -> SamplingParams:
        """These params with the given fields replaced; None values leave a field as it is."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

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
        params = cls().updated(
            temperature=g.get("temperature"),
            top_p=g.get("top_p"),
            top_k=g.get("top_k"),
            min_p=g.get("min_p"),
            repetition_penalty=g.get("repetition_penalty"),
        )
        return params.updated(temperature=0.0) if g.get("do_sample") is False else params


def apply_repetition_penalty(logits: mx.array, history: mx.array, penalty: float) -> mx.array:
    """CTRL's penalty (arXiv 1909.05858) as transformers applies it: divide positive logits of tokens already in
    the context by `penalty`, multiply negative ones."""
    if penalty == 1.0 or history.size == 0:
        return logits
    seen = logits[:, history]
    logits[:, history] = mx.where(seen < 0, seen * penalty, seen / penalty)
    return logits


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
        self.key = mx.random.key(seed) if seed is not None else None

    def __call__(self, logits: mx.array) -> mx.array:
        if self.params.temperature == 0:
            return mx.argmax(logits, axis=-1)
        top_k = self.params.top_k
        if 0 < top_k < logits.shape[-1]:
            # Only the k best can be drawn: filter and draw among them instead of sorting the whole vocabulary
            # (Qwen2.5-Instruct samples with top_k 20 out of 152k).
            candidates = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k]
            sub = filter_logits(mx.take_along_axis(logits, candidates, axis=-1), replace(self.params, top_k=0))
            choice = self._draw(sub)
            return mx.take_along_axis(candidates, choice[..., None], axis=-1)[..., 0]
        return self._draw(filter_logits(logits, self.params))

    def _draw(self, logits: mx.array) -> mx.array:
        if self.key is None:
            return mx.random.categorical(logits)
        self.key, subkey = mx.random.split(self.key)
        return mx.random.categorical(logits, key=subkey)
