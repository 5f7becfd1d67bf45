"""The token loop: prompts prefilled in chunks, then one forward pass per step for all the sequences decoding,
each with its own sampler, logits processors, limits and cancel flag.

`Decoder.step()` is one round of it: the tokens of the step in flight are read (the only wait on the device), the
next step is queued at once for the sequences that go on, so the model computes while the caller turns tokens into
text; then one prefill chunk of a joining sequence is queued. With one sequence this is the classic pipelined
decode loop; with several, they share each forward pass (batching) and a long prompt joins a chunk at a time, so
streams already running keep streaming. A sequence decoding alone with a speculation source runs speculative
rounds instead (`speculative.py`): several tokens verified per forward pass.

`generate.py` puts the text layer on top: detokenizing, stop strings, tool calls, statistics.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.engine.request import GenerationRequest
from qwen_mlx.engine.sample import LogitsProcessor, RepetitionPenalty, Sampler
from qwen_mlx.engine.speculative import accept_drafts, make_speculation
from qwen_mlx.model.cache import BaseCache, PromptCache, RowsCache
from qwen_mlx.text.grammar import GrammarMask
from qwen_mlx.text.tokenizer import Tokenizer


@dataclass
class Token:
    """One generated token, with its log-probability and the likeliest alternatives when they were asked for."""

    id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    drafted: bool = False  # proposed by a speculation source and accepted by the model


@dataclass
class Event:
    """What a step did for one sequence: a new token, or the end of its token loop (`finish`: "stop" at an
    end-of-turn id, "length" at max_tokens or the context's end, "cancelled")."""

    sequence: Sequence
    token: Token | None = None
    finish: str | None = None


@dataclass
class Counters:
    passes: int = 0  # forward passes that produced reply tokens (prefill not counted)
    drafted: int = 0  # draft tokens proposed and verified
    accepted: int = 0  # of those, the ones the model agreed with


def make_processors(request: GenerationRequest, tokenizer: Tokenizer, vocab_size: int) -> list[LogitsProcessor]:
    """The request's logits processors, in the order they apply: the grammar's mask, then the repetition
    penalty (as the single-token loop always applied them)."""
    processors: list[LogitsProcessor] = []
    if request.grammar is not None:
        processors.append(GrammarMask(tokenizer, vocab_size, request.grammar))
    if request.sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(request.sampling.repetition_penalty))
    return processors


class Sequence:
    """One request in the token loop: its cache, where it stands, and how it picks its tokens."""

    def __init__(self, request: GenerationRequest, cache: PromptCache, processors: list[LogitsProcessor],
                 vocab_size: int, cancel: threading.Event | None = None,
                 on_prefill: Callable[[int, int], None] | None = None, timed: bool = True,
                 yarn_switch: int | None = None):
        self.request = request
        # called with (tokens computed, to compute) after each chunk of a prefill: the prompt's, or a re-encode's
        self.on_prefill = on_prefill
        self.cache = cache
        self.processors = processors
        self.sampler = Sampler(request.sampling, request.seed)
        self.cancel = cancel or threading.Event()
        self.speculation = None if request.speculation is None else make_speculation(
            request.speculation, cache, request.sampling, request.seed, vocab_size, request.prefill_step_size, timed)
        self.context = list(request.prompt_ids)  # prompt + reply so far: what the processors see
        self.yarn_switch = yarn_switch  # YaRN on demand: the positions a sequence keeps under plain RoPE
        reused = cache.reuse(request.prompt_ids)
        todo = cache.fit_rope(yarn_switch, reused)
        self.reencoded = len(todo) - len(reused)  # cached tokens computed again, under the other RoPE
        self.prefilled_tokens = len(todo)  # prompt tokens computed here; the rest came from the cache
        # All but the last prompt token are prefilled in chunks; the last one's logits give the first reply token.
        self.todo, self.feed = todo[:-1], todo[-1:]
        self.prefill_total = len(todo)  # of the prefill under way: todo and feed as it began
        self.pending: tuple[mx.array, ...] | None = None  # the next token (and logprobs) of a step in flight
        self.generated = 0
        self.finish: str | None = None
        self.error: Exception | None = None  # what ended it, with finish "error"
        self.counters = Counters()

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def switch_rope(self) -> bool:
        """YaRN on demand, as decoding is about to take the context past the original length: the cache is
        emptied and switched, and everything it held is prefilled again (chunk by chunk, between the steps of
        other sequences, cancel checked between chunks) before the pending token goes on. True if it switched."""
        todo = self.cache.fit_rope(self.yarn_switch, [], ahead=len(self.feed))
        if not todo:
            return False
        self.todo, self.prefill_total = todo, len(todo) + len(self.feed)
        self.reencoded += len(todo)
        return True

    def remaining(self, context_length: int) -> int:
        """How many more tokens it may generate: max_tokens, and the positions left in the context."""
        return min(self.request.max_tokens - self.generated, context_length - len(self.context))

    def pick(self, logits: mx.array) -> tuple[mx.array, ...]:
        """The next token after `self.context` from its logits (1, vocab), and its logprobs if asked: queued."""
        for processor in self.processors:
            logits = processor(self.context, logits)
        token = self.sampler(logits)
        extra = token_logprobs(logits, token, self.request.logprobs) if self.request.logprobs is not None else ()
        mx.async_eval(token, *extra)
        return token, *extra


