"""`qwen-mlx generate`: one reply to a prompt, streamed to stdout, statistics on stderr."""

from __future__ import annotations

import argparse
from typing import Any

from qwen_mlx.commands.flags import add_model_argument, add_sampling_arguments
from qwen_mlx.commands.terminal import load_for_replies, print_stats, read_text, start_messages, stream_reply


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help="generate one reply to a prompt")
    add_model_argument(parser)
    parser.add_argument("--prompt", "-p", required=True, help="the user message ('-' reads stdin)")
    parser.add_argument("--system", help="system prompt (default: the model's own)")
    parser.add_argument("--prompt-cache", help="start from a prompt cache saved by `qwen-mlx cache-prompt`")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    prompt = read_text(args.prompt)
    model, tokenizer, draft = load_for_replies(args)
    prompt_cache, messages = start_messages(args, model)
    messages.append({"role": "user", "content": prompt})
    _, stats = stream_reply(model, tokenizer, messages, args, prompt_cache, draft)
    print_stats(stats)
    return 0
