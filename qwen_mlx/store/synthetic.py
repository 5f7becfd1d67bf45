"""Random-weight Qwen2 models built offline: the tiny one the demo and the tests run, and real Qwen2.5 shapes at
any quantization for benchmarks. Their replies are gibberish; their shapes, files and speed are real.

The demo model (`webui --demo`, `serve --demo`) is the tiny one with Qwen's real tokenizer, built the first time
it is asked for, so the UI and the API can be tried without downloading a model."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import read_json
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.qwen2 import Qwen2
from qwen_mlx.store.quantize import check_quantization

# Qwen2.5's tokenizer (151,643 BPE ranks + 22 added tokens) with everything else as small as a Qwen2 can be.
TINY_QWEN2: dict[str, Any] = {
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


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """`TINY_QWEN2` with some fields changed, e.g. `tiny_config(max_position_embeddings=1024)`."""
    return {**TINY_QWEN2, **overrides}


# The official Qwen2.5 config.json shapes (Qwen/Qwen2.5-{0.5B,1.5B,3B,7B}-Instruct), bfloat16 as released.
_QWEN25 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "bfloat16",
}
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {**_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-1.5b": {**_QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-3b": {**_QWEN25, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False},
}
DTYPES = ("bfloat16", "float16", "float32")


def random_shape(name: str) -> dict[str, Any]:
    """The config of a named Qwen2.5 shape ("qwen2.5-0.5b" or "0.5b"), or of any Qwen2 from a config.json path."""
    key = name.lower()
    if key in SHAPES or f"qwen2.5-{key}" in SHAPES:
        return dict(SHAPES.get(key) or SHAPES[f"qwen2.5-{key}"])
    path = Path(name).expanduser()
    if path.suffix == ".json":
        config = read_json(path)
        ModelConfig.from_dict(config, str(path))  # the same checks a model folder gets
        return {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    raise QwenMLXError(f"--random {name}: unknown shape; choose one of {', '.join(SHAPES)} or give a config.json")


def write_random_qwen2(folder: Path, config: dict[str, Any], seed: int = 0) -> None:
    """config.json and model.safetensors of a Qwen2 with random weights (float16)."""
    model = Qwen2(ModelConfig.from_dict(config))
    # tree_flatten's stub covers its `destination` modes too; without one it returns (name, array) pairs.
    params = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    # Matrices wider than nn.Linear's init, so different prompts lead to visibly different (still meaningless)
    # replies; norms and biases keep their init.
    weights = {
        name: (mx.random.normal(p.shape, key=k) * 0.25 if p.ndim == 2 else p).astype(mx.float16)
        for (name, p), k in zip(params, keys, strict=True)
    }
    mx.save_safetensors(str(folder / "model.safetensors"), weights, {"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_random_model(folder: Path, config: dict[str, Any] = TINY_QWEN2, seed: int = 0) -> Path:
    """A complete model folder: random Qwen2 weights for `config` and Qwen2.5's real tokenizer files."""
    from qwen_mlx.store.tokenizer_files import write_qwen_tokenizer

    write_random_qwen2(folder, config, seed)
    write_qwen_tokenizer(folder)
    return folder


def write_random_quantized_model(
    folder: Path, config: dict[str, Any], bits: int = 4, group_size: int = 64, dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """A model folder that loads in qwen-mlx and mlx-lm: `config`'s shape, quantized weights drawn at random, and
    Qwen2.5's real tokenizer. Nothing is downloaded.

    The weights are drawn directly in quantized form (random codes, one scale and bias per matrix) and written
    shard by shard, so memory holds at most one 5 GB shard, never a float model: Qwen2.5-7B at 4 bits takes
    about 4.3 GB of disk and a minute or two.
    """
    from qwen_mlx.store.tokenizer_files import write_qwen_tokenizer
    from qwen_mlx.store.weights import write_weights

    check_quantization(bits, group_size)
    if dtype not in DTYPES:
        raise QwenMLXError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    shape = ModelConfig.from_dict(config)
    if shape.hidden_size % group_size or shape.intermediate_size % group_size:
        raise QwenMLXError(
            f"hidden_size {shape.hidden_size} and intermediate_size {shape.intermediate_size} must be multiples of "
            f"the group size {group_size}"
        )
    float_type = getattr(mx, dtype)
    key = mx.random.key(seed)

    def next_key() -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return sub

    def quantized(name: str, rows: int, cols: int) -> dict[str, mx.array]:
        # Uniform codes between -a and a with a = sqrt(3 / cols): unit-variance outputs for unit-variance inputs,
        # so the activations of a deep random model neither vanish nor overflow float16.
        a = math.sqrt(3 / cols)
        scale = 2 * a / (2**bits - 1)
        words = (rows, cols * bits // 32)
        high = mx.random.randint(0, 1 << 16, words, dtype=mx.uint32, key=next_key())
        low = mx.random.randint(0, 1 << 16, words, dtype=mx.uint32, key=next_key())
        groups = (rows, cols // group_size)
        return {
            f"{name}.weight": (high << 16) | low,  # randint draws 16 uniform bits at most
            f"{name}.scales": mx.full(groups, scale, dtype=float_type),
            f"{name}.biases": mx.full(groups, -a, dtype=float_type),
        }

    h, n_kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    weights: dict[str, mx.array] = quantized("model.embed_tokens", shape.vocab_size, h)
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        for proj, rows in (("q_proj", h), ("k_proj", n_kv), ("v_proj", n_kv)):
            weights.update(quantized(f"{p}.self_attn.{proj}", rows, h))
            weights[f"{p}.self_attn.{proj}.bias"] = mx.zeros((rows,), dtype=float_type)
        weights.update(quantized(f"{p}.self_attn.o_proj", h, h))
        weights.update(quantized(f"{p}.mlp.gate_proj", shape.intermediate_size, h))
        weights.update(quantized(f"{p}.mlp.up_proj", shape.intermediate_size, h))
        weights.update(quantized(f"{p}.mlp.down_proj", h, shape.intermediate_size))
        weights[f"{p}.input_layernorm.weight"] = mx.ones((h,), dtype=float_type)
        weights[f"{p}.post_attention_layernorm.weight"] = mx.ones((h,), dtype=float_type)
    weights["model.norm.weight"] = mx.ones((h,), dtype=float_type)
    if not shape.tie_word_embeddings:
        weights.update(quantized("lm_head", shape.vocab_size, h))

    folder.mkdir(parents=True, exist_ok=True)
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    full_config = {**config, "torch_dtype": dtype, "quantization": quantization, "quantization_config": quantization}
    (folder / "config.json").write_text(json.dumps(full_config, indent=2, sort_keys=True) + "\n")
    parameters = sum(v.size * (32 // bits if v.dtype == mx.uint32 else 1) for k, v in weights.items()
                     if not k.endswith((".scales", ".biases")))
    write_weights(folder, weights, parameters, desc="Drawing random weights")
    write_qwen_tokenizer(folder)
    return folder


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
