"""The user's files: where qwen-mlx keeps its own, and writing any without ever leaving one half-written (a
temporary file beside it, then a rename)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwen_mlx.errors import QwenMLXError


@contextmanager
def replaced_atomically(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path`: write it inside the block, and it replaces `path` when the block ends.

    If the block fails (an error, Ctrl-C, a full disk), the temporary file is removed and `path` is untouched.
    `suffix` names the temporary file's extension, for writers that insist on one. The file's data reaches the disk
    before the rename, and the rename before this returns: a power cut leaves the old file or the whole new one,
    never a new name over missing or zeroed data.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        fsync_path(path.parent)
    except OSError:  # a file system that cannot sync a folder (some network ones): the file itself is on disk
        pass


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents to the disk (what the writer wrote through its own handle)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def data_home() -> Path:
    """Where qwen-mlx keeps its own files (demo model, conversations): $QWEN_MLX_HOME, else ~/.cache/qwen-mlx."""
    if os.environ.get("QWEN_MLX_HOME"):
        return Path(os.environ["QWEN_MLX_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-mlx"


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file of the user's; anything else is one QwenMLXError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise QwenMLXError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise QwenMLXError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # a directory, a symlink loop, no permission
        raise QwenMLXError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise QwenMLXError(f"{path}: expected a JSON object")
    return data
