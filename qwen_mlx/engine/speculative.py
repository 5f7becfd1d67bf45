"""Speculative decoding: cheap guesses at the next few tokens, verified by the model in one forward pass.

Where drafts come from (`DraftSource`s, tried in this order):
- `PredictionSource`: OpenAI's Predicted Outputs, the expected reply (a file being edited), aligned with the reply
  so far by its last n-gram;
- `PromptLookup`: the tokens that followed the context's last n-gram where it appeared before (prompt lookup
  decoding: summaries, code edits and answers that quote their input);
- `DraftModelSource`: a small model with the same tokenizer (Qwen2.5-0.5B for the 7B), run a few tokens ahead.

Verification is exact. Greedy decoding keeps the draft tokens the model picks itself, so the reply is token for
token the plain one. Sampling keeps a draft token x with probability min(1, p(x)/q(x)) and otherwise draws the
next token from norm(max(0, p - q)) (Leviathan et al. 2023; Chen et al. 2023), so the reply is distributed as the
model's own; a guess that is not drawn from a distribution (lookup, prediction) has q(x) = 1.

How many tokens to verify (`Speculation.draft_length`): on Apple silicon, where decoding is bound by memory
bandwidth, a pass over k + 1 tokens costs about one pass; where matmuls are compute-bound (MLX's CPU build) it
costs about k + 1. Each sequence measures what a plain step and a round cost here and how many of its drafts are
accepted, then verifies the longest draft whose expected speed is at least `MIN_SPEED` of plain decoding's. Its
first round verifies one token, which measures a round's cost cheaply wherever it turns out high. When no length
pays, it decodes plainly and tries a one-token draft every `PROBE_EVERY` tokens to notice when guesses improve.
A seeded sampled reply must not depend on timings (where a round starts changes which random numbers decide
which token), so there the cost stays at its prior and only the acceptance steers: the seed reproduces the reply
on any machine. Greedy replies are the same however rounds fall.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, cast

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.engine.sample import Sampler
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import PromptCache, RotatingKVCache
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from qwen_mlx.engine.request import SpeculationSettings

MIN_SPEED = 0.95  # speculate only where it is expected to be at least this fast as plain decoding
PROBE_EVERY = 16  # plain tokens between one-token probes while speculation does not pay
SMOOTHING = 0.3  # weight of the newest observation in the running estimates


@dataclass
class Draft:
    """Guessed next tokens; `probs` (one row per token, over the model's vocabulary) are the distributions they
    were drawn from, or None when they were chosen outright (q(x) = 1)."""

    tokens: list[int]
    probs: mx.array | None = None
    setup_seconds: float = 0.0  # time spent catching a draft model up on the prompt, not part of the round's cost


class DraftSource(Protocol):
    def propose(self, context: list[int], reply_start: int, limit: int) -> Draft | None:
        """Up to `limit` tokens that may follow `context` (prompt + reply; the reply starts at `reply_start`)."""


class NgramIndex:
    """Where each n-gram (n = 1..max_n) of a growing token list ends, so the latest earlier occurrence of the
    list's own last n tokens is found without scanning it. The list may only grow (a sequence's context does)."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.ends: defaultdict[tuple[int, ...], list[int]] = defaultdict(list)
        self.indexed = 0

    def extend(self, tokens: Sequence[int]) -> None:
        for end in range(self.indexed + 1, len(tokens) + 1):
            for n in range(1, min(self.max_n, end) + 1):
                self.ends[tuple(tokens[end - n : end])].append(end)
        self.indexed = len(tokens)

    def occurrences(self, ngram: Sequence[int]) -> list[int]:
        return self.ends.get(tuple(ngram), [])


