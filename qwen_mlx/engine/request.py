"""A generation request, checked once: the prompt as token ids, sampling, limits, stop strings, the output
constraint, logprobs, and how the KV cache is kept.

Every front end (the Python API, the CLI, the web UI, the HTTP server) builds its request with `prepare_request`,
so a bad value gets the same one-line `QwenMLXError` wherever it comes from, with the argument at fault in the
error's `field` (the server reports it as the error's `param`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard, cast

import jinja2
import mlx.nn as nn

from qwen_mlx.engine.speculative import DraftModel, check_cache_can_rewind, check_draft_tokenizer
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import CacheSettings
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.store.memory import check_request_memory
from qwen_mlx.text.grammar import check_grammar, output_grammar
from qwen_mlx.text.tokenizer import Tokenizer

MAX_TOKENS_LIMIT = 8192  # Qwen2.5's generation limit (model card)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_NESTING = 64  # levels of nested JSON accepted in schemas and tools (deeper ones exhaust parsers' stacks)
MAX_DRAFT_TOKENS = 16  # on Apple silicon a pass over up to ~16 tokens costs about one pass
DEFAULT_DRAFT_TOKENS = 4  # benchmarks/bench_speculative.py: the most tokens per pass where drafts are right
ROLES = ("system", "user", "assistant", "tool")
# Every generated token is matched against every stop string, on the thread that steps every row of the batch: a
# request with 150k of them slowed other clients' replies sixteen-fold. OpenAI allows 4 (its route keeps that).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512

Prompt = str | Sequence[dict[str, Any]] | Sequence[int]


@dataclass(frozen=True)
class SpeculationSettings:
    """Where speculative decoding takes its drafts: a `prediction` of the reply, `prompt_lookup` (up to that many
    tokens copied from the context) and/or a `draft` model, each verifying up to `num_draft_tokens` a round."""

    draft: DraftModel | None = None
    prompt_lookup: int | None = None
    prediction: tuple[int, ...] | None = None
    num_draft_tokens: int = DEFAULT_DRAFT_TOKENS


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate, every value checked: the token loop and the text layer take it as it is."""

    prompt_ids: list[int]
    max_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # an llguidance grammar the reply must follow
    logprobs: int | None = None  # None: not asked; else how many alternatives per token
    tools: list[dict[str, Any]] | None = None  # the reply's <tool_call> blocks are parsed when given
    prefill_step_size: int = 512
    cache: CacheSettings = field(default_factory=CacheSettings)
    speculation: SpeculationSettings | None = None


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` if it is an integer in [low, high]; else a one-line error naming `name`."""
    if not is_int(value) or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"of at least {low}"
        raise QwenMLXError(f"{name} {value!r} must be an integer {bounds}", name)
    return value


def prepare_request(
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
    max_kv_size: int | None = None,
    keep: int = 4,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prefill_step_size: int = 512,
    json_schema: dict[str, Any] | None = None,
    response_format: dict[str, Any] | None = None,
    grammar: str | None = None,
    logprobs: int | None = None,
    draft_model: DraftModel | tuple[nn.Module, Tokenizer] | None = None,
    num_draft_tokens: int | None = None,
    prompt_lookup: int | None = None,
    prediction: str | Sequence[int] | None = None,
) -> GenerationRequest:
    """Check every argument of `stream_generate` and encode the prompt (see there for what they mean).

    Sampling parameters not given take the model's defaults (`model.sampling_defaults`). Errors name the
    argument, e.g. `QwenMLXError("top_p 0 must be in (0, 1]", field="top_p")`.
    """
    check_int("max_tokens", max_tokens, 1, MAX_TOKENS_LIMIT)
    sampling = model.sampling_defaults.updated(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty
    )
    if seed is not None and not is_int(seed):
        raise QwenMLXError(f"seed must be an integer, not {seed!r}", "seed")
    if logprobs is not None:
        check_int("logprobs", logprobs, 0, MAX_TOP_LOGPROBS)
    check_int("prefill_step_size", prefill_step_size, 1)
    stops = check_stop(stop)
    cache = CacheSettings(max_kv_size, keep, kv_bits, kv_group_size)
    cache.check_head_size(model.config.head_dim)
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise QwenMLXError("tools must be a list of {'type': 'function', 'function': {...}} objects", "tools")
    for name, value in (("tools", tools), ("json_schema", json_schema), ("response_format", response_format)):
        check_nesting(name, value)
    prompt_ids = encode_prompt(tokenizer, prompt, model.config.vocab_size, tools or None)
    context = model.config.context_length
    if len(prompt_ids) >= context:
        raise QwenMLXError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {context}; shorten it", "prompt"
        )
    check_request_memory(model, len(prompt_ids), max_tokens, cache, prefill_step_size)
    constraint = output_grammar(json_schema, response_format, grammar)
    if constraint is not None:
        check_grammar(tokenizer, model.config.vocab_size, constraint)
    speculation = speculation_settings(tokenizer, draft_model, num_draft_tokens, prompt_lookup, prediction)
    if speculation is not None:
        check_cache_can_rewind(cache.rotating)
    return GenerationRequest(
        prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling, seed=seed, stop=stops,
        grammar=constraint, logprobs=logprobs, tools=tools or None, prefill_step_size=prefill_step_size, cache=cache,
        speculation=speculation,
    )


def speculation_settings(tokenizer: Tokenizer | None,
                         draft_model: DraftModel | tuple[nn.Module, Tokenizer] | None,
                         num_draft_tokens: int | None, prompt_lookup: int | None,
                         prediction: str | Sequence[int] | None) -> SpeculationSettings | None:
    """The request's draft sources, checked (None: plain decoding). Without a `tokenizer` (flags checked before
    the model loads) only the numbers are: a prediction's text and a draft model need the model's tokenizer."""
    if num_draft_tokens is not None:
        check_int("num_draft_tokens", num_draft_tokens, 1, MAX_DRAFT_TOKENS)
    if prompt_lookup is not None:
        check_int("prompt_lookup", prompt_lookup, 1, MAX_DRAFT_TOKENS)
    if isinstance(prediction, str):
        check_text("prediction", prediction, "prediction")
        assert tokenizer is not None  # see the docstring
        predicted = tuple(tokenizer.encode(prediction)) if prediction else None
    elif isinstance(prediction, Sequence) and all(is_int(t) for t in prediction):
        predicted = tuple(cast(Sequence[int], prediction)) or None  # mypy re-adds str on isinstance(, Sequence)
    elif prediction is None:
        predicted = None
    else:
        raise QwenMLXError(f"prediction must be the expected reply (a string, or its token ids), not "
                           f"{type(prediction).__name__}", "prediction")
    draft = DraftModel.of(draft_model) if draft_model is not None else None
    if draft is not None:
        assert tokenizer is not None  # see the docstring
        check_draft_tokenizer(draft.tokenizer, tokenizer)
    if draft is None and prompt_lookup is None and predicted is None:
        return None
    return SpeculationSettings(draft, prompt_lookup, predicted, num_draft_tokens or DEFAULT_DRAFT_TOKENS)


def check_stop(stop: Sequence[str] | str | None) -> tuple[str, ...]:
    """Stop strings as a tuple (empty strings dropped: they would stop before the first token), at most
    MAX_STOP_STRINGS of at most MAX_STOP_CHARS characters."""
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return ()
    if isinstance(stops, bytes | dict) or not all(isinstance(s, str) for s in stops):
        raise QwenMLXError(f"stop must be a string or a list of strings, not {stop!r}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise QwenMLXError(f"at most {MAX_STOP_STRINGS} stop strings, not {len(stops)}", "stop")
    for s in stops:
        check_text("a stop string", s, "stop")
        if len(s) > MAX_STOP_CHARS:
            raise QwenMLXError(f"a stop string of {len(s)} characters is longer than the {MAX_STOP_CHARS} allowed",
                               "stop")
    return tuple(s for s in stops if s)


def check_nesting(field: str, value: Any) -> None:
    """Refuse JSON nested deeper than MAX_NESTING levels before a template, a schema compiler or the tokenizer
    recurses into it."""
    level, frontier = 0, [value]
    while frontier:
        level += 1
        if level > MAX_NESTING:
            raise QwenMLXError(f"{field} is nested more than {MAX_NESTING} levels deep; flatten it", field)
        frontier = [v for item in frontier for v in (item.values() if isinstance(item, dict) else item
                                                      if isinstance(item, list) else ())]
        frontier = [v for v in frontier if isinstance(v, dict | list)]


def check_text(what: str, text: str, field: str) -> None:
    """Text must be Unicode that UTF-8 can carry: a lone surrogate (undecodable bytes on a command line, a broken
    JSON escape) is a user's mistake to report, not a crash in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise QwenMLXError(f"{what} is not valid UTF-8 text (a lone surrogate at character {e.start}); send "
                           "well-formed UTF-8", field) from None


def encode_prompt(
    tokenizer: Tokenizer, prompt: Prompt, vocab_size: int, tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids for a plain string (ordinary text), chat messages (the chat template), or ids as they are.

    Ids are checked against the model's vocabulary, which may be padded past the tokenizer's (Qwen2.5: 152064 vs
    151665): a model can generate such ids, and they may be fed back.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise QwenMLXError("the prompt is empty", "prompt")
        check_text("the prompt", prompt, "prompt")
        if tools:
            raise QwenMLXError("tools need chat messages as the prompt, e.g. [{'role': 'user', 'content': ...}]",
                               "tools")
        return tokenizer.encode(prompt)
    if not isinstance(prompt, Sequence) or isinstance(prompt, bytes):
        raise QwenMLXError(f"the prompt must be a string, a list of chat messages (dicts) or a list of token ids, "
                           f"not {type(prompt).__name__}", "prompt")
    items = list(prompt)
    if not items:
        raise QwenMLXError("the prompt is empty", "prompt")
    if all(isinstance(m, dict) for m in items):
        messages = cast(list[dict[str, Any]], items)
        for i, m in enumerate(messages):
            check_message(i, m)
        check_nesting("messages", messages)
        if tools:
            check_text("tools", json.dumps(tools, ensure_ascii=False), "tools")
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
        except jinja2.TemplateError as e:  # the model's own template refusing them (a bad role order, say)
            raise QwenMLXError(f"the chat template cannot render these messages: {e}", "messages") from None
    if all(is_int(t) for t in items):
        ids = cast(list[int], items)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise QwenMLXError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
        return ids
    raise QwenMLXError("the prompt must be a string, a list of chat messages (dicts) or a list of token ids",
                       "prompt")


def check_message(i: int, message: dict[str, Any]) -> None:
    """A chat message the template can render: a known role, and text content (or an assistant's tool calls)."""
    if "role" not in message:
        raise QwenMLXError(f"chat message {i} needs a 'role' and a 'content': {message!r}", "messages")
    role = message["role"]
    if role not in ROLES:
        raise QwenMLXError(f"chat message {i} has role {role!r}; use one of {', '.join(ROLES)}", "messages")
    content = message.get("content")
    calls = message.get("tool_calls")
    if isinstance(content, str):
        check_text(f"chat message {i}", content, "messages")
        return
    if role == "assistant" and calls and content is None:
        return
    if "content" not in message and not calls:
        raise QwenMLXError(f"chat message {i} ({role}) needs a 'role' and a 'content'", "messages")
    raise QwenMLXError(f"chat message {i} ({role}): content must be a string, not {type(content).__name__}",
                       "messages")
