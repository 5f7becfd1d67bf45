"""`qwen-mlx`: the command-line front door. Each subcommand lives in its own module (`add_parser` + `run`); user
mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qwen_mlx.cli import bench, cache_prompt, chat, generate, info, listing, pull, remove, run, serve
from qwen_mlx.cli import eval as eval_command  # the module: plain `eval` would hide the builtin here
from qwen_mlx.converter import cli as convert
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.webui import cli as webui

COMMANDS = (generate, chat, cache_prompt, convert, webui, serve, bench, eval_command, info, pull, listing, remove, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-mlx", description="Qwen2 / Qwen2.5 on Apple MLX")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QwenMLXError as e:
        print(f"qwen-mlx: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path of the user's that cannot be read or written: theirs to fix, not a crash
        where = f"{e.filename}: " if e.filename else ""
        print(f"qwen-mlx: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
