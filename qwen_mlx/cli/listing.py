"""`qwen-mlx list`: the local models (Hugging Face cache, then $QWEN_MLX_HOME/models) with their aliases, size on
disk, bits, context length and when each was last used."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from qwen_mlx.store.catalog import LocalModel, describe_size, environment_note, last_used, local_models


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("list", aliases=["ls"], help="the models on this machine")
    parser.add_argument("--json", action="store_true", help="one JSON object per model, for scripts")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    models = local_models()
    if args.json:
        for model in models:
            print(json.dumps(row(model)))
        return 0
    if not models:
        print(f"No models yet in {printable(environment_note())}; get one with `qwen-mlx pull qwen2.5`.")
        return 0
    header = ("NAME", "ALIAS", "SIZE", "BITS", "CONTEXT", "LAST USED")
    cells = [(m.name, m.aliases[0] if m.aliases else "-", describe_size(m.size), m.bits, str(m.context_length or "?"),
              ago(last_used(m.name))) for m in models]
    lines = [header] + [tuple(map(printable, line)) for line in cells]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def printable(text: str) -> str:
    """`text` with each character a terminal would act on, not show (an escape sequence's ESC, a control code, a
    line break or a bidirectional override in a folder's name or a config.json value), spelled out as `\\x1b`."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def row(model: LocalModel) -> dict[str, Any]:
    return {"name": model.name, "aliases": model.aliases, "size": model.size, "bits": model.bits,
            "context_length": model.context_length, "last_used": last_used(model.name),
            "path": str(model.folder), "where": "huggingface-cache" if model.in_cache else "qwen-mlx-home"}


def ago(when: float | None) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, time.time() - when)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"
