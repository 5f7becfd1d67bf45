"""`qwen-mlx serve`: the OpenAI-compatible HTTP API (`qwen_mlx.server`) over one model."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from qwen_mlx.commands.flags import add_server_arguments, check_server_arguments, served_model_name, start_worker
from qwen_mlx.errors import QwenMLXError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API (chat, tools, JSON schema)")
    add_server_arguments(parser, port=8080, max_queue=16)
    parser.add_argument("--api-key", default=os.environ.get("QWEN_MLX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $QWEN_MLX_API_KEY; none: open)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from qwen_mlx.server import build_app

    if args.api_key is not None and not args.api_key.strip():
        raise QwenMLXError("--api-key is empty; give a key or leave the option out")
    cache = check_server_arguments(args, "--api-key", guarded=args.api_key is not None)
    source = "demo" if args.demo else args.model
    model_id = served_model_name(args)
    worker = start_worker(args, cache, source)
    worker.wait_loaded()
    if worker.load_error is not None:
        worker.close()
        raise worker.load_error
    app = build_app(worker, model_id, args.api_key, aliases=(source,))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    print(f"qwen-mlx: serving {model_id!r} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    try:
        server.run()
    finally:
        worker.close()
    return 0
