"""Scaled dot-product attention over whatever a cache hands back: plain keys (the fused kernel), quantized keys
(matmuls on the packed groups), or one set of keys per sequence decoded together (`cache.RowsCache`)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from qwen_mlx.model.cache import Mask
from qwen_mlx.model.cpu import in_order


def scaled_dot_product_attention(
    q: mx.array, k: Any, v: Any, *, scale: float, mask: Mask, query_chunk: int | None = None
) -> mx.array:
    """softmax(q·kᵀ·scale + mask)·v for queries (batch, heads, length, dim) against any cache's keys and values.

    `query_chunk` runs a long causal prompt's queries that many at a time, in order, so that MLX's CPU backend,
    which materializes the scores, holds one chunk's at a time (see `cpu.in_order`).
    """
    if isinstance(k, list):  # RowsCache: one token per row, each against its own keys
        return mx.concatenate([
            scaled_dot_product_attention(q[i : i + 1], k[i], v[i], scale=scale, mask=None) for i in range(len(k))
        ])
    if isinstance(k, tuple):  # QuantizedKVCache: (packed, scales, biases)
        assert not isinstance(mask, str)  # its masks are spelled out: the quantized matmuls have no causal mode
        return quantized_attention(q, k, v, scale, mask)
    L = q.shape[2]
    if query_chunk is not None and L > query_chunk and isinstance(mask, str):  # "causal"
        # Query rows s..e see the keys up to their own positions: the first S - L + e of the S keys.
        S = k.shape[2]
        return in_order(
            lambda s, e, wait: mx.fast.scaled_dot_product_attention(
                wait(q[:, :, s:e]), k[:, :, : S - L + e], v[:, :, : S - L + e], scale=scale, mask="causal"),
            L, query_chunk, axis=2,
        )
    if query_chunk is not None and L > query_chunk and isinstance(mask, mx.array) and mask.shape[-2] == L:
        # A mask spelled out (a rotating cache past its window): each piece of queries takes its rows of it.
        return in_order(
            lambda s, e, wait: mx.fast.scaled_dot_product_attention(
                wait(q[:, :, s:e]), k, v, scale=scale, mask=mask[..., s:e, :]),
            L, query_chunk, axis=2,
        )
    # Grouped-query attention: the fused kernel broadcasts the n_kv_heads over the n_heads itself.
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def quantized_attention(
    q: mx.array,
    k: tuple[mx.array, ...],
    v: tuple[mx.array, ...],
    scale: float,
    mask: mx.array | None,
) -> mx.array:
    """Attention over quantized keys and values (mlx-lm's quantized SDPA): the matmuls read the packed groups."""
    B, n_heads, L, D = q.shape
    # The packing tells the settings: D values take D * bits / 32 words, in D / group_size groups.
    bits, group_size = k[0].shape[-1] * 32 // D, D // k[1].shape[-1]
    n_kv_heads = k[0].shape[1]
    groups = n_heads // n_kv_heads
    # Each KV head serves `groups` query heads: put them side by side instead of repeating the keys.
    q = (q * scale).reshape(B, n_kv_heads, groups, L, D)
    k_codes, k_scales, k_biases = (mx.expand_dims(a, 2) for a in k)
    v_codes, v_scales, v_biases = (mx.expand_dims(a, 2) for a in v)
    scores = mx.quantized_matmul(q, k_codes, k_scales, k_biases, transpose=True, group_size=group_size, bits=bits)
    if mask is not None:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(weights, v_codes, v_scales, v_biases, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, n_heads, L, -1)
