"""qwen_mlx.model.cpu: quantized matmuls split across streams give exactly the unsplit results, and a half-precision
quantized model keeps its weights and KV cache in half precision while computing in float32."""

from __future__ import annotations

import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

import qwen_mlx
from qwen_mlx.blas import in_use
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import CacheSettings, make_cache
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.cpu import SplitQuantizedEmbedding, SplitQuantizedLinear, prepare_for_cpu, split_quantized_matmul
from qwen_mlx.model.qwen2 import Qwen2
from qwen_mlx.store.memory import (
    FLOAT_WEIGHTS_SHARE,
    Budget,
    choose_cpu_weights,
    first_chunk_bytes,
    plan_for_folder,
    plan_for_model,
)
from qwen_mlx.store.quantize import quantize_model
from qwen_mlx.store.synthetic import tiny_config, write_random_quantized_model


def quantized_model(dtype: mx.Dtype = mx.float16, tied: bool = True) -> Qwen2:
    mx.random.seed(0)
    config = ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=1024, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=tied)
    model = Qwen2(config)
    model.set_dtype(dtype)
    quantize_model(model, bits=4, group_size=32)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 7])
def test_split_matmul_is_bit_identical_to_the_whole(parts: int, length: int) -> None:
    layer = nn.QuantizedLinear(64, 1000, bias=False, group_size=32, bits=4)
    x = mx.random.normal((1, length, 64), key=mx.random.key(1))
    whole = layer(x)
    assert mx.array_equal(split_quantized_matmul(x, layer, 0, parts), whole).item()
    assert mx.array_equal(split_quantized_matmul(x, layer, 1, parts), whole).item()  # from another stream


@pytest.mark.parametrize("tied", [True, False])
def test_model_split_across_streams_gives_the_same_logits(tied: bool) -> None:
    model = quantized_model(tied=tied)
    ids = mx.array([[5, 17, 300, 2, 999, 42]])
    prepare_for_cpu(model, streams=1)
    assert not any(isinstance(m, (SplitQuantizedLinear, SplitQuantizedEmbedding)) for _, m in model.named_modules())
    one = model(ids)
    prepare_for_cpu(model, streams=2)
    mlp = model.layers[0].mlp
    # gate and up side by side, whole; the output projection (1024 rows) in two parts.
    assert (mlp.gate_proj.first_stream, mlp.gate_proj.parts) == (0, 1)
    assert (mlp.up_proj.first_stream, mlp.up_proj.parts) == (1, 1)
    output = model.model.embed_tokens if tied else model.lm_head
    assert output.parts == 2
    assert mx.array_equal(model(ids), one).item()


def test_half_precision_weights_stay_as_stored_and_activations_are_float32() -> None:
    model = quantized_model(mx.bfloat16)
    before = model.layers[0].mlp.down_proj.scales.nbytes
    prepare_for_cpu(model, streams=2)
    proj = model.layers[0].self_attn.q_proj
    assert proj.scales.dtype == proj.biases.dtype == mx.bfloat16
    assert model.layers[0].mlp.down_proj.scales.nbytes == before
    assert proj.bias.dtype == model.model.norm.weight.dtype == mx.float32  # small, and slow in half precision
    cache = make_cache(model)
    assert model(mx.array([[1, 2, 3]]), cache=cache).dtype == mx.float32
    assert cache[0].keys.dtype == mx.bfloat16  # as mlx-lm caches them


def test_float32_checkpoint_is_left_in_float32() -> None:
    model = quantized_model(mx.float32)
    prepare_for_cpu(model, streams=2)
    assert model.model.compute_dtype is None and model.layers[0].self_attn.kv_dtype is None
    cache = make_cache(model)
    model(mx.array([[1, 2, 3]]), cache=cache)
    assert cache[0].keys.dtype == mx.float32


