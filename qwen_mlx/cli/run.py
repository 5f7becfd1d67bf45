"""`qwen-mlx run MODEL [PROMPT]`: Docker's and Ollama's verb: a one-shot reply to PROMPT, else the chat."""

from __future__ import annotations

import argparse
from typing import Any

from qwen_mlx.cli import chat, generate
from qwen_mlx.cli.flags import add_context_argument, add_parallel_argument, add_sampling_arguments


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("run", help="reply to a prompt, or chat, with a model (downloaded if need be)")
    parser.add_argument("model", help="alias (qwen2.5:7b), local model name, repo id or folder")
    parser.add_argument("prompt", nargs="?", help="the message ('-' reads stdin); without it, the chat starts")
    parser.add_argument("--system", help="system prompt (default: the model's own)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print statistics after each chat reply")
    add_context_argument(parser)
    add_sampling_arguments(parser)
    add_parallel_argument(parser)
    parser.set_defaults(func=run, prompt_cache=None, file=[])
    return parser


def run(args: argparse.Namespace) -> int:
    if args.prompt is not None:
        return generate.run(args)
    return chat.run(args)
