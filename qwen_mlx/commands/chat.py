"""`qwen-mlx chat`: a multi-turn chat in the terminal, each turn prefilling only what is new."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qwen_mlx.commands.flags import add_model_argument, add_sampling_arguments
from qwen_mlx.commands.terminal import load_for_replies, print_stats, start_messages, stream_reply
from qwen_mlx.errors import QwenMLXError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", help="multi-turn chat in the terminal")
    add_model_argument(parser)
    parser.add_argument("--system", help="system prompt (default: the model's own)")
    parser.add_argument("--prompt-cache", help="start from a prompt cache saved by `qwen-mlx cache-prompt`")
    parser.add_argument("--verbose", "-v", action="store_true", help="print statistics after each reply")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    model, tokenizer, draft = load_for_replies(args)
    prompt_cache, start = start_messages(args, model)
    messages = list(start)
    print("Chat with the model. /clear starts over, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError as e:
            print(f"qwen-mlx: error: that line is not valid UTF-8 (byte {e.start}); type it again", file=sys.stderr)
            continue
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/clear":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply, stats = stream_reply(model, tokenizer, messages, args, prompt_cache, draft)
        except KeyboardInterrupt:
            # Ctrl-C stops this reply, not the chat; the half reply is dropped from the conversation.
            print("\n[stopped]", file=sys.stderr)
            messages.pop()
            continue
        except QwenMLXError as e:  # e.g. the conversation outgrew the context: say so and keep chatting
            print(f"qwen-mlx: error: {e} (try /clear)", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
        if args.verbose:
            print_stats(stats)