def test_a_split_model_runs_from_another_thread() -> None:
    """The web UI and the server run the model on a worker thread, which gets streams of its own (MLX's
    thread-local streams): the graph is built and evaluated there."""
    model = quantized_model()
    prepare_for_cpu(model, streams=2)
    ids = mx.array([[5, 17, 300]])
    here = model(ids)
    result = []

    def work() -> None:
        logits = model(ids)
        mx.eval(logits)
        result.append(logits)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert mx.array_equal(result[0], here).item()


@pytest.mark.parametrize("cache_kind", ["none", "plain", "plain after a prefix", "rotating",
                                        "rotating past its window"])
def test_prompts_run_in_chunks_give_the_same_logits(cache_kind: str) -> None:
    """prefill_chunk runs attention and MLP a few tokens at a time: less memory, the same numbers (also where a
    wrapped rotating cache spells its mask out)."""
    model = quantized_model(mx.float32)
    prepare_for_cpu(model, streams=2)
    ids = mx.random.randint(0, 1024, (1, 23), key=mx.random.key(3))

    def logits(chunk: int | None) -> mx.array:
        for layer in model.layers:
            layer.self_attn.prefill_chunk = layer.mlp.prefill_chunk = chunk
        if cache_kind == "none":
            return model(ids)
        cache = make_cache(model, CacheSettings(max_kv_size=16 if cache_kind.startswith("rotating") else None))
        if cache_kind == "plain after a prefix":
            model(ids[:, :5], cache=cache)
            return model(ids[:, 5:], cache=cache)
        if cache_kind == "rotating past its window":
            model(ids[:, :12], cache=cache)  # 12 + 11 positions > 16: the second chunk's mask is an array
            assert not isinstance(cache[0].make_mask(11), str)
            return model(ids[:, 12:], cache=cache)
        return model(ids, cache=cache)

    whole = logits(None)
    assert mx.array_equal(logits(4), whole).item()
    assert mx.array_equal(logits(7), whole).item()


def close_to(a: mx.array, b: mx.array, tolerance: float = 1e-4) -> bool:
    """Within float tolerance of each other, relative to the logits' scale."""
    return mx.abs(a - b).max().item() <= tolerance * mx.abs(b).max().item()


def greedy_tokens(model: Qwen2, prompt: mx.array, count: int, chunk: int) -> list[int]:
    """`count` greedy tokens after `prompt`, prefilled `chunk` rows at a time through a cache."""
    cache = make_cache(model, CacheSettings())
    for start in range(0, prompt.shape[1], chunk):
        logits = model(prompt[:, start : start + chunk], cache=cache)
    tokens = [int(mx.argmax(logits[0, -1]).item())]
    while len(tokens) < count:
        tokens.append(int(mx.argmax(model(mx.array([tokens[-1:]]), cache=cache)[0, -1]).item()))
    return tokens


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_wide_steps_and_float_weights_give_the_quantized_logits(tied: bool, dtype: mx.Dtype) -> None:
    """A step over more than `wide_rows` rows multiplies dequantized float32 weights, and `weights="float"` holds
    them so: the same logits within float tolerance; a step of a few rows stays the quantized matmul exactly."""
    ids = mx.random.randint(0, 1024, (1, 40), key=mx.random.key(4))
    quantized = quantized_model(dtype, tied=tied)
    prepare_for_cpu(quantized, streams=2)
    wide = quantized_model(dtype, tied=tied)
    prepare_for_cpu(wide, streams=2, wide_rows=8)
    floats = quantized_model(dtype, tied=tied)
    prepare_for_cpu(floats, streams=2, weights="float")
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in floats.named_modules())
    assert floats.layers[0].self_attn.kv_dtype == quantized.layers[0].self_attn.kv_dtype
    reference = quantized(ids)
    assert close_to(wide(ids), reference)
    assert mx.array_equal(wide(ids[:, :8]), quantized(ids[:, :8])).item()
    # The quantized embedding's lookups come in its scales' dtype, the float32 one's in float32: with float16
    # scales the prompt's activations differ by half-precision rounding (1e-4 in this model's), 5e-4 in its logits.
    assert close_to(floats(ids), reference, 1e-4 if dtype == mx.float32 else 1e-3)


