"""quantize_model / dequantize_model on in-memory tiny models: what gets quantized, and what the config records."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.qwen2 import Qwen2
from qwen_mlx.store.quantize import dequantize_model, parameter_count, quantize_model

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model(tied: bool = True, intermediate_size: int = 128, seed: int = 0) -> Qwen2:
    mx.random.seed(seed)
    config = ModelConfig(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=intermediate_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=tied,
    )
    model = Qwen2(config)
    mx.eval(model.parameters())
    return model


def layers_by_path(model: nn.Module) -> dict[str, nn.Module]:
    names = (*LINEAR_NAMES, "embed_tokens", "lm_head")
    return {path: m for path, m in model.named_modules() if path.split(".")[-1] in names}


@pytest.mark.parametrize("tied", [True, False])
def test_quantize_model_quantizes_every_linear_layer_and_the_embedding(tied: bool) -> None:
    model = tiny_model(tied)
    block = quantize_model(model, bits=4, group_size=64)
    assert block == {"group_size": 64, "bits": 4, "mode": "affine"}
    layers = layers_by_path(model)
    assert len(layers) == 2 * len(LINEAR_NAMES) + (1 if tied else 2)
    for path, layer in layers.items():
        expected = nn.QuantizedEmbedding if path.endswith("embed_tokens") else nn.QuantizedLinear
        assert isinstance(layer, expected), path
        assert (layer.bits, layer.group_size, layer.mode) == (4, 64, "affine")
    assert not any(isinstance(m, nn.Linear) for _, m in model.named_modules())


def test_tied_model_uses_the_quantized_embedding_as_output_projection() -> None:
    model = tiny_model(tied=True)
    quantize_model(model, bits=4, group_size=32)
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    emb = model.model.embed_tokens
    hidden = model.model(ids)
    expected = mx.quantized_matmul(
        hidden, emb.weight, emb.scales, emb.biases, transpose=True, group_size=32, bits=4
    )
    assert mx.array_equal(model(ids), expected)


@pytest.mark.parametrize(("bits", "group_size"), [(1, 64), (5, 64), (16, 64), (4, 16), (4, 48), (4, 256)])
def test_unsupported_bits_or_group_size_is_refused(bits: int, group_size: int) -> None:
    model = tiny_model()
    with pytest.raises(QwenMLXError, match="is not supported; choose one of"):
        quantize_model(model, bits=bits, group_size=group_size)
    assert isinstance(model.layers[0].mlp.down_proj, nn.Linear)


def test_layers_whose_input_is_not_a_multiple_of_the_group_stay_full_precision_and_are_recorded_false() -> None:
    model = tiny_model(intermediate_size=96)  # down_proj's input: 96 = 1.5 groups of 64
    block = quantize_model(model, bits=4, group_size=64)
    assert block == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
        "model.layers.0.mlp.down_proj": False,
        "model.layers.1.mlp.down_proj": False,
    }
    for layer in model.layers:
        assert isinstance(layer.mlp.down_proj, nn.Linear)
        assert isinstance(layer.mlp.up_proj, nn.QuantizedLinear)  # output 96, input 64: quantizable


def test_layer_bits_quantize_every_matching_layer_with_its_bits_and_record_each_like_mlx_lm() -> None:
    model = tiny_model(tied=False)
    block = quantize_model(model, bits=4, group_size=64, layer_bits={"down_proj": 8, "lm_head": 6})
    eight = {"group_size": 64, "bits": 8, "mode": "affine"}
    assert block == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
        "model.layers.0.mlp.down_proj": eight,
        "model.layers.1.mlp.down_proj": eight,
        "lm_head": {"group_size": 64, "bits": 6, "mode": "affine"},
    }
    assert [layer.mlp.down_proj.bits for layer in model.layers] == [8, 8]
    assert model.lm_head.bits == 6
    assert model.layers[0].mlp.up_proj.bits == 4
    assert model.model.embed_tokens.bits == 4


def test_a_layer_matched_by_several_names_gets_the_highest_bits() -> None:
    model = tiny_model()
    block = quantize_model(model, layer_bits={"layers.1.mlp": 6, "down_proj": 8})
    assert model.layers[1].mlp.down_proj.bits == 8
    assert model.layers[1].mlp.gate_proj.bits == 6
    assert model.layers[0].mlp.gate_proj.bits == 4
    assert block["model.layers.1.mlp.down_proj"]["bits"] == 8
    assert "model.layers.0.mlp.gate_proj" not in block


def test_lm_head_of_a_tied_model_names_the_embedding_that_serves_as_it() -> None:
    model = tiny_model(tied=True)
    block = quantize_model(model, layer_bits={"lm_head": 8})
    assert model.model.embed_tokens.bits == 8
    assert block["model.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}


def test_a_layer_name_that_matches_nothing_is_refused() -> None:
    with pytest.raises(QwenMLXError, match="no layer is named 'down_prj'"):
        quantize_model(tiny_model(), layer_bits={"down_prj": 8})


def test_unsupported_layer_bits_are_refused() -> None:
    with pytest.raises(QwenMLXError, match="down_proj=5: 5 bits is not supported"):
        quantize_model(tiny_model(), layer_bits={"down_proj": 5})


def test_an_already_quantized_model_is_refused() -> None:
    model = tiny_model()
    quantize_model(model)
    with pytest.raises(QwenMLXError, match="already quantized"):
        quantize_model(model)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (8, 32), (3, 32), (6, 64)])
def test_dequantize_restores_full_precision_layers_within_one_quantization_step(bits: int, group_size: int) -> None:
    model = tiny_model(tied=False, intermediate_size=256)
    original = dict(tree_flatten(model.parameters()))
    quantize_model(model, bits=bits, group_size=group_size)
    steps = {path: mx.repeat(layer.scales, group_size, axis=-1) for path, layer in layers_by_path(model).items()}
    dequantize_model(model)
    restored = dict(tree_flatten(model.parameters()))
    assert set(restored) == set(original)
    for path, layer in layers_by_path(model).items():
        assert type(layer) in (nn.Linear, nn.Embedding), path
        error = mx.abs(restored[f"{path}.weight"] - original[f"{path}.weight"])
        # MLX's affine rounding keeps zero exact, so the error can reach one step (not just half of one).
        assert mx.all(error <= mx.abs(steps[path]) * 1.001 + 1e-7).item(), path
    for name, value in original.items():
        if not name.endswith(".weight") or "norm" in name:
            assert mx.array_equal(restored[name], value), name


def test_parameter_count_counts_quantized_matrices_unpacked() -> None:
    model = tiny_model(tied=False)
    before = parameter_count(model)
    assert before == sum(v.size for _, v in tree_flatten(model.parameters()))
    quantize_model(model, bits=3, group_size=32)
    assert parameter_count(model) == before
