"""The demo model: a tiny random-weight Qwen2 with Qwen's real tokenizer, built offline the first time
`qwen-mlx webui --demo` or `serve --demo` runs. Its replies are gibberish (the weights are random); it exists so
the UI and the API can be tried without downloading a model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from qwen_mlx.random_model import TINY_QWEN2, write_random_model

DEMO_NAME = "qwen2-demo-random-64x2"  # change it when TINY_QWEN2 changes, so old builds are not reused


def demo_model_folder(cache_dir: Path) -> Path:
    """The demo model's folder under `cache_dir`, built there the first time (atomically: build, then rename)."""
    folder = cache_dir / DEMO_NAME
    if (folder / "config.json").exists():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.", dir=cache_dir))
    try:
        write_random_model(build, TINY_QWEN2)
        build.rename(folder)
    except OSError:
        if not (folder / "config.json").exists():  # not a concurrent build that finished first
            raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return folder
