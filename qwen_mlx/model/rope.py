"""Rotary position embeddings: plain RoPE, and YaRN for contexts beyond the pretraining length."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def yarn_parameters(
    head_dim: int, base: float, scaling: dict[str, Any], max_position_embeddings: int
) -> tuple[np.ndarray, float]:
    """YaRN's inverse frequencies and attention factor, as transformers' `_compute_yarn_parameters` computes them.

    Low-frequency dimensions are interpolated by `factor`, high-frequency ones kept (extrapolated), with a linear
    ramp between the correction range set by beta_fast / beta_slow (arXiv 2309.00071, sec. 3.2).
    """
    factor = scaling["factor"]
    original_max = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / original_max

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp

    # float32 throughout, like the torch reference, so the frequencies agree to the last bit we can get.
    pos_freqs = np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


class RoPE(nn.Module):
    """Non-interleaved ("rotate half") RoPE over the whole head, as Qwen2 uses, through `mx.fast.rope`."""

    def __init__(
        self,
        head_dim: int,
        base: float,
        scaling: dict[str, Any] | None = None,
        max_position_embeddings: int = 32768,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.attention_factor = 1.0
        self._freqs = None  # underscore: not a parameter, never saved with the weights
        if scaling is not None:
            inv_freq, self.attention_factor = yarn_parameters(head_dim, base, scaling, max_position_embeddings)
            # mx.fast.rope takes periods (angle = position / freq), the reciprocal of transformers' inv_freq.
            self._freqs = mx.array(1.0 / inv_freq)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        # transformers multiplies cos and sin by the attention factor; rotation is linear, so scaling the input
        # before rotating is the same thing.
        if self.attention_factor != 1.0:
            x = x * self.attention_factor
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=None if self._freqs is not None else self.base,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )
