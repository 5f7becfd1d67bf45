"""Prefill + decode: chunked prompt processing, the async decode loop, stop conditions and statistics."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.cache import PromptCache
from qwen_mlx.chat import ToolCall, parse_tool_calls
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.grammar import TokenConstraint, json_schema_grammar
from qwen_mlx.sample import Sampler, SamplingParams, apply_repetition_penalty
from qwen_mlx.tokenizer import Tokenizer

MAX_TOKENS_LIMIT = 8192  # Qwen2.5's generation limit (model card)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs

Prompt = str | Sequence[dict[str, Any]] | Sequence[int]


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
    context_size: int = 0  # the model's context length


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


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str
    stats: GenerationStats
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_errors: list[str] = field(default_factory=list)


def encode_prompt(
    tokenizer: Tokenizer, prompt: Prompt, vocab_size: int, tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids for a plain string (ordinary text), chat messages (the chat template), or ids as they are.

    Ids are checked against the model's vocabulary, which may be padded past the tokenizer's (Qwen2.5: 152064 vs
    151665): a model can generate such ids, and they may be fed back.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise QwenMLXError("the prompt is empty")
        if tools:
            raise QwenMLXError("tools need chat messages as the prompt, e.g. [{'role': 'user', 'content': ...}]")
        return tokenizer.encode(prompt)
    items = list(prompt)
    if not items:
        raise QwenMLXError("the prompt is empty")
    if all(isinstance(m, dict) for m in items):
        for m in items:
            if "role" not in m or ("content" not in m and "tool_calls" not in m):
                raise QwenMLXError(f"chat message {m!r} needs a 'role' and a 'content'")
        return tokenizer.apply_chat_template(items, tools=tools, add_generation_prompt=True, tokenize=True)
    if all(isinstance(t, int) for t in items):
        bad = [t for t in items if not 0 <= t < vocab_size]
        if bad:
            raise QwenMLXError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        return items
    raise QwenMLXError("the prompt must be a string, a list of chat messages (dicts) or a list of token ids")


class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop is never shown, not even in part."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to show now, and whether a stop string was reached."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            safe, self.pending = self.pending[: min(hits)], ""
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


def prefill(
    model: nn.Module,
    tokens: list[int],
    prompt_cache: PromptCache,
    step_size: int,
    cancel: threading.Event | None = None,
) -> bool:
    """Run `tokens` through the model into the cache, `step_size` at a time so activations stay bounded.

    Returns False if `cancel` was set between two chunks (a long prompt can take minutes on a CPU); the cache then
    holds the chunks done so far, and `prompt_cache.tokens` says which.
    """
    for start in range(0, len(tokens), step_size):
        if cancel is not None and cancel.is_set():
            return False
        chunk = tokens[start : start + step_size]
        model(mx.array(chunk)[None], cache=prompt_cache.caches)
        mx.eval([(c.keys, c.values) for c in prompt_cache.caches])
        prompt_cache.tokens += chunk
    return True


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Prompt,
    *,
    max_tokens: int = 512,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    tools: list[dict[str, Any]] | None = None,
    prompt_cache: PromptCache | None = None,
    max_kv_size: int | None = None,
    keep: int = 4,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prefill_step_size: int = 512,
    cancel: threading.Event | None = None,
    json_schema: dict[str, Any] | None = None,
    response_format: dict[str, Any] | None = None,
    grammar: str | None = None,
    logprobs: int | None = None,
) -> Iterator[GenerationChunk]:
    """Generate a reply, yielding text as it is decoded.

    Sampling defaults come from the model's generation_config.json (`model.sampling_defaults`); any argument
    given overrides them, and `temperature=0` is greedy. Generation ends at an end-of-turn id, a `stop` string
    (never shown), `max_tokens` or the context limit, or when `cancel` is set. With `prompt_cache`, the longest
    prefix it shares with this prompt is reused and the cache is left holding the whole exchange.

    Structured output: `json_schema` (or OpenAI's `response_format`, `{"type": "json_object"}` or
    `{"type": "json_schema", "json_schema": {"schema": ...}}`) makes the reply one JSON value valid against the
    schema, by masking every token that would break it; `grammar` takes any llguidance grammar (e.g.
    `qwen_mlx.grammar.tool_call_grammar`). `logprobs=k` reports each token's log-probability and the k likeliest.
    """
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise QwenMLXError(f"max_tokens {max_tokens} must be between 1 and {MAX_TOKENS_LIMIT}")
    defaults = getattr(model, "sampling_defaults", SamplingParams())
    params = defaults.updated(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty
    )
    prompt_ids = encode_prompt(tokenizer, prompt, model.config.vocab_size, tools)
    context_size = model.config.context_length
    if len(prompt_ids) >= context_size:
        raise QwenMLXError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {context_size}; shorten it"
        )
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise QwenMLXError(f"logprobs {logprobs} must be between 0 and {MAX_TOP_LOGPROBS}")
    grammar = structured_output_grammar(json_schema, response_format, grammar)
    vocab_size = model.config.vocab_size
    constraint = TokenConstraint(tokenizer, vocab_size, grammar) if grammar is not None else None
    if prompt_cache is None:
        prompt_cache = PromptCache.new(model, max_kv_size, keep, kv_bits, kv_group_size)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    eos = set(tokenizer.eos_token_ids)
    sampler = Sampler(params, seed)
    detokenizer = tokenizer.detokenizer()
    matcher = StopMatcher(stops)
    history = mx.array(prompt_ids) if params.repetition_penalty != 1.0 else mx.array([], dtype=mx.int32)

    start = time.perf_counter()
    mx.reset_peak_memory()
    todo = prompt_cache.reuse(prompt_ids)
    stats = GenerationStats(prompt_tokens=len(prompt_ids), prefilled_tokens=len(todo), context_size=context_size)
    # All but the last prompt token are prefilled in chunks; the last one's logits give the first reply token.
    if not prefill(model, todo[:-1], prompt_cache, prefill_step_size, cancel):
        yield GenerationChunk("", None, "cancelled", stats)
        return

    def step(token: mx.array) -> tuple[mx.array, tuple[mx.array, ...]]:
        """The next token (and its log-probabilities, if asked) after `token`, queued for evaluation."""
        nonlocal history
        logits = model(token[None], cache=prompt_cache.caches)[:, -1, :]
        if constraint is not None:
            # Start the model on this step, and compute the grammar's mask on the host meanwhile.
            mx.async_eval(logits)
            logits = constraint.apply(logits)
        if params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
        next_token = sampler(logits)
        if params.repetition_penalty != 1.0:
            history = mx.concatenate([history, next_token])
        extra = token_logprobs(logits, next_token, logprobs) if logprobs is not None else ()
        mx.async_eval(next_token, *extra)
        return next_token, extra

    def feed(token_ids: list[int]) -> tuple[mx.array, tuple[mx.array, ...]]:
        prompt_cache.tokens += token_ids
        return step(mx.array(token_ids))

    y, y_logprobs = feed(todo[-1:])
    generated: list[int] = []
    finish, hit_stop = "length", False
    first_token_time = None
    while True:
        token = y.item()
        logprob_info = _read_logprobs(y_logprobs)
        if first_token_time is None:
            first_token_time = time.perf_counter()
            stats.time_to_first_token = first_token_time - start
            stats.prompt_tps = len(todo) / stats.time_to_first_token
        if token in eos:
            finish = "stop"
            break
        generated.append(token)
        if constraint is not None:
            constraint.consume(token)
        at_limit = len(generated) >= max_tokens or prompt_cache.offset + 1 >= context_size
        cancelled = cancel is not None and cancel.is_set()
        if not (at_limit or cancelled):
            # Queue the next step before streaming this token, so the model computes while Python works.
            y, y_logprobs = feed([token])
        text, hit_stop = matcher.feed(detokenizer.add(token))
        yield GenerationChunk(text, token, logprob=logprob_info[0], top_logprobs=logprob_info[1])
        if hit_stop:
            finish = "stop"
            break
        if cancel is not None and cancel.is_set():  # checked again: the caller may have set it while we yielded
            finish = "cancelled"
            break
        if at_limit:
            break
    tail = ""
    if not hit_stop:
        # The stream is over: bytes of an unfinished character show as U+FFFD (as decode shows them), and text
        # held back as a possible stop-string start is released.
        tail, hit_stop = matcher.feed(detokenizer.finalize())
        if not hit_stop:
            tail += matcher.flush()
    end = time.perf_counter()
    stats.generation_tokens = len(generated)
    decode_time = end - (first_token_time or end)
    stats.generation_tps = (len(generated) - 1) / decode_time if len(generated) > 1 and decode_time > 0 else 0.0
    stats.peak_memory_gb = mx.get_peak_memory() / 1e9
    stats.context_tokens = prompt_cache.offset
    yield GenerationChunk(tail, None, finish, stats)


def structured_output_grammar(
    json_schema: dict[str, Any] | None, response_format: dict[str, Any] | None, grammar: str | None
) -> str | None:
    """The one grammar that `json_schema`, an OpenAI `response_format` or an explicit `grammar` asks for."""
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise QwenMLXError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
            json_schema = spec.get("schema", {})
        elif kind == "json_object":
            json_schema = {"type": "object"}
        elif kind != "text":
            raise QwenMLXError(
                f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'"
            )
    given = [g for g in (json_schema, grammar) if g is not None]
    if len(given) > 1:
        raise QwenMLXError("give only one of json_schema / response_format and grammar")
    return json_schema_grammar(json_schema) if json_schema is not None else grammar


def token_logprobs(logits: mx.array, token: mx.array, top: int) -> tuple[mx.array, ...]:
    """Log-probability of `token` under `logits` (as sampled from, at temperature 1), and the `top` likeliest."""
    logprobs = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, token[:, None], axis=-1)[0, 0]
    if top == 0:
        return (chosen,)
    ids = mx.argpartition(-logprobs, kth=top - 1, axis=-1)[0, :top]
    values = logprobs[0, ids]
    order = mx.argsort(-values)
    return chosen, ids[order], values[order]


def _read_logprobs(arrays: tuple[mx.array, ...]) -> tuple[float | None, list[tuple[int, float]] | None]:
    if not arrays:
        return None, None
    chosen = arrays[0].item()
    top = list(zip(arrays[1].tolist(), arrays[2].tolist(), strict=True)) if len(arrays) > 1 else []
    # Tokens a grammar rules out have probability 0: they are not among the likeliest.
    return chosen, [(t, v) for t, v in top if v != -math.inf]


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: Prompt, **kwargs: Any) -> GenerationResult:
    """The whole reply at once (see `stream_generate` for the arguments), with tool calls parsed when `tools`
    were given."""
    text, tokens = [], []
    for chunk in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
        if chunk.finish_reason is not None:
            finish, stats = chunk.finish_reason, chunk.stats
    reply = "".join(text)
    result = GenerationResult(reply, tokens, finish, stats)
    if kwargs.get("tools"):
        parsed = parse_tool_calls(reply)
        result.tool_calls, result.tool_call_errors = parsed.calls, parsed.errors
    return result
