"""The user's files: where qwen-mlx keeps its own, and writing any without ever leaving one half-written (a
temporary file beside it, then a rename)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path`: write it inside the block, and it replaces `path` when the block ends.

    If the block fails (an error, Ctrl-C, a full disk), the temporary file is removed and `path` is untouched.
    `suffix` names the temporary file's extension, for writers that insist on one.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def data_home() -> Path:
    """Where qwen-mlx keeps its own files (demo model, conversations): $QWEN_MLX_HOME, else ~/.cache/qwen-mlx."""
    if os.environ.get("QWEN_MLX_HOME"):
        return Path(os.environ["QWEN_MLX_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-mlx"