def test_greedy_tokens_are_the_same_with_float_steps_and_float_weights() -> None:
    prompt = mx.random.randint(0, 1024, (1, 48), key=mx.random.key(5))
    expected = None
    for weights, wide_rows in [("quantized", None), ("quantized", 8), ("float", None)]:
        model = quantized_model()
        prepare_for_cpu(model, streams=2, weights=weights, wide_rows=wide_rows)
        tokens = greedy_tokens(model, prompt, 32, chunk=16)
        expected = expected or tokens
        assert tokens == expected, (weights, wide_rows)


def test_float_weights_are_chosen_where_they_fit_and_counted_once_held(monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantized_model()
    plan = plan_for_model(model)
    assert plan is not None
    need = plan.parameters * 4 + plan.weights + first_chunk_bytes(plan)
    roomy, tight = Budget(int(need / FLOAT_WEIGHTS_SHARE) + 1, "test"), Budget(need, "test")
    monkeypatch.delenv("QWEN_MLX_CPU_WEIGHTS", raising=False)
    optimized = in_use().optimized
    assert choose_cpu_weights(plan, roomy)[0] == ("float" if optimized else "quantized")
    assert choose_cpu_weights(plan, tight)[0] == ("wide" if optimized else "quantized")
    monkeypatch.setenv("QWEN_MLX_CPU_WEIGHTS", "float")
    assert choose_cpu_weights(plan, tight)[0] == "float"
    monkeypatch.setenv("QWEN_MLX_CPU_WEIGHTS", "quantized")
    assert choose_cpu_weights(plan, roomy)[0] == "quantized"
    monkeypatch.setenv("QWEN_MLX_CPU_WEIGHTS", "fast")
    with pytest.raises(QwenMLXError, match="QWEN_MLX_CPU_WEIGHTS"):
        choose_cpu_weights(plan, roomy)
    prepare_for_cpu(model, streams=2, weights="float")
    held = plan_for_model(model)
    assert held is not None and held.weights == plan.parameters * 4


def test_load_holds_float_weights_where_they_fit_and_the_plan_counts_them(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    folder = write_random_quantized_model(tmp_path / "m", config, 4, 64, "bfloat16")
    ids = mx.array([[1, 2, 3, 4, 5]])
    monkeypatch.setenv("QWEN_MLX_CPU_WEIGHTS", "quantized")
    stored, _ = qwen_mlx.load(folder)
    monkeypatch.setenv("QWEN_MLX_CPU_WEIGHTS", "auto")
    monkeypatch.setenv("QWEN_MLX_MEMORY_BUDGET", "16GB")
    floats, _ = qwen_mlx.load(folder)
    if not in_use().optimized:
        assert floats.cpu_weights is not None and floats.cpu_weights.startswith("quantized (the reference BLAS")
        return
    assert stored.cpu_weights == "quantized (QWEN_MLX_CPU_WEIGHTS=quantized)"
    assert floats.cpu_weights is not None and floats.cpu_weights.startswith("float32 (")
    held, planned = plan_for_model(floats), plan_for_folder(folder)
    assert held is not None and held.weights == planned.parameters * 4
    # The quantized embedding dequantizes its lookups in bfloat16 arithmetic (0.5% off the float32 values): past
    # the embedding the layers agree exactly, and the logits within that.
    assert close_to(floats(ids), stored(ids), 1e-2)
    assert greedy_tokens(floats, ids, 16, chunk=5) == greedy_tokens(stored, ids, 16, chunk=5)
    monkeypatch.setenv("QWEN_MLX_MEMORY_BUDGET", str(planned.weights + first_chunk_bytes(planned)))
    wide, _ = qwen_mlx.load(folder)
    assert wide.cpu_weights is not None and wide.cpu_weights.startswith("quantized, steps over 32 rows in float32")
