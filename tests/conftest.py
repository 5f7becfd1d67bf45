"""Shared fixtures: the Qwen2.5 reference configuration and a real Qwen2.5 tokenizer folder built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hf_models import REFERENCE_DIR

from qwen_mlx.qwen_tokenizer_files import write_qwen_tokenizer


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Qwen2.5-7B-Instruct's official tokenizer_config.json, generation_config.json and config.json."""
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, reference_dir: Path) -> Path:
    """A folder with Qwen2.5's real tokenizer.json, tokenizer_config.json and generation_config.json."""
    folder = tmp_path_factory.mktemp("qwen2.5-tokenizer")
    write_qwen_tokenizer(folder, reference_dir)
    return folder
