"""`qwen-mlx serve`: the OpenAI, Ollama and Anthropic HTTP APIs (`qwen_mlx.serving.app`) over the local models."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from qwen_mlx.cli.flags import (
    add_registry_arguments,
    add_server_arguments,
    check_server_arguments,
    engine_settings,
    follow,
    parallel_group,
)
from qwen_mlx.engine.setup import start_registry
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.serving.guard import DEFAULT_MAX_BODY_MB, GuardSettings


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="HTTP API for the local models: OpenAI's, Ollama's and Anthropic's "
                                                 "(chat, tools, JSON schema)")
    add_server_arguments(parser, port=8080, max_queue=16)
    add_registry_arguments(parser)
    parser.add_argument("--api-key", default=os.environ.get("QWEN_MLX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $QWEN_MLX_API_KEY; none: open)")
    parser.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                        help="let web pages at ORIGIN (e.g. http://localhost:3000, or *) call the API (repeatable; "
                             "default: none, requests from other sites' pages are refused)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="accept requests whose Host header names NAME too (repeatable; default: the address "
                             "listened on and localhost)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                        help=f"largest request body, in MB (default {DEFAULT_MAX_BODY_MB:g})")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from qwen_mlx.serving.app import ServerSettings, build_app

    if args.api_key is not None and not args.api_key.strip():
        raise QwenMLXError("--api-key is empty; give a key or leave the option out")
    if not args.max_body_mb > 0:
        raise QwenMLXError(f"--max-body-mb {args.max_body_mb:g} must be positive")
    parallel = parallel_group(args)
    if parallel is not None and not parallel.leads:
        return follow(args, parallel)
    check_server_arguments(args, "--api-key", guarded=args.api_key is not None)
    registry, pinned = start_registry(engine_settings(args, parallel), parallel)
    try:
        registry.release(registry.acquire(pinned.name))  # the model it starts with is loaded before it serves
    except QwenMLXError:
        registry.close()
        raise
    guard = GuardSettings.for_server(args.host, args.allowed_host, args.cors, args.max_body_mb)
    app = build_app(registry, ServerSettings(pinned.name, args.api_key, guard, args.max_batch))
    model_id = pinned.name

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Streams still open end with a last event ("the server is shutting down") within a token, so the
            # graceful shutdown has nothing to cut off.
            registry.cancel_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    server = Server(config)
    # A split server serves its one model: the others are not split over these processes.
    served = f"{model_id!r}" if parallel else f"{model_id!r} and the other local models"
    print(f"qwen-mlx: serving {served} at http://{args.host}:{args.port} (OpenAI: /v1, "
          "Ollama: /api, Anthropic: /v1/messages; Ctrl-C stops)", file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, stop_requested)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn raises the signal it stopped on again once it has shut down: the stop that was asked for
    finally:
        signal.signal(signal.SIGTERM, previous)
        registry.close()
    return 0


def stop_requested(signum: int, frame: Any) -> None:
    """SIGTERM, like Ctrl-C, is a request to stop: the server shuts down and exits with 0."""
    raise KeyboardInterrupt
