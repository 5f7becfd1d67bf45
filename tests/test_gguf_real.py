"""The real Qwen2.5-Coder-0.5B-Instruct GGUF (downloaded by the `real_gguf_05b` fixture; run with -m real): every
tensor in MLX's layout dequantizes to what gguf's own dequantizer gives, and its tokenizer is Qwen's."""

from __future__ import annotations

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer

from qwen_mlx.store.gguf import open_gguf
from qwen_mlx.store.gguf_quants import FLOAT_TYPES, GROUP_SIZE, to_affine
from qwen_mlx.store.gguf_tokenizer import build_tokenizer

pytestmark = pytest.mark.real


def test_every_tensor_dequantizes_as_gguf_does(real_gguf_05b: Path) -> None:
    worst: dict[str, float] = {}
    for t in open_gguf(real_gguf_05b).tensors:
        if t.tensor_type in FLOAT_TYPES:
            continue
        reference = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        affine = to_affine(np.asarray(t.data), t.tensor_type, *reference.shape)
        # float32 arithmetic on the stored float16 scales: the layout's error, not that of float16 matmuls
        ours = mx.dequantize(affine.weight, affine.scales.astype(mx.float32), affine.biases.astype(mx.float32),
                             group_size=GROUP_SIZE, bits=affine.bits)
        error = float(np.abs(np.array(ours) - reference).max())
        worst[t.tensor_type.name] = max(worst.get(t.tensor_type.name, 0.0), error)
    assert set(worst) == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    assert worst["Q5_0"] == worst["Q8_0"] == 0  # the same integers, scales and offsets
    assert worst["Q4_K"] < 1e-3  # d·sc and dmin·m rounded to float16 (measured 5.8e-4)
    assert worst["Q6_K"] < 3e-3  # requantized to 8 bits in groups of 32 (measured 2.7e-3)


def test_tokenizer_gives_the_real_qwen_ids(real_gguf_05b: Path, qwen_tokenizer_dir: Path) -> None:
    ours = build_tokenizer(open_gguf(real_gguf_05b), real_gguf_05b)
    real = Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    text = ("<|im_start|>user\nHello, 世界! Привет, мир. こんにちは 🌍 مرحبا नमस्ते 안녕하세요 e\u0301 ﬁ ½\n\n  \t"
            "1,000.5<tool_call>{\"a\": 1}</tool_call><|fim_prefix|>def f():<|fim_suffix|><|fim_middle|><|im_end|>")
    assert ours.encode(text).ids == real.encode(text).ids
