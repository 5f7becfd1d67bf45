"""The text layer over the token loop (`decode.py`): prompts in, streamed text out, with stop strings, tool calls
and statistics; one reply (`stream_generate`, `generate`) or many decoded together (`batch_generate`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.engine.decode import Decoder, Event
from qwen_mlx.engine.decode import Sequence as TokenSequence
from qwen_mlx.engine.request import GenerationRequest, Prompt, check_int, prepare_request
from qwen_mlx.model.cache import PromptCache
from qwen_mlx.text.tokenizer import Tokenizer
from qwen_mlx.text.tool_calls import ToolCall, parse_tool_calls, tool_names


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually computed: the rest came from a reused prompt cache
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    time_to_first_token: float = 0.0  # seconds
    peak_memory_gb: float = 0.0
    context_tokens: int = 0  # positions in the context after this reply
    context_length: int = 0  # the model's context length
    decode_passes: int = 0  # forward passes of the model that produced reply tokens
    draft_tokens: int = 0  # speculative decoding: tokens proposed and verified
    accepted_draft_tokens: int = 0  # ... and the ones the model agreed with
    reencoded_tokens: int = 0  # YaRN on demand: context tokens computed again when the RoPE switched


@dataclass
class GenerationChunk:
    """One step of `stream_generate`: new text (possibly empty while a character or stop string is pending)
    and the token behind it; the last chunk has `finish_reason` and `stats` and no token."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    stats: GenerationStats | None = None
    logprob: float | None = None  # the token's log-probability under the model (with `logprobs=`)
    top_logprobs: list[tuple[int, float]] | None = None  # the `logprobs` most likely tokens at this step
    stop_sequence: str | None = None  # on the last chunk: the stop string that ended the reply, if one did


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str
    stats: GenerationStats
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_errors: list[str] = field(default_factory=list)


