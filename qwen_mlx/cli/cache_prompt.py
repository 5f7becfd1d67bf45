"""`qwen-mlx cache-prompt`: process a long system prompt or document once and save its KV cache, for
`generate` and `chat --prompt-cache` to start from."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qwen_mlx.cli.flags import add_cache_arguments, add_model_argument, cache_settings
from qwen_mlx.cli.terminal import (
    PrefillProgress,
    interrupt_cancels,
    load_with_status,
    prompt_cache_metadata,
    read_text,
)
from qwen_mlx.model.cache import PromptCache, save_prompt_cache


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("cache-prompt", help="process a long system prompt or document once and save it")
    add_model_argument(parser)
    parser.add_argument("--prompt", "-p", required=True, help="the document / first user message ('-' reads stdin)")
    parser.add_argument("--system", help="system prompt (default: the model's own)")
    parser.add_argument("--output", "-o", required=True, help="the .safetensors file to write")
    add_cache_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    settings = cache_settings(args)
    text = read_text(args.prompt)
    model, tokenizer = load_with_status(args.model, args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    prompt_cache = PromptCache.new(model, settings)
    # A document longer than the original context is encoded with YaRN from the start (with --context).
    ids = prompt_cache.fit_rope(model.config.yarn_switch, ids)
    progress = PrefillProgress(prompt_cache)
    with interrupt_cancels() as cancel:
        done = prompt_cache.prefill(model, ids, cancel=cancel, on_progress=progress)
        progress.close()
        if not done:
            raise KeyboardInterrupt
    meta = {**prompt_cache_metadata(args.model, model, messages), "context": str(model.config.context_length)}
    save_prompt_cache(args.output, prompt_cache, meta)
    print(f"Saved {len(ids)} tokens of prompt cache to {args.output} ({prompt_cache.nbytes / 1e6:.1f} MB)",
          file=sys.stderr)
    return 0