class PromptLookup:
    """Prompt lookup decoding: after the context's last n-gram (the longest n from `max_ngram` down that occurred
    before), propose what followed its latest earlier occurrence."""

    def __init__(self, max_ngram: int = 3):
        self.index = NgramIndex(max_ngram)

    def propose(self, context: list[int], reply_start: int, limit: int) -> Draft | None:
        self.index.extend(context)
        for n in range(min(self.index.max_n, len(context) - 1), 0, -1):
            earlier = [e for e in self.index.occurrences(context[-n:]) if e < len(context)]
            if earlier:
                tokens = context[earlier[-1] : earlier[-1] + limit]
                return Draft(tokens) if tokens else None
        return None


class PredictionSource:
    """OpenAI's Predicted Outputs: the expected reply's tokens are the guesses. The reply's last n-gram places it
    in the prediction (the occurrence nearest to where the previous alignment said it would be), and what follows
    there is proposed; where the reply leaves the prediction nothing is proposed until it comes back."""

    def __init__(self, prediction: list[int], max_ngram: int = 3):
        self.prediction = prediction
        self.index = NgramIndex(max_ngram)
        self.index.extend(prediction)
        self.aligned = 0  # the prediction position matched to the end of the reply, at the last alignment
        self.aligned_reply = 0  # the reply's length then

    def propose(self, context: list[int], reply_start: int, limit: int) -> Draft | None:
        reply = context[reply_start:]
        position = self._align(reply)
        if position is None:
            return None
        self.aligned, self.aligned_reply = position, len(reply)
        tokens = self.prediction[position : position + limit]
        return Draft(tokens) if tokens else None

    def _align(self, reply: list[int]) -> int | None:
        if not reply:
            return 0
        expected = self.aligned + len(reply) - self.aligned_reply
        for n in range(min(self.index.max_n, len(reply)), 0, -1):
            ends = self.index.occurrences(reply[-n:])
            if ends:
                return min(ends, key=lambda e: (abs(e - expected), e))
        return None


class DraftModelSource:
    """A small model proposes: its own PromptCache follows the context (trimmed where drafts were rejected), and it
    draws each guess from its distribution under the request's sampling settings (the argmax when greedy)."""

    def __init__(self, model: nn.Module, cache: PromptCache, sampling: SamplingParams, seed: int | None,
                 target_vocab: int, prefill_step_size: int = 512):
        self.model = model
        self.cache = cache
        # Its own key: the draft's draws must not shift the target's.
        self.sampler = Sampler(replace(sampling, repetition_penalty=1.0), None if seed is None else seed + 1)
        self.target_vocab = target_vocab
        self.prefill_step_size = prefill_step_size

    def propose(self, context: list[int], reply_start: int, limit: int) -> Draft | None:
        start = time.perf_counter()
        # A draft loaded with YaRN on demand switches its own cache when the drafts would outgrow its context.
        todo = self.cache.fit_rope(self.model.config.yarn_switch, self.cache.reuse(context), ahead=limit - 1)
        self.cache.prefill(self.model, todo[:-1], self.prefill_step_size)
        setup = time.perf_counter() - start
        y = mx.array(todo[-1:])
        tokens, probs = [], []
        for _ in range(limit):
            logits = self.model(y[None], cache=self.cache.caches)[:, -1, :]
            if self.sampler.params.greedy:
                y = mx.argmax(logits, axis=-1)
            else:
                step_q = self.sampler.probabilities(logits)
                y = self.sampler.categorical(mx.log(step_q))
                probs.append(step_q)
            mx.async_eval(y)
            tokens.append(y)
        mx.eval(tokens, probs)
        ids = [int(t) for t in tokens]
        self.cache.tokens += todo[-1:] + ids[:-1]
        # Ids past the model's vocabulary (a draft with a larger embedding) can never be accepted: stop before them.
        usable = next((i for i, t in enumerate(ids) if t >= self.target_vocab), len(ids))
        q = mx.concatenate(probs) if probs else None
        if q is not None:
            width = q.shape[-1]
            q = q[:usable, : self.target_vocab] if width >= self.target_vocab else mx.pad(
                q[:usable], [(0, 0), (0, self.target_vocab - width)])
        return Draft(ids[:usable], q, setup) if usable else None


