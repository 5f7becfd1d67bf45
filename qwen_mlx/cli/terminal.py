"""What the terminal commands (generate, chat, cache-prompt) share: loading with a status line, replies streamed
to stdout with statistics on stderr, and prompt caches saved for a model."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.nn as nn
from tqdm import tqdm

from qwen_mlx.cli.flags import (
    cache_options,
    cache_settings,
    check_speculation_arguments,
    engine_settings,
    sampling_options,
    speculation_options,
)
from qwen_mlx.engine.generate import GenerationStats, stream_generate
from qwen_mlx.engine.request import check_text
from qwen_mlx.engine.setup import load_for_context, start_worker
from qwen_mlx.engine.speculative import DraftModel, load_draft
from qwen_mlx.engine.worker import ModelWorker
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import PromptCache, check_prompt_cache, load_prompt_cache
from qwen_mlx.model.parallel import Parallel
from qwen_mlx.text.tokenizer import Tokenizer


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


def load_with_status(name: str, args: argparse.Namespace) -> tuple[nn.Module, Tokenizer]:
    print(f"Loading {name} ...", file=sys.stderr, flush=True)
    return load_for_context(name, engine_settings(args))


def load_for_replies(args: argparse.Namespace) -> tuple[nn.Module, Tokenizer, DraftModel | None]:
    """The model of --model and the draft model of --draft-model (checked against it), once the flags that need
    no model are checked."""
    cache_settings(args)
    check_speculation_arguments(args)
    model, tokenizer = load_with_status(args.model, args)
    draft = None
    if args.draft_model:
        print(f"Loading the draft model {args.draft_model} ...", file=sys.stderr, flush=True)
        draft = load_draft(args.draft_model, tokenizer, context_length=args.context)
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
    if stats.reencoded_tokens:
        line += f" | re-encoded with YaRN: {stats.reencoded_tokens} tokens"
    print(line, file=sys.stderr)


class PrefillProgress:
    """A progress bar on stderr (tqdm) for each prefill of at least `MIN_TOKENS`: a long prompt's, or the
    re-encode of the context when YaRN on demand switches (the callback `stream_generate` calls)."""

    MIN_TOKENS = 1024

    def __init__(self, prompt_cache: PromptCache):
        self.prompt_cache = prompt_cache
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if total < self.MIN_TOKENS:
            return
        if self.bar is None or self.bar.total != total:
            self.close()
            label = "prefill (YaRN)" if self.prompt_cache.rope_scaled else "prefill"
            self.bar = tqdm(total=total, desc=label, unit="tok", file=sys.stderr, leave=False, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def interrupt_cancels() -> Iterator[threading.Event]:
    """Ctrl-C sets the event (the reply stops within a token or a prefill chunk, the caches stay whole); a second
    Ctrl-C interrupts as usual."""
    cancel = threading.Event()

    def on_interrupt(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def read_document(path: str) -> str:
    """A text file to put into the conversation (`chat --file`), as the message text that carries it."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QwenMLXError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise QwenMLXError(f"{path}: not UTF-8 text; convert it to plain text first") from None
    except OSError as e:
        raise QwenMLXError(f"{path}: cannot read it ({e.strerror})") from None
    return f"{Path(path).name}:\n\n{text.strip()}"


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
    if prompt_cache.rope_scaled and model.config.yarn_switch is None:
        raise QwenMLXError(f"{path}: this prompt cache holds a context encoded with YaRN on demand; pass the "
                           f"--context it was made with ({meta.get('context', 'e.g. 131072')})")
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
    progress = PrefillProgress(prompt_cache)
    with interrupt_cancels() as cancel:
        try:
            for chunk in stream_generate(model, tokenizer, messages, prompt_cache=prompt_cache, cancel=cancel,
                                         on_prefill=progress, **options):
                progress.close()
                print(chunk.text, end="", flush=True)
                parts.append(chunk.text)
                if chunk.stats is not None:
                    stats = chunk.stats
                if chunk.finish_reason == "cancelled":
                    raise KeyboardInterrupt  # the caller's way of hearing of Ctrl-C, now that the caches are whole
        finally:
            progress.close()
    print(flush=True)
    assert stats is not None  # the last chunk of a reply carries its statistics
    return "".join(parts), stats


def start_terminal_worker(args: argparse.Namespace, parallel: Parallel) -> ModelWorker:
    """Rank 0's model worker for a terminal command on a model split over processes (the others `follow` it)."""
    settings = engine_settings(args)
    check_speculation_arguments(args)
    print(f"Loading {args.model} over {parallel.size} processes ({parallel.mode} parallel) ...", file=sys.stderr,
          flush=True)
    worker = start_worker(settings, args.model, parallel)
    worker.wait_loaded()
    return worker


def stream_worker_reply(worker: ModelWorker, messages: list[dict[str, Any]],
                        args: argparse.Namespace) -> tuple[str, GenerationStats]:
    """`stream_reply` through a model worker; Ctrl-C cancels the reply (within a token) and is raised again."""
    job = worker.submit("terminal", messages, **sampling_options(args))
    parts = []
    try:
        while True:
            chunk = job.get()
            assert chunk is not None  # without a timeout, `get` waits for the next chunk
            print(chunk.text, end="", flush=True)
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                print(flush=True)
                assert chunk.stats is not None  # a reply that ran (not one cancelled in the queue) has them
                return "".join(parts), chunk.stats
    except KeyboardInterrupt:
        job.cancel()
        job.done.wait()
        raise
