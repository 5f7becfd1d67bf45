"""The Qwen2 / Qwen2.5 decoder, top-down: Attention, MLP, Block, Qwen2Model, Qwen2."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.model.attention import scaled_dot_product_attention
from qwen_mlx.model.cache import LayerCache, Mask, RowsCache, settle_rope
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.cpu import in_order
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.model.rope import RoPE

if TYPE_CHECKING:
    from qwen_mlx.model.parallel import Stage


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, head_dim = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.scale = head_dim**-0.5
        # Qwen2 puts biases on q/k/v but not on o (the config has no flag for it).
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.rope = RoPE(head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings)
        # YaRN on demand: the RoPE of sequences whose cache has switched (`cache.rope_scaled`); None: one RoPE.
        self.long_rope = None if config.dynamic_rope_scaling is None else RoPE(
            head_dim, config.rope_theta, config.dynamic_rope_scaling, config.max_position_embeddings)
        self.yarn_switch = config.yarn_switch
        # The dtype keys and values are cached in; None: as computed. On MLX's CPU backend a half-precision
        # quantized model computes in float32 but caches in half precision, as mlx-lm does (qwen_mlx.model.cpu).
        self.kv_dtype: mx.Dtype | None = None
        # Queries per pass of a causal attention over many tokens; None: all at once (see `cpu.in_order`).
        self.prefill_chunk: int | None = None
        # Tensor parallel (`parallel.shard_model`): this rank holds some heads, and o_proj's partial sums add up.
        self.group: mx.distributed.Group | None = None

    def __call__(self, x: mx.array, mask: Mask, cache: LayerCache | None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rotate(q, offset, cache), self.rotate(k, offset, cache)
        if cache is not None:
            if self.kv_dtype is not None:
                k, v = k.astype(self.kv_dtype), v.astype(self.kv_dtype)
            # The cache stores keys already rotated, so positions keep counting up even after eviction.
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask, query_chunk=self.prefill_chunk)
        return all_sum(self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), self.group)

    def rotate(self, x: mx.array, offset: int | mx.array, cache: LayerCache | None) -> mx.array:
        """`x` at its positions, under the RoPE its sequence runs: YaRN once its cache switched (or, without a
        cache, when the sequence is longer than the original context), else plain."""
        if self.long_rope is None:
            return self.rope(x, offset)
        if cache is None:
            assert self.yarn_switch is not None  # set with long_rope, from config.dynamic_rope_scaling
            return (self.long_rope if x.shape[2] > self.yarn_switch else self.rope)(x, offset)
        if not isinstance(cache, RowsCache):
            return (self.long_rope if cache.rope_scaled else self.rope)(x, offset)
        scaled = [row.rope_scaled for row in cache.rows]
        if len(set(scaled)) == 1:
            return (self.long_rope if scaled[0] else self.rope)(x, offset)
        # Sequences decoded together may stand on both sides of the switch: each row under its own RoPE.
        assert isinstance(offset, mx.array)  # a RowsCache's: one offset per row
        return mx.concatenate([(self.long_rope if s else self.rope)(x[i : i + 1], offset[i : i + 1])
                               for i, s in enumerate(scaled)])


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        # Tokens per pass over many tokens; None: all at once (see `cpu.in_order`).
        self.prefill_chunk: int | None = None
        # Tensor parallel: this rank holds some of the hidden columns, and down_proj's partial sums add up.
        self.group: mx.distributed.Group | None = None

    def __call__(self, x: mx.array) -> mx.array:
        if self.prefill_chunk is not None and x.shape[1] > self.prefill_chunk:
            out = in_order(lambda s, e, wait: self.swiglu_mlp(wait(x[:, s:e])), x.shape[1], self.prefill_chunk, 1)
        else:
            out = self.swiglu_mlp(x)
        return all_sum(out, self.group)

    def swiglu_mlp(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def all_sum(x: mx.array, group: mx.distributed.Group | None) -> mx.array:
    return x if group is None else mx.distributed.all_sum(x, group=group)


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    # silu(gate) * up in one fused kernel, as mlx-lm computes it.
    return nn.silu(gate) * up


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Mask, cache: LayerCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Block(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # The dtype activations are computed in; None: the embedding's. See qwen_mlx.model.cpu for why it can differ.
        self.compute_dtype: mx.Dtype | None = None
        self.yarn_switch = config.yarn_switch
        # Pipeline parallel (`parallel.shard_model`): `layers` are this rank's stage, between the others'.
        self.stage: Stage | None = None

    def __call__(self, ids: mx.array, cache: Sequence[LayerCache] | None = None) -> mx.array:
        h = self.embed_tokens(ids)
        if self.compute_dtype is not None:
            h = h.astype(self.compute_dtype)
        if cache and self.yarn_switch is not None:
            settle_rope(cache, ids.shape[1], self.yarn_switch)
        layer_caches: Sequence[LayerCache] | list[None] = cache or [None] * len(self.layers)
        mask = attention_mask(h.shape[1], layer_caches[0])
        if self.stage is not None:
            h = self.stage.receive(h)
        for layer, layer_cache in zip(self.layers, layer_caches, strict=True):
            h = layer(h, mask, layer_cache)
        if self.stage is not None:
            h = self.stage.pass_on(h, layer_caches[-1])
        return self.norm(h)


class Qwen2(nn.Module):
    """The causal LM: `model(ids, cache=None)` → logits of shape (batch, length, vocab).

    `sampling_defaults` are the checkpoint's own (its generation_config.json, read by `load`): what generation
    uses for any sampling parameter a request leaves out. `fingerprint` tells its weights from another
    checkpoint's (`weights.fingerprint`), so caches saved for it are never applied to another model.
    """

    def __init__(self, config: ModelConfig, sampling_defaults: SamplingParams | None = None,
                 fingerprint: str | None = None):
        super().__init__()
        self.config = config
        self.sampling_defaults = sampling_defaults or SamplingParams()
        self.fingerprint = fingerprint
        # On MLX's CPU build, how a quantized model's weights are held and why (`store.load`; `model.cpu`).
        self.cpu_weights: str | None = None
        self.model = Qwen2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, ids: mx.array, cache: Sequence[LayerCache] | None = None) -> mx.array:
        return self.logits(self.model(ids, cache))

    def logits(self, h: mx.array) -> mx.array:
        """The output projection of hidden states `h` (the last norm's output): apart from the network, so an
        evaluation can project a few positions at a time instead of a whole window's (positions x vocabulary)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[Block]:
        return self.model.layers


def attention_mask(length: int, cache: LayerCache | None) -> Mask:
    """The mask for `length` new positions: none for one token, the fused causal mask, or the cache's own."""
    if cache is not None:
        return cache.make_mask(length)
    return "causal" if length > 1 else None