def token_logprobs(logits: mx.array, token: mx.array, top: int) -> tuple[mx.array, ...]:
    """Log-probability of `token` under `logits` (as sampled from, at temperature 1), and the `top` likeliest."""
    logprobs = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, token.reshape(-1, 1), axis=-1)[:, 0]
    if top == 0:
        return (chosen,)
    ids = mx.argpartition(-logprobs, kth=top - 1, axis=-1)[:, :top]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return chosen, mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


def read_token(arrays: tuple[mx.array, ...], row: int = 0, drafted: bool = False) -> Token:
    """Row `row` of a step's (token, logprob, top ids, top logprobs) arrays, evaluated, as a Token."""
    token = Token(int(arrays[0][row]), drafted=drafted)
    if len(arrays) > 1:
        token.logprob = float(arrays[1][row])
        top = zip(cast(list[int], arrays[2][row].tolist()), cast(list[float], arrays[3][row].tolist()),
                  strict=True) if len(arrays) > 2 else []
        # Tokens a grammar rules out have probability 0: they are not among the likeliest.
        token.top_logprobs = [(t, v) for t, v in top if v != -math.inf]
    return token


def speculative_round(model: nn.Module, s: Sequence, context_length: int, eos: set[int]) -> list[Token] | None:
    """Draft, verify in one forward pass, and return the tokens that stand (the accepted drafts and the model's
    next token), with the caches trimmed back to them; None when no draft is worth verifying now."""
    spec = s.speculation
    assert spec is not None  # the Decoder speculates only for a sequence that has draft sources
    k = min(spec.draft_length(), s.remaining(context_length) - 1)
    room = s.cache.plain_room(s.yarn_switch)
    if room is not None:  # drafts stop short of YaRN on demand's switch, which the next plain step makes
        k = min(k, room - len(s.feed))
    if k <= 0:
        return None
    started = time.perf_counter()
    draft = spec.propose(s.context, len(s.request.prompt_ids), k)
    if draft is None:
        return None
    drafts = allowed_drafts(s, draft.tokens[:k], eos)
    if not drafts:
        return None
    feed = s.feed + drafts
    logits = model(mx.array(feed)[None], cache=s.cache.caches)[0]
    s.cache.tokens += feed
    rows = []
    for i in range(len(feed)):
        row = logits[i : i + 1]
        for processor in s.processors:
            row = processor(s.context + drafts[:i], row)
        rows.append(row)
    processed = mx.concatenate(rows)
    q = draft.probs[: len(drafts)] if draft.probs is not None else None
    n, bonus = accept_drafts(s.sampler.probabilities(processed), q, drafts, s.sampler)
    s.cache.trim(len(drafts) - n)
    emitted = drafts[:n] + [bonus]
    if s.request.logprobs is not None:
        arrays = (mx.array(emitted), *token_logprobs(processed[: n + 1], mx.array(emitted), s.request.logprobs))
        mx.eval(arrays)
        tokens = [read_token(arrays, i, drafted=i < n) for i in range(n + 1)]
    else:
        tokens = [Token(t, drafted=i < n) for i, t in enumerate(emitted)]
    s.counters.passes += 1
    s.counters.drafted += len(drafts)
    s.counters.accepted += n
    spec.round_done(len(drafts), n, time.perf_counter() - started - draft.setup_seconds)
    return tokens


def allowed_drafts(s: Sequence, drafts: list[int], eos: set[int]) -> list[int]:
    """The drafts cut after an end-of-turn id (the reply would end there) and where a processor (a grammar) rules
    a token out."""
    end = next((i for i, t in enumerate(drafts) if t in eos), None)
    drafts = drafts if end is None else drafts[: end + 1]
    for processor in s.processors:
        allowed = getattr(processor, "allowed_draft", None)
        if allowed is not None:
            drafts = drafts[: allowed(s.context, drafts)]
    return drafts


