"""Affine group quantization of a Qwen2 model through MLX, in mlx-lm's on-disk layout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from qwen_mlx.errors import QwenMLXError

SUPPORTED_BITS = (2, 3, 4, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def check_quantization(bits: int, group_size: int) -> None:
    """Refuse settings MLX's affine kernels do not offer, naming the ones they do."""
    if bits not in SUPPORTED_BITS:
        raise QwenMLXError(
            f"{bits} bits (--q-bits) is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}"
        )
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QwenMLXError(
            f"group size {group_size} (--q-group-size) is not supported; choose one of "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )


def quantize_model(
    model: nn.Module, bits: int = 4, group_size: int = 64, layer_bits: dict[str, int] | None = None
) -> dict[str, Any]:
    """Quantize the Linear layers and the embedding of `model` in place; return config.json's `quantization`.

    `layer_bits` gives chosen layers other bits: `{"embed_tokens": 8, "model.layers.0.mlp.down_proj": 6}`.
    A name matches every layer whose dotted path contains it as whole parts ("down_proj" matches all of them);
    a layer matched by several names gets the highest bits. The block records each such layer the way mlx-lm
    does (`"model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8, "mode": "affine"}`), and as `false`
    each layer left in full precision because its input dimension is not a multiple of the group size.
    """
    check_quantization(bits, group_size)
    quantizable = {path: m for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise QwenMLXError("the model is already quantized; dequantize it first (convert with -d)")
    for name, layer_bit in (layer_bits or {}).items():
        if layer_bit not in SUPPORTED_BITS:
            raise QwenMLXError(
                f"--q-keep {name}={layer_bit}: {layer_bit} bits is not supported; "
                f"choose one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
    per_layer = _match_layer_bits(quantizable, layer_bits or {}, tied=_ties_embeddings(model))

    block: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path not in quantizable:
            return False
        if module.weight.shape[-1] % group_size:
            block[path] = False
            return False
        if path in per_layer:
            block[path] = {"group_size": group_size, "bits": per_layer[path], "mode": "affine"}
            return dict(block[path])
        return True

    nn.quantize(model, group_size=group_size, bits=bits, mode="affine", class_predicate=predicate)
    return block


def _ties_embeddings(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False))


def _match_layer_bits(
    quantizable: Mapping[str, nn.Module], layer_bits: dict[str, int], tied: bool
) -> dict[str, int]:
    """Layer path → bits for the names in `layer_bits`; a name matching no layer is a typo, not a no-op."""
    per_layer: dict[str, int] = {}
    for name, layer_bit in layer_bits.items():
        # With tied embeddings the embedding is the output projection: lm_head's precision is the embedding's.
        target = "embed_tokens" if name == "lm_head" and tied else name
        paths = [p for p in quantizable if f".{target}." in f".{p}."]
        if not paths:
            examples = ", ".join(sorted({p.split(".")[-1] for p in quantizable}))
            raise QwenMLXError(f"--q-keep: no layer is named {name!r}; layer names include {examples}")
        for path in paths:
            per_layer[path] = max(layer_bit, per_layer.get(path, 0))
    return per_layer


def dequantize_model(model: nn.Module) -> None:
    """Turn every quantized layer of `model` back into a full-precision Linear or Embedding, in place."""
    layers = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        weight = mx.dequantize(
            module.weight, module.scales, module.get("biases"), module.group_size, module.bits, module.mode
        )
        layer: nn.Linear | nn.Embedding
        if isinstance(module, nn.QuantizedLinear):
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        else:
            layer = nn.Embedding(*weight.shape)
        layer.weight = weight
        layers.append((path, layer))
    if layers:
        model.update_modules(tree_unflatten(layers))


def parameter_count(model: nn.Module) -> int:
    """The number of weights the model stands for, a quantized matrix counted unpacked (as mlx-lm counts)."""
    total = 0
    # tree_flatten's stub covers its `destination` modes too; without one it returns (name, leaf) pairs.
    leaves = cast(list[tuple[str, nn.Module]], tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    for _, leaf in leaves:
        if isinstance(leaf, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += leaf.weight.size * 32 // leaf.bits + (leaf.bias.size if "bias" in leaf else 0)
        else:
            total += sum(v.size for _, v in cast(list[tuple[str, mx.array]], tree_flatten(leaf.parameters())))
    return total


def prepare_quantized(model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers where a checkpoint holds quantized weights, before loading them.

    mlx-lm's rules: a layer is quantized iff its `.scales` are in the checkpoint; a per-layer entry in the
    config's quantization block (`{"bits": 8, "group_size": 64}`, or `false`) overrides the defaults.
    """

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )
