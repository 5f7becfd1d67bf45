"""A tiny random-weight Qwen2 with Qwen's real tokenizer, built offline: `qwen-mlx webui --demo` runs on it.

Its replies are gibberish (the weights are random); it exists so the UI can be tried without downloading a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen_mlx.config import ModelConfig
from qwen_mlx.model import Qwen2

# Qwen2.5's tokenizer: 151,643 BPE ranks + 22 added tokens. Everything else is as small as a Qwen2 can be.
DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151665,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "torch_dtype": "float16",
}
DEMO_NAME = "qwen2-demo-random-64x2"  # change it when DEMO_CONFIG changes, so old builds are not reused


def write_random_qwen2(folder: Path, config: dict[str, Any], seed: int = 0) -> None:
    """config.json and model.safetensors of a Qwen2 with random weights (float16)."""
    model = Qwen2(ModelConfig.from_dict(config))
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    # Matrices wider than nn.Linear's init, so different prompts lead to visibly different (still meaningless)
    # replies; norms and biases keep their init.
    weights = {
        name: (mx.random.normal(p.shape, key=k) * 0.25 if p.ndim == 2 else p).astype(mx.float16)
        for (name, p), k in zip(params, keys, strict=True)
    }
    mx.save_safetensors(str(folder / "model.safetensors"), weights, {"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_random_model(folder: Path, config: dict[str, Any] = DEMO_CONFIG, seed: int = 0) -> Path:
    """A complete model folder: random Qwen2 weights for `config` and Qwen2.5's real tokenizer files."""
    from qwen_mlx.qwen_tokenizer_files import write_qwen_tokenizer

    write_random_qwen2(folder, config, seed)
    write_qwen_tokenizer(folder)
    return folder


def demo_model_folder(cache_dir: Path) -> Path:
    """The demo model's folder under `cache_dir`, built there the first time (atomically: build, then rename)."""
    folder = cache_dir / DEMO_NAME
    if (folder / "config.json").exists():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.", dir=cache_dir))
    try:
        write_random_model(build)
        build.rename(folder)
    except OSError:
        if not (folder / "config.json").exists():  # not a concurrent build that finished first
            raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return folder


def data_home() -> Path:
    """Where qwen-mlx keeps its own files (demo model, conversations): $QWEN_MLX_HOME, else ~/.cache/qwen-mlx."""
    if os.environ.get("QWEN_MLX_HOME"):
        return Path(os.environ["QWEN_MLX_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-mlx"
