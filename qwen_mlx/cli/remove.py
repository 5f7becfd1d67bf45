"""`qwen-mlx rm`: delete local models, after asking (unless -y). Only ever inside the Hugging Face cache or
$QWEN_MLX_HOME/models (`catalog.remove`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qwen_mlx.cli.listing import printable
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.store.catalog import LocalModel, describe_size, find_local, local_models, remove
from qwen_mlx.store.names import close_matches


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("rm", help="delete local models (asks first)")
    parser.add_argument("models", nargs="+", metavar="MODEL", help="name, repo id or alias, as `qwen-mlx list` shows")
    parser.add_argument("-y", "--yes", action="store_true", help="do not ask")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    found = [find(name) for name in args.models]  # every name is checked before anything is deleted
    kept = 0
    for model in found:
        # Names and folders as `list` shows them: escape sequences in a folder's name are spelled out, not acted on.
        name = printable(model.name)
        where = "the Hugging Face cache" if model.in_cache else printable(str(model.folder.parent))
        if not args.yes and not confirm(f"Remove {name} ({describe_size(model.size)}) from {where}? [y/N] "):
            print(f"qwen-mlx: kept {name}", file=sys.stderr)
            kept += 1
            continue
        remove(model)
        print(f"qwen-mlx: removed {name} ({describe_size(model.size)} freed)", file=sys.stderr)
    return 1 if kept else 0


def find(name: str) -> LocalModel:
    model = find_local(name)
    if model is None:
        matches = close_matches(name, [m.name for m in local_models()])
        hint = f"; did you mean {', '.join(map(printable, matches))}?" if matches else "; see `qwen-mlx list`"
        raise QwenMLXError(f"{printable(name)}: no such local model{hint}")
    return model


def confirm(question: str) -> bool:
    print(question, end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except (OSError, UnicodeDecodeError):
        answer = ""
    if not answer:
        print(file=sys.stderr)
    return answer.strip().lower() in ("y", "yes")