class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop is never shown, not even in part."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None  # the stop string reached (the earliest in the text), once one is

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to show now, and whether a stop string was reached."""
        self.pending += text
        hits = [(i, s) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            first, self.matched = min(hits, key=lambda hit: hit[0])
            safe, self.pending = self.pending[:first], ""
            return safe, True
        hold = max((_overlap(self.pending, s) for s in self.stops), default=0)
        safe = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(safe) :]
        return safe, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class ReplyText:
    """One sequence's events as text chunks: whole characters only, stop strings never shown, and a last chunk
    with the finish reason and the statistics. `stopped` says a stop string was reached: the caller then ends
    the sequence (`Decoder.finish`), whose event gives the last chunk."""

    def __init__(self, tokenizer: Tokenizer, sequence: TokenSequence, context_length: int):
        self.sequence = sequence
        self.detokenizer = tokenizer.detokenizer()
        self.matcher = StopMatcher(sequence.request.stop)
        self.context_length = context_length
        self.start = time.perf_counter()
        self.first_token_time: float | None = None
        self.tokens: list[int] = []  # the reply's tokens so far
        self.stopped = False  # a stop string was reached
        self.done = False  # the last chunk was made

    def chunk(self, event: Event) -> GenerationChunk:
        token = event.token
        if token is None:
            self.done = True
            # "error": the sequence's processor failed (`sequence.error`); the caller raises or reports it
            tail = self._tail()
            return GenerationChunk(tail, None, event.finish, self.stats(), stop_sequence=self.matcher.matched)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.tokens.append(token.id)
        text, self.stopped = self.matcher.feed(self.detokenizer.add(token.id))
        return GenerationChunk(text, token.id, logprob=token.logprob, top_logprobs=token.top_logprobs)

    def _tail(self) -> str:
        if self.stopped:
            return ""
        # The stream is over: bytes of an unfinished character show as U+FFFD (as decode shows them), and text
        # held back as a possible stop-string start is released.
        tail, self.stopped = self.matcher.feed(self.detokenizer.finalize())
        return tail if self.stopped else tail + self.matcher.flush()

    def stats(self) -> GenerationStats:
        s = self.sequence
        end = time.perf_counter()
        first = self.first_token_time
        ttft = (first or end) - self.start
        decode_time = end - (first or end)
        return GenerationStats(
            prompt_tokens=len(s.request.prompt_ids),
            prefilled_tokens=s.prefilled_tokens,
            generation_tokens=s.generated,
            prompt_tps=s.prefilled_tokens / ttft if first is not None and ttft > 0 else 0.0,
            generation_tps=(s.generated - 1) / decode_time if s.generated > 1 and decode_time > 0 else 0.0,
            time_to_first_token=ttft if first is not None else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            context_tokens=s.cache.offset,
            context_length=self.context_length,
            decode_passes=s.counters.passes,
            draft_tokens=s.counters.drafted,
            accepted_draft_tokens=s.counters.accepted,
            reencoded_tokens=s.reencoded,
        )


def text_chunks(decoder: Decoder, replies: dict[TokenSequence, ReplyText]) -> Iterator[tuple[ReplyText,
                                                                                             GenerationChunk]]:
    """One decoder step's events as (reply, chunk) pairs: the text layer over the token loop. A sequence whose
    text reaches a stop string is ended there (its events after that are dropped)."""
    for event in decoder.step():
        reply = replies[event.sequence]
        if reply.done:
            continue
        chunk = reply.chunk(event)
        yield reply, chunk
        if reply.stopped and not reply.done:
            kept = len(reply.tokens)
            yield reply, reply.chunk(decoder.finish(event.sequence, "stop", kept=kept))


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Prompt,
    *,
    prompt_cache: PromptCache | None = None,
    cancel: threading.Event | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Iterator[GenerationChunk]:
    """Generate a reply, yielding text as it is decoded.

    Options (all checked before any compute, see `request.prepare_request`):
    - sampling: `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty` (defaults: the model's
      generation_config.json, `model.sampling_defaults`; `temperature=0` is greedy), `seed` (any integer);
    - limits: `max_tokens` (default 512, at most 8192), `stop` strings (never shown);
    - `tools`: OpenAI-style function schemas for the chat template; `generate` parses the calls;
    - structured output: `json_schema` (or OpenAI's `response_format`, `{"type": "json_object"}` or
      `{"type": "json_schema", "json_schema": {"schema": ...}}`) makes the reply one JSON value valid against
      the schema, by masking every token that would break it; `grammar` takes any llguidance grammar (e.g.
      `qwen_mlx.text.grammar.tool_call_grammar`);
    - `logprobs=k`: each token's log-probability and the k likeliest;
    - the KV cache: `max_kv_size` + `keep` (rotating), `kv_bits` + `kv_group_size` (quantized);
      `prefill_step_size` prompt tokens per forward pass;
    - speculative decoding (exact: greedy replies are token for token the plain ones): `draft_model` (what
      `load_draft` returns), `prompt_lookup=N` (up to N tokens copied from the context), `prediction` (the
      expected reply as text or token ids, as OpenAI's Predicted Outputs), `num_draft_tokens` (default 4) a
      round.

    Generation ends at an end-of-turn id, a stop string, `max_tokens` or the context's end, or when `cancel` is
    set (also between two prefill chunks of a long prompt). With `prompt_cache`, the longest prefix it shares
    with this prompt is reused and the cache is left holding the whole exchange. `on_prefill(done, total)` hears
    how many of the prompt tokens to compute are done, after each prefill chunk (a progress bar for long prompts).
    """
    request = prepare_request(model, tokenizer, prompt, **options)
    yield from run_request(model, tokenizer, request, prompt_cache, cancel, on_prefill)


def run_request(model: nn.Module, tokenizer: Tokenizer, request: GenerationRequest,
                prompt_cache: PromptCache | None = None, cancel: threading.Event | None = None,
                on_prefill: Callable[[int, int], None] | None = None) -> Iterator[GenerationChunk]:
    """`stream_generate` for a request already checked."""
    mx.reset_peak_memory()
    decoder = Decoder(model, tokenizer)
    cache = prompt_cache if prompt_cache is not None else PromptCache.new(model, request.cache)
    sequence = decoder.add(request, cache, cancel, on_prefill)
    replies = {sequence: ReplyText(tokenizer, sequence, model.config.context_length)}
    while decoder.sequences:
        for _, chunk in text_chunks(decoder, replies):
            if chunk.finish_reason == "error":
                assert sequence.error is not None  # set with finish "error" (`Decoder.fail`)
                raise sequence.error
            yield chunk


def collect(chunks: Iterator[GenerationChunk], tools: list[dict[str, Any]] | None) -> GenerationResult:
    """The whole reply of a chunk stream, with its tool calls parsed when `tools` were given (`<tool_call>` blocks,
    or a reply that is only a JSON call naming one of the tools)."""
    text, tokens = [], []
    for chunk in chunks:
        text.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
        if chunk.finish_reason is not None:
            finish, stats = chunk.finish_reason, chunk.stats
    reply = "".join(text)
    assert stats is not None  # the last chunk of every stream has its finish reason and statistics
    result = GenerationResult(reply, tokens, finish, stats)
    if tools:
        parsed = parse_tool_calls(reply, tool_names(tools))
        result.tool_calls, result.tool_call_errors = parsed.calls, parsed.errors
    return result


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: Prompt, **kwargs: Any) -> GenerationResult:
    """The whole reply at once (see `stream_generate` for the arguments), with tool calls parsed when `tools`
    were given."""
    return collect(stream_generate(model, tokenizer, prompt, **kwargs), kwargs.get("tools"))


def batch_generate(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Prompt], *, max_batch: int = 8,
                   **options: Any) -> list[GenerationResult]:
    """One reply per prompt, in order, up to `max_batch` of them decoded together (one forward pass per step for
    all of them); `options` as for `stream_generate`, the same for every prompt. A greedy or seeded reply is the
    one the prompt gets alone."""
    check_int("max_batch", max_batch, 1)
    waiting = [prepare_request(model, tokenizer, p, **options) for p in prompts]
    mx.reset_peak_memory()
    decoder = Decoder(model, tokenizer)
    replies: dict[TokenSequence, ReplyText] = {}
    chunks: dict[TokenSequence, list[GenerationChunk]] = {}
    while waiting or decoder.sequences:
        while waiting and len(decoder.sequences) < max_batch:
            request = waiting.pop(0)
            sequence = decoder.add(request, PromptCache.new(model, request.cache))
            replies[sequence] = ReplyText(tokenizer, sequence, model.config.context_length)
            chunks[sequence] = []
        for reply, chunk in text_chunks(decoder, replies):
            if chunk.finish_reason == "error":
                assert reply.sequence.error is not None  # set with finish "error" (`Decoder.fail`)
                raise reply.sequence.error
            chunks[reply.sequence].append(chunk)
    return [collect(iter(c), s.request.tools) for s, c in chunks.items()]
