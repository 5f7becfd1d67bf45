"""`qwen-mlx generate`: one reply to a prompt, streamed to stdout, statistics on stderr."""

from __future__ import annotations

import argparse
from typing import Any

from qwen_mlx.cli.flags import (
    add_model_argument,
    add_parallel_argument,
    add_sampling_arguments,
    follow,
    parallel_group,
)
from qwen_mlx.cli.terminal import (
    load_for_replies,
    print_stats,
    read_text,
    start_messages,
    start_terminal_worker,
    stream_reply,
    stream_worker_reply,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help="generate one reply to a prompt")
    add_model_argument(parser)
    add_parallel_argument(parser)
    parser.add_argument("--prompt", "-p", required=True, help="the user message ('-' reads stdin)")
    parser.add_argument("--system", help="system prompt (default: the model's own)")
    parser.add_argument("--prompt-cache", help="start from a prompt cache saved by `qwen-mlx cache-prompt`")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    parallel = parallel_group(args)
    if parallel is not None and not parallel.leads:
        return follow(args, parallel)
    prompt = read_text(args.prompt)
    if parallel is not None:
        worker = start_terminal_worker(args, parallel)
        messages = [{"role": "system", "content": args.system}] if args.system else []
        try:
            _, stats = stream_worker_reply(worker, [*messages, {"role": "user", "content": prompt}], args)
        finally:
            worker.close()
        print_stats(stats)
        return 0
    model, tokenizer, draft = load_for_replies(args)
    prompt_cache, messages = start_messages(args, model)
    messages.append({"role": "user", "content": prompt})
    _, stats = stream_reply(model, tokenizer, messages, args, prompt_cache, draft)
    print_stats(stats)
    return 0