@dataclass
class Speculation:
    """One sequence's speculative decoding: its draft sources, and running estimates of what drafts are worth."""

    sources: Sequence[DraftSource]
    max_draft: int = 4
    timed: bool = True  # False: the cost stays at its prior (seeded sampling: no reply may depend on timings)
    acceptance: float = 0.8  # draft tokens accepted per draft token verified (prior, then measured)
    extra_cost: float = 0.1  # what each drafted token adds to a round, relative to one plain step (prior)
    step_seconds: float | None = None  # a plain decode step, measured
    cost_measured: bool = False  # a round's cost has been measured (until then drafts are one token)
    plain_since_round: int = 0
    _last_plain_read: float | None = field(default=None, repr=False)

    def expected_tokens(self, k: int) -> float:
        """Tokens a round with `k` drafts yields on average: 1 + a + a^2 + ... + a^k for acceptance a."""
        a = min(self.acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def draft_length(self) -> int:
        """How many drafts to verify next: 0 for a plain step."""
        if self.timed and self.step_seconds is None:
            return 0  # measure a plain step first
        if self.timed and not self.cost_measured:
            return 1
        worth = [k for k in range(1, self.max_draft + 1)
                 if self.expected_tokens(k) / (1 + self.extra_cost * k) >= MIN_SPEED]
        if worth:
            return max(worth)
        return 1 if self.plain_since_round >= PROBE_EVERY else 0

    def propose(self, context: list[int], reply_start: int, limit: int) -> Draft | None:
        for source in self.sources:
            draft = source.propose(context, reply_start, limit)
            if draft is not None and draft.tokens:
                return draft
        return None

    def plain_token(self, now: float) -> None:
        """A plain step's token arrived at `now` (the sequence decoding alone): time the step."""
        if self._last_plain_read is not None:
            self.step_seconds = smoothed(self.step_seconds, now - self._last_plain_read)
        self._last_plain_read = now
        self.plain_since_round += 1

    def round_done(self, drafted: int, accepted: int, seconds: float) -> None:
        self.acceptance = smoothed(self.acceptance, accepted / drafted)
        if self.timed and self.step_seconds:
            cost = max(0.0, (seconds / self.step_seconds - 1) / drafted)
            self.extra_cost = smoothed(self.extra_cost, cost) if self.cost_measured else cost
            self.cost_measured = True
        self.plain_since_round = 0
        self._last_plain_read = None


def smoothed(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


def accept_drafts(p: mx.array, q: mx.array | None, drafts: list[int], sampler: Sampler) -> tuple[int, int]:
    """Speculative sampling over one round: how many of `drafts` are accepted, and the token that follows them.

    `p` (k + 1, vocab) are the model's distributions at each draft position and after the last; `q` (k, vocab) the
    distributions the drafts were drawn from (None: chosen outright). Greedy samplers accept while the draft is the
    argmax. The result is distributed as drawing token by token from `p`.
    """
    k = len(drafts)
    if sampler.params.greedy:
        targets = cast(list[int], mx.argmax(p, axis=-1).tolist())
        n = next((i for i in range(k) if targets[i] != drafts[i]), k)
        return n, targets[n]
    d = mx.array(drafts)[:, None]
    q = (mx.arange(p.shape[-1])[None] == d).astype(mx.float32) if q is None else q
    ratio = mx.take_along_axis(p[:k], d, axis=-1)[:, 0] / mx.take_along_axis(q, d, axis=-1)[:, 0]
    accepted = cast(list[bool], (sampler.uniform((k,)) < ratio).tolist())
    n = next((i for i in range(k) if not accepted[i]), k)
    if n == k:
        return n, int(sampler.categorical(mx.log(p[k])))
    residual = mx.maximum(p[n] - q[n], 0.0)
    total = residual.sum()
    # p == q at a rejected token cannot happen (it would have been accepted); guard the division all the same.
    residual = mx.where(total > 0, residual / mx.maximum(total, 1e-30), p[n])
    return n, int(sampler.categorical(mx.log(residual)))


def check_draft_tokenizer(draft: Tokenizer, target: Tokenizer) -> None:
    """A draft model must read and write the target's token ids: the same vocabulary, the same added tokens."""
    if draft.fingerprint != target.fingerprint:
        raise QwenMLXError("the draft model's tokenizer differs from the model's; use a draft of the same family "
                           "(e.g. Qwen2.5-0.5B-Instruct for Qwen2.5-7B-Instruct)", "draft_model")


def check_cache_can_rewind(rotating: bool, flag: str = "max_kv_size") -> None:
    """Speculation rewinds the cache past the drafts it rejects; a rotating cache cannot be once it wraps (the
    positions it overwrote are gone). The one place this rule lives: requests, flags and sequences ask it."""
    if rotating:
        raise QwenMLXError(f"speculative decoding needs a KV cache it can rewind, and a rotating one ({flag}) cannot "
                           "be once it wraps: drop one of the two", "max_kv_size")


def make_speculation(settings: SpeculationSettings, cache: PromptCache, sampling: SamplingParams, seed: int | None,
                     vocab_size: int, prefill_step_size: int, timed: bool = True) -> Speculation:
    """A sequence's Speculation from its request's `SpeculationSettings`; a draft model keeps its own cache as
    `cache.draft`, so the next turn of the conversation reuses the draft's prefix too. With `timed` False the
    draft lengths never depend on timings."""
    check_cache_can_rewind(any(isinstance(c, RotatingKVCache) for c in cache.caches))
    k = settings.num_draft_tokens
    sources: list[Limited] = []
    if settings.prediction:
        sources.append(Limited(PredictionSource(list(settings.prediction)), k))
    if settings.prompt_lookup:
        sources.append(Limited(PromptLookup(), settings.prompt_lookup))
    if settings.draft is not None:
        if cache.draft is None:
            cache.draft = PromptCache.new(settings.draft.model)
        sources.append(Limited(DraftModelSource(settings.draft.model, cache.draft, sampling, seed, vocab_size,
                                                prefill_step_size), k))
    timed = timed and (sampling.greedy or seed is None)
    return Speculation(sources, max_draft=max(s.limit for s in sources), timed=timed)


@dataclass
class Limited:
    """A draft source that proposes at most `limit` tokens a round."""

    source: DraftSource
    limit: int

    def propose(self, context: list[int], reply_start: int, limit: int) -> Draft | None:
        return self.source.propose(context, reply_start, min(limit, self.limit))


@dataclass(frozen=True)
class DraftModel:
    """A draft model and its tokenizer, as `load_draft` returns them."""

    model: nn.Module
    tokenizer: Tokenizer

    @classmethod
    def of(cls, value: object) -> DraftModel:
        """A DraftModel from what `load_draft` or `load` returned (checked: untyped callers may pass anything)."""
        if isinstance(value, DraftModel):
            return value
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Tokenizer):
            return cls(*value)
        raise QwenMLXError("draft_model must be what qwen_mlx.load_draft(path) (or qwen_mlx.load(path)) returns",
                           "draft_model")


def load_draft(path_or_repo: str, target: Tokenizer | None = None,
               context_length: int | None = None) -> DraftModel:
    """Load a draft model (e.g. "mlx-community/Qwen2.5-0.5B-Instruct-4bit"), checked against `target`'s tokenizer
    when one is given; `context_length` as for `load` (the target's, so the draft follows long contexts too)."""
    from qwen_mlx.store.load import load

    draft = DraftModel(*load(path_or_repo, context_length=context_length))
    if target is not None:
        check_draft_tokenizer(draft.tokenizer, target)
    return draft
