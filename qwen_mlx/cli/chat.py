"""`qwen-mlx chat`: a multi-turn chat in the terminal, each turn prefilling only what is new."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
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
    read_document,
    start_messages,
    start_terminal_worker,
    stream_reply,
    stream_worker_reply,
)
from qwen_mlx.engine.generate import GenerationStats
from qwen_mlx.errors import QwenMLXError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", help="multi-turn chat in the terminal")
    add_model_argument(parser)
    add_parallel_argument(parser)
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
    parallel = parallel_group(args)
    if parallel is not None and not parallel.leads:
        return follow(args, parallel)
    if parallel is not None:
        worker = start_terminal_worker(args, parallel)
        start = [{"role": "system", "content": args.system}] if args.system else []

        def reply(messages: list[dict[str, Any]]) -> tuple[str, GenerationStats]:
            return stream_worker_reply(worker, messages, args)

        try:
            return converse(reply, start, documents, args.verbose)
        finally:
            worker.close()
    model, tokenizer, draft = load_for_replies(args)
    prompt_cache, start = start_messages(args, model)
    return converse(lambda messages: stream_reply(model, tokenizer, messages, args, prompt_cache, draft), start,
                    documents, args.verbose)


def converse(reply: Callable[[list[dict[str, Any]]], tuple[str, GenerationStats]], start: list[dict[str, Any]],
             documents: list[str], verbose: bool) -> int:
    """The chat loop over `reply` (messages → the reply's text and stats, streamed to stdout); `documents` go
    with the first message."""
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
        except UnicodeDecodeError as e:
            print(f"qwen-mlx: error: that line is not valid UTF-8 (byte {e.start}); type it again", file=sys.stderr)
            continue
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
            text, stats = reply(messages)
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
        messages.append({"role": "assistant", "content": text})
        if verbose:
            print_stats(stats)
