"""`qwen-mlx webui`: load a model on a worker thread, then serve the chat page (Gradio) over HTTP.

Conversations, the demo model and the browser-id secret live in $QWEN_MLX_HOME (default ~/.cache/qwen-mlx).
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
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
from qwen_mlx.files import data_home


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("webui", help="chat with the model in the browser")
    add_server_arguments(parser, port=7860, max_queue=20)
    # A chat page's model stays loaded unless asked otherwise: the next message should not wait for a load.
    add_registry_arguments(parser, keep_alive="-1")
    parser.add_argument("--auth", help="require this login, as user:password")
    parser.set_defaults(func=run)
    return parser


def browser_secret(home: Path) -> str:
    """The key that signs each browser's owner id (webui/conversations.py owner_token); it stays on the server, and
    is kept so that ids survive a restart."""
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
    parallel = parallel_group(args)
    if parallel is not None and not parallel.leads:
        return follow(args, parallel)
    cache = check_server_arguments(args, "--auth", guarded=auth is not None)
    home = data_home()
    model_name = "demo model (random weights)" if args.demo else args.model
    registry, pinned = start_registry(engine_settings(args, parallel), parallel)

    from qwen_mlx.webui.app import CSS, HEAD, build_app
    from qwen_mlx.webui.conversations import ConversationStore
    from qwen_mlx.webui.models import PageModels

    models = PageModels(registry, pinned.name, cache)
    page = build_app(models, ConversationStore(home / "conversations"), model_name=model_name, demo=args.demo,
                     browser_secret=browser_secret(home), max_batch=args.max_batch, max_queue=args.max_queue)
    page.queue(max_size=args.max_queue)
    try:
        # No "settings" footer link: Gradio's developer settings panel is not for the people chatting.
        page.launch(server_name=args.host, server_port=args.port, auth=auth, ssr_mode=False, css=CSS, head=HEAD,
                    footer_links=["api"], prevent_thread_lock=True, max_file_size="20mb")
    except OSError:
        raise QwenMLXError(f"cannot listen on {args.host}:{args.port}; pick another --port") from None
    # On Ctrl-C uvicorn waits for open connections to close, and API clients keep a heartbeat open: not long.
    page.server.config.timeout_graceful_shutdown = 1
    try:
        page.block_thread()
    finally:
        registry.close()
    return 0