@dataclass
class Decoder:
    """The sequences being generated for one model, advanced together one `step()` at a time."""

    model: nn.Module
    tokenizer: Tokenizer
    sequences: list[Sequence] = field(default_factory=list)  # the caller decides how many decode together
    passes: int = 0  # batched forward passes that produced tokens, over all sequences
    # False: nothing depends on timings (ranks of a parallel model must all take the same steps, `lockstep`)
    timed: bool = True
    _prefill_in_flight: list[mx.array] = field(default_factory=list)

    def add(self, request: GenerationRequest, cache: PromptCache, cancel: threading.Event | None = None,
            on_prefill: Callable[[int, int], None] | None = None) -> Sequence:
        """Start `request` in `cache`; `on_prefill(done, total)` hears how far its prompt's prefill has come."""
        vocab = self.model.config.vocab_size
        sequence = Sequence(request, cache, make_processors(request, self.tokenizer, vocab), vocab, cancel,
                            on_prefill, self.timed, self.model.config.yarn_switch)
        self.sequences.append(sequence)
        return sequence

    @property
    def decoding(self) -> list[Sequence]:
        """The sequences past their prefill, in the order they came."""
        return [s for s in self.sequences if not s.todo]

    def finish(self, sequence: Sequence, reason: str, kept: int | None = None) -> Event:
        """End a sequence (a stop string, an error): it leaves the batch; with `kept`, its reply is cut to that many
        tokens and the cache forgets what was computed past them."""
        if kept is not None and kept < sequence.generated:
            del sequence.context[len(sequence.context) - (sequence.generated - kept) :]
            sequence.generated = kept
        extra = len(sequence.cache.tokens) - len(sequence.context)
        if extra > 0 and sequence.cache.is_trimmable():
            sequence.cache.trim(extra)
        sequence.finish = reason
        sequence.pending = None
        if sequence in self.sequences:
            self.sequences.remove(sequence)
        return Event(sequence, finish=reason)

    def clear(self) -> None:
        """Drop every sequence (after an error that may have left their caches half-written)."""
        self.sequences.clear()
        self._prefill_in_flight = []

    def step(self) -> list[Event]:
        """Read the step in flight, queue the next, and prefill a chunk of a joining sequence."""
        mx.eval(self._prefill_in_flight)
        self._prefill_in_flight = []
        events = self._read()
        ready = [s for s in self.decoding if s.pending is None and not s.switch_rope()]
        decoding = self.decoding
        if len(decoding) == 1 and ready and ready[0].speculation is not None:
            events += self._speculate(ready[0])
        elif ready:
            events += self._queue(ready)
        return events + self._prefill_chunk()

    def _read(self) -> list[Event]:
        in_flight = [(s, s.pending) for s in self.sequences if s.pending is not None]
        mx.eval([a for _, arrays in in_flight for a in arrays])
        alone = len(self.sequences) == 1  # no other sequence shares its steps: a clean timing of one step
        events = []
        for s, arrays in in_flight:
            s.pending = None
            if s.cancelled:  # stopped while its token was being computed: that token is dropped
                events.append(self.finish(s, "cancelled"))
                continue
            if alone and s.speculation is not None:
                s.speculation.plain_token(time.perf_counter())
            events += self.accept(s, [read_token(arrays)])
        return events

    def accept(self, s: Sequence, tokens: list[Token]) -> list[Event]:
        """Take a sequence's new tokens in order, up to its end: an end-of-turn id, max_tokens, the context's end,
        or a cancel. What goes on gets the last token as its next input."""
        events: list[Event] = []
        eos = set(self.tokenizer.eos_token_ids)
        for token in tokens:
            if token.id in eos:
                return events + [self.finish(s, "stop")]
            s.generated += 1
            s.context.append(token.id)
            events.append(Event(s, token))
            if s.cancelled:
                return events + [self.finish(s, "cancelled")]
            if s.remaining(self.model.config.context_length) <= 0:
                return events + [self.finish(s, "length")]
        s.feed = [tokens[-1].id]
        return events

    def _queue(self, rows: list[Sequence]) -> list[Event]:
        """One forward pass for `rows`, each feeding its one pending token; their next tokens queued."""
        ids = mx.array([s.feed for s in rows])
        caches: list[BaseCache] | list[RowsCache]
        if len(rows) == 1:
            caches = rows[0].cache.caches
        else:
            caches = [RowsCache([s.cache.caches[i] for s in rows]) for i in range(len(self.model.layers))]
        logits = self.model(ids, cache=caches)[:, -1, :]
        self.passes += 1
        events = []
        for i, s in enumerate(rows):
            s.cache.tokens += s.feed
            s.counters.passes += 1
            try:
                s.pending = s.pick(logits[i : i + 1])
            except Exception as e:  # one request's processor failing (e.g. its grammar) ends that request only
                events.append(self.fail(s, e))
        return events

    def fail(self, sequence: Sequence, error: Exception) -> Event:
        sequence.error = error
        return self.finish(sequence, "error")

    def _speculate(self, s: Sequence) -> list[Event]:
        try:
            tokens = speculative_round(self.model, s, self.model.config.context_length,
                                       set(self.tokenizer.eos_token_ids))
        except Exception as e:
            return [self.fail(s, e)]
        if tokens is None:  # nothing worth verifying: a plain step
            return self._queue([s])
        self.passes += 1
        return self.accept(s, tokens)

    def _prefill_chunk(self) -> list[Event]:
        """Queue the next chunk of the first sequence still prefilling; a cancelled one ends here."""
        joining = next((s for s in self.sequences if s.todo), None)
        if joining is None:
            return []
        if joining.cancelled:
            return [self.finish(joining, "cancelled")]
        chunk = joining.todo[: joining.request.prefill_step_size]
        joining.todo = joining.todo[len(chunk) :]
        self._prefill_in_flight = joining.cache.run_chunk(self.model, chunk)
        mx.async_eval(self._prefill_in_flight)
        if joining.on_prefill is not None:
            # The last prompt token is computed with the first decode step: count it as done then.
            joining.on_prefill(joining.prefill_total - len(joining.todo) - 1, joining.prefill_total)
        return []
