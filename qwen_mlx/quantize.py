"""Affine group quantization of a Qwen2 model through MLX, in mlx-lm's on-disk layout."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


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
