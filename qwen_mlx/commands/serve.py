"""`qwen-mlx serve`: the OpenAI-compatible HTTP API (`qwen_mlx.server`) over one model."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from qwen_mlx.commands.flags import add_server_arguments, check_server_arguments, served_model_name, start_worker
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.guard import DEFAULT_MAX_BODY_MB, GuardSettings


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API (chat, tools, JSON schema)")
    add_server_arguments(parser, port=8080, max_queue=16)
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

    from qwen_mlx.server import ServerSettings, build_app

    if args.api_key is not None and not args.api_key.strip():
        raise QwenMLXError("--api-key is empty; give a key or leave the option out")
    if not args.max_body_mb > 0:
        raise QwenMLXError(f"--max-body-mb {args.max_body_mb:g} must be positive")
    cache = check_server_arguments(args, "--api-key", guarded=args.api_key is not None)
    source = "demo" if args.demo else args.model
    model_id = served_model_name(args)
    worker = start_worker(args, cache, source)
    worker.wait_loaded()
    if worker.load_error is not None:
        worker.close()
        raise worker.load_error
    guard = GuardSettings.for_server(args.host, args.allowed_host, args.cors, args.max_body_mb)
    app = build_app(worker, ServerSettings(model_id, (source,), args.api_key, guard))

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Streams still open end with a last event ("the server is shutting down") within a token, so the
            # graceful shutdown has nothing to cut off.
            worker.cancel_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    server = Server(config)
    print(f"qwen-mlx: serving {model_id!r} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    previous = signal.signal(signal.SIGTERM, stop_requested)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn raises the signal it stopped on again once it has shut down: the stop that was asked for
    finally:
        signal.signal(signal.SIGTERM, previous)
        worker.close()
    return 0


def stop_requested(signum: int, frame: Any) -> None:
    """SIGTERM, like Ctrl-C, is a request to stop: the server shuts down and exits with 0."""
    raise KeyboardInterrupt
