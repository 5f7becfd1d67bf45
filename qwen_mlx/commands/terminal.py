"""What the terminal commands (generate, chat, cache-prompt) share: loading with a status line, replies streamed
to stdout with statistics on stderr, and prompt caches saved for a model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import mlx.nn as nn

from qwen_mlx.cache import PromptCache, check_prompt_cache, load_prompt_cache
from qwen_mlx.commands.flags import (
    cache_options,
    cache_settings,
    check_speculation_arguments,
    sampling_options,
    speculation_options,
)
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate import GenerationStats, stream_generate
from qwen_mlx.load import load
from qwen_mlx.request import check_text
from qwen_mlx.speculative import DraftModel, load_draft
from qwen_mlx.tokenizer import Tokenizer


def read_text(value: str, flag: str = "--prompt") -> str:
    """A flag's text: itself, or stdin for "-"; empty or undecodable text is refused by name."""
    if value == "-":
        try:
            value = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise QwenMLXError(f"{flag} -: stdin is not valid UTF-8 (byte {e.start}); convert it, e.g. with iconv") \
                from None
    if not value.strip():
        raise QwenMLXError(f"{flag} is empty; give the text (or '-' to read it from stdin)")
    check_text(flag, value, "prompt")
    return value


def load_with_status(name: str) -> tuple[nn.Module, Tokenizer]:
    print(f"Loading {name} ...", file=sys.stderr, flush=True)
    return load(name)


def load_for_replies(args: argparse.Namespace) -> tuple[nn.Module, Tokenizer, DraftModel | None]:
    """The model of --model and the draft model of --draft-model (checked against it), once the flags that need
    no model are checked."""
    cache_settings(args)
    check_speculation_arguments(args)
    model, tokenizer = load_with_status(args.model)
    draft = None
    if args.draft_model:
        print(f"Loading the draft model {args.draft_model} ...", file=sys.stderr, flush=True)
        draft = load_draft(args.draft_model, tokenizer)
    return model, tokenizer, draft


def print_stats(stats: GenerationStats) -> None:
    reused = stats.prompt_tokens - stats.prefilled_tokens
    line = (
        f"prompt: {stats.prompt_tokens} tokens ({reused} reused from cache), {stats.prompt_tps:.1f} tokens/s | "
        f"generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens/s | "
        f"first token: {stats.time_to_first_token:.2f} s | peak memory: {stats.peak_memory_gb:.2f} GB | "
        f"context: {stats.context_tokens}/{stats.context_length}"
    )
    if stats.draft_tokens:
        line += f" | drafts accepted: {stats.accepted_draft_tokens}/{stats.draft_tokens}"
    print(line, file=sys.stderr)


def model_shape(model: nn.Module) -> str:
    c = model.config
    return f"{c.num_hidden_layers}x{c.num_key_value_heads}x{c.head_dim}/{c.vocab_size}"


def prompt_cache_metadata(model_name: str, model: nn.Module, messages: list[dict[str, Any]]) -> dict[str, str]:
    """What `cache-prompt` records beside the arrays, so a later run can check they belong to its model."""
    return {"model": model_name, "model_shape": model_shape(model), "model_fingerprint": model.fingerprint or "",
            "messages": json.dumps(messages)}


def read_prompt_cache(path: str, model: nn.Module) -> tuple[PromptCache, list[dict[str, Any]]]:
    """A saved prompt cache and the messages behind it, checked against the model it will run with: its shape,
    and its weights (a model of the same shape with other weights would read the cache as garbage)."""
    prompt_cache, meta = load_prompt_cache(path)
    made_with = meta.get("model")
    if meta.get("model_shape") != model_shape(model):
        raise QwenMLXError(f"{path}: this prompt cache was made with another model ({made_with})")
    if meta.get("model_fingerprint") != (model.fingerprint or ""):
        raise QwenMLXError(f"{path}: this prompt cache was made with other weights ({made_with}) of the same shape; "
                           "make it again with `qwen-mlx cache-prompt` for this model")
    check_prompt_cache(prompt_cache, model, path)
    try:
        messages = json.loads(meta.get("messages", "[]"))
    except ValueError:
        messages = None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise QwenMLXError(f"{path}: a damaged prompt cache (its messages); write it again")
    return prompt_cache, messages


def start_messages(args: argparse.Namespace, model: nn.Module) -> tuple[PromptCache, list[dict[str, Any]]]:
    """The conversation's cache and first messages: from --prompt-cache, else empty; --system replaces any."""
    if args.prompt_cache:
        if args.max_kv_size is not None or args.kv_bits is not None:
            raise QwenMLXError("--prompt-cache keeps the cache it was saved with; drop --max-kv-size / --kv-bits, or "
                               "save a new one with `qwen-mlx cache-prompt --max-kv-size ...`")
        prompt_cache, messages = read_prompt_cache(args.prompt_cache, model)
    else:
        prompt_cache, messages = PromptCache.new(model, cache_settings(args)), []
    if args.system:
        messages = [m for m in messages if m["role"] != "system"]
        messages.insert(0, {"role": "system", "content": args.system})
    return prompt_cache, messages


def stream_reply(model: nn.Module, tokenizer: Tokenizer, messages: list[dict[str, Any]], args: argparse.Namespace,
                 prompt_cache: PromptCache, draft: DraftModel | None = None) -> tuple[str, GenerationStats]:
    """Print a reply as it streams; return its text and stats."""
    parts = []
    stats = None
    options = {**sampling_options(args), **cache_options(cache_settings(args)), **speculation_options(args, draft)}
    for chunk in stream_generate(model, tokenizer, messages, prompt_cache=prompt_cache, **options):
        print(chunk.text, end="", flush=True)
        parts.append(chunk.text)
        if chunk.stats is not None:
            stats = chunk.stats
    print(flush=True)
    return "".join(parts), stats
