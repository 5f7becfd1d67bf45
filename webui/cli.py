"""`qwen-mlx webui`: load a model on a worker thread, then serve the chat page (Gradio) over HTTP.

Conversations, the demo model and the browser-id secret live in $QWEN_MLX_HOME (default ~/.cache/qwen-mlx).
QWEN_MLX_TOKEN_DELAY=<seconds> makes every model step sleep that long first: for tests and diagnostics
only, so that a tiny model streams slowly enough to watch and to stop.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from qwen_mlx.cli import add_cache_arguments, check_cache_arguments
from qwen_mlx.demo import data_home
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.load import DEFAULT_MODEL
from qwen_mlx.serve import LOOPBACK_HOSTS, check_port


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("webui", help="chat with the model in the browser")
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model", "-m", default=DEFAULT_MODEL,
        help=f"local model folder or Hugging Face repo id (default: {DEFAULT_MODEL})",
    )
    model.add_argument(
        "--demo", action="store_true",
        help="no download: a tiny random-weight Qwen2 with the real tokenizer (its replies are gibberish)",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    add_cache_arguments(parser)
    parser.add_argument("--auth", help="require this login, as user:password")
    parser.add_argument("--max-queue", type=int, default=20,
                        help="most requests waiting for the model before new ones are refused (default 20)")
    parser.set_defaults(func=run)
    return parser


def browser_secret(home: Path) -> str:
    """The key that encrypts each browser's owner id in its localStorage; kept so ids survive a restart."""
    path = home / "webui-secret"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
    return path.read_text().strip()


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not (user and sep and password):
        raise QwenMLXError(f"--auth {value!r}: expected user:password, e.g. --auth alice:s3cret")
    return user, password


def run(args: argparse.Namespace) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry
    auth = parse_auth(args.auth)
    check_cache_arguments(args)
    if args.max_queue < 1:
        raise QwenMLXError(f"--max-queue {args.max_queue} must be at least 1")
    if args.host not in LOOPBACK_HOSTS and auth is None:
        print(f"qwen-mlx: warning: --host {args.host} without --auth lets anyone who can reach this machine "
              "chat with the model; add --auth user:password", file=sys.stderr)
    check_port(args.host, args.port)  # before a model load that may take minutes
    home = data_home()
    model_name = "demo model (random weights)" if args.demo else args.model

    from qwen_mlx.load import load
    from qwen_mlx.worker import ModelWorker, slowed_for_tests

    def load_model() -> tuple[Any, Any]:
        from qwen_mlx.demo import demo_model_folder

        model, tokenizer = load(demo_model_folder(home / "models") if args.demo else args.model)
        return slowed_for_tests(model), tokenizer

    worker = ModelWorker(
        load_model, max_kv_size=args.max_kv_size, kv_bits=args.kv_bits,
        on_status=lambda status: print(f"qwen-mlx: {model_name}: {status}", file=sys.stderr, flush=True),
    )
    worker.wait_loaded()

    from qwen_mlx.webui.app import CSS, build_app
    from qwen_mlx.webui.conversations import ConversationStore

    page = build_app(worker, ConversationStore(home / "conversations"), model_name=model_name, demo=args.demo,
                     browser_secret=browser_secret(home))
    page.queue(max_size=args.max_queue)
    try:
        page.launch(server_name=args.host, server_port=args.port, auth=auth, ssr_mode=False, css=CSS,
                    footer_links=["api", "settings"], prevent_thread_lock=True)
    except OSError:
        raise QwenMLXError(f"cannot listen on {args.host}:{args.port}; pick another --port") from None
    # On Ctrl-C uvicorn waits for open connections to close, and API clients keep a heartbeat open: not long.
    page.server.config.timeout_graceful_shutdown = 1
    try:
        page.block_thread()
    finally:
        worker.close()
    return 0
