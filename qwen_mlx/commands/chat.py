"""`qwen-mlx chat`: a multi-turn chat in the terminal, each turn prefilling only what is new."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qwen_mlx.commands.flags import add_model_argument, add_sampling_arguments
from qwen_mlx.commands.terminal import load_for_replies, print_stats, read_document, start_messages, stream_reply
from qwen_mlx.errors import QwenMLXError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", help="multi-turn chat in the terminal")
    add_model_argument(parser)
    parser.add_argument("--system", help="system prompt (default: the model's own)")
    parser.add_argument("--prompt-cache", help="start from a prompt cache saved by `qwen-mlx cache-prompt`")
    parser.add_argument("--file", "-f", action="append", default=[], metavar="PATH",
                        help="put a text file into the conversation, with the first message (repeatable; "
                             "/file PATH adds one later)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print statistics after each reply")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    documents = [read_document(path) for path in args.file]  # a missing file fails before the model loads
    model, tokenizer, draft = load_for_replies(args)
    prompt_cache, start = start_messages(args, model)
    messages = list(start)
    print("Chat with the model. /file PATH adds a document, /clear starts over, /exit (or Ctrl-D) quits; Ctrl-C "
          "stops a reply.", file=sys.stderr)
    if documents:
        print(f"{len(documents)} document(s) go with your first message.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/clear":
            messages = list(start)
            continue
        if command.startswith("/file"):
            try:
                documents.append(read_document(command.removeprefix("/file").strip()))
            except QwenMLXError as e:
                print(f"qwen-mlx: error: {e}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": "\n\n".join([*documents, line])})
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
        documents = []  # they are in the conversation now
        messages.append({"role": "assistant", "content": reply})
        if args.verbose:
            print_stats(stats)
