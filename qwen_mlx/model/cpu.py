"""Quantized models on MLX's CPU backend: float32 arithmetic on weights kept as stored, and every core busy.

Three properties of MLX's CPU build decide how fast a quantized Qwen runs there:

- Its quantized matmul is 40x slower on float16 inputs and 8x slower on bfloat16 than on float32 (896x4864 at
  4 bits, one token: 124 / 25 / 3.0 ms). Only the activations need to be float32, though: given float32 inputs,
  `quantized_matmul` promotes half-precision scales and biases itself, per call, for 3% of the matmul's time
  (3.07 vs 2.96 ms). So the quantized weights stay in memory exactly as stored, byte for byte what mlx-lm holds,
  and only the activations are float32. Keys and values are cached in the weights' dtype, as mlx-lm caches them:
  attention promotes them per layer, and a long context takes half the memory of a float32 cache.
- A stream runs its ops one after another on one thread, so each matmul uses one core. Each large quantized
  matmul is split by output rows into one part per core, each part on its own stream, so the parts run side by
  side (1.9x for a decode step on 2 cores). Every output row is computed exactly as without the split.
- Its attention materializes the scores (heads x queries x keys, in float32 here), and lazy evaluation may keep a
  whole prompt's MLP intermediates alive at once. A long prompt's attention and MLP therefore run a few tokens at
  a time, in order (`in_order`): half the activation memory of a 512-token prefill, at the same speed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

HALF = (mx.float16, mx.bfloat16)
MAX_STREAMS = 8
# A part smaller than this is not worth a stream hand-off: Qwen2.5-0.5B's 896x128 k/v projections take 0.08 ms.
MIN_ROWS_PER_PART = 256
# Attention and MLP over a long prompt run this many tokens at a time (in_order). A 511-token prefill of
# Qwen2.5-0.5B on 2 cores: 72 MB of activations all at once, 38 MB by 64, 32 MB by 32, all at 8.2-8.5 tokens/s.
PREFILL_CHUNK = 32


def in_order(part: Callable[..., mx.array], length: int, step: int, axis: int) -> mx.array:
    """`part(start, end, wait)` for consecutive ranges of `step` positions, concatenated along `axis`. Each part
    passes its input through `wait`, which makes it depend on the previous part's output (`mx.depends`): without
    that chain MLX may schedule all parts at once; with it, one part's intermediates exist at a time. On MLX's CPU
    backend, where attention materializes its scores, a 511-token prefill of Qwen2.5-0.5B then needs 32 MB of
    activations instead of 72, at the same speed (`prepare_for_cpu` sets the step)."""
    outputs: list[mx.array] = []
    for start in range(0, length, step):
        after = outputs[-1] if outputs else None

        def wait(x: mx.array, after: mx.array | None = after) -> mx.array:
            return x if after is None else mx.depends(x, after)

        outputs.append(part(start, min(start + step, length), wait))
    return mx.concatenate(outputs, axis=axis)


def cpu_streams() -> int:
    """How many streams to split matmuls across: $QWEN_MLX_CPU_STREAMS, else the cores this process may use (at
    most 8, beyond which the parts get too small to pay for their hand-offs)."""
    configured = os.environ.get("QWEN_MLX_CPU_STREAMS")
    if configured:
        return max(1, int(configured))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_STREAMS)


# Thread-local streams: each thread that runs a model (the CLI's, a web worker's) gets streams of its own. Index 0
# stands for the caller's stream; the pool only grows, so every split layer of every model shares the same streams.
_POOL: list[mx.ThreadLocalStream] = []


def _streams(first: int, count: int) -> list[mx.ThreadLocalStream | None]:
    while len(_POOL) < first + count - 1:
        _POOL.append(mx.new_thread_local_stream(mx.cpu))
    return [None if i == 0 else _POOL[i - 1] for i in range(first, first + count)]


def split_quantized_matmul(x: mx.array, layer: nn.Module, first_stream: int, parts: int) -> mx.array:
    """`x @ dequantize(layer.weight).T`, its output rows in `parts` parts computed side by side on as many streams
    (numbered from `first_stream`; 0 is the caller's)."""
    rows = layer["weight"].shape[0]
    bounds = [rows * i // parts for i in range(parts + 1)]
    biases = layer.get("biases")
    outputs = []
    for stream, start, end in zip(_streams(first_stream, parts), bounds, bounds[1:], strict=False):
        with mx.stream(stream) if stream is not None else nullcontext():
            outputs.append(mx.quantized_matmul(
                x, layer["weight"][start:end], layer["scales"][start:end],
                None if biases is None else biases[start:end],
                transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
            ))
    return outputs[0] if parts == 1 else mx.concatenate(outputs, axis=-1)


class SplitQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear (same parameters, same results) whose matmul runs on `parts` streams from `first_stream`."""

    first_stream = 0
    parts = 1

    def __call__(self, x: mx.array) -> mx.array:
        x = split_quantized_matmul(x, self, self.first_stream, self.parts)
        if "bias" in self:
            x = x + self["bias"]
        return x


class SplitQuantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose use as the output projection (tied embeddings) runs on `parts` streams."""

    first_stream = 0
    parts = 1

    def as_linear(self, x: mx.array) -> mx.array:
        return split_quantized_matmul(x, self, self.first_stream, self.parts)


def _split(module: nn.Module, first_stream: int, parts: int) -> None:
    if isinstance(module, nn.QuantizedLinear):
        module.__class__ = SplitQuantizedLinear
    elif isinstance(module, nn.QuantizedEmbedding):
        module.__class__ = SplitQuantizedEmbedding
    else:
        return
    module.first_stream, module.parts = first_stream, parts


def prepare_for_cpu(model: nn.Module, streams: int | None = None) -> None:
    """Set up a quantized Qwen2 (in place) to run fast on MLX's CPU backend, in no more memory than as stored.

    Quantized layers keep their scales and biases as stored; the few other half-precision tensors (norms, the
    q/k/v biases, any layer left unquantized) become float32, since the CPU kernels are slow on half precision and
    they are small. Activations are float32, and the KV cache keeps the weights' dtype. Large quantized matmuls are
    split across `streams` streams (default: `cpu_streams()`), and long prompts go through attention and MLP
    `PREFILL_CHUNK` tokens at a time.
    """
    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    quantized = {path for path, m in model.named_modules() if isinstance(m, kinds)}
    # tree_flatten's stub covers its `destination` modes too; without one it returns (name, array) pairs.
    parameters = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    upcast = [
        (name, p.astype(mx.float32))
        for name, p in parameters
        if p.dtype in HALF and not (name.rpartition(".")[0] in quantized and name.endswith((".scales", ".biases")))
    ]
    model.update(tree_unflatten(upcast))
    for layer in model.layers:
        layer.self_attn.prefill_chunk = layer.mlp.prefill_chunk = PREFILL_CHUNK
    stored = {m.scales.dtype for path, m in model.named_modules() if path in quantized}
    if stored & set(HALF):
        model.model.compute_dtype = mx.float32
        kv_dtype = next(iter(stored)) if len(stored) == 1 else mx.float32
        for layer in model.layers:
            layer.self_attn.kv_dtype = kv_dtype

    streams = cpu_streams() if streams is None else streams
    if streams < 2:
        mx.eval(model.parameters())
        return
    _streams(0, streams)
    for layer in model.layers:
        # The MLP's gate and up projections are the widest outputs (4864 columns for 0.5B): rather than split each
        # and copy the parts together, run them side by side whole, half the streams each.
        _split(layer.mlp.gate_proj, 0, streams // 2)
        _split(layer.mlp.up_proj, streams // 2, streams - streams // 2)
    for _, module in model.named_modules():
        if "scales" in module and module.__class__ in (nn.QuantizedLinear, nn.QuantizedEmbedding):
            parts = min(streams, module["weight"].shape[0] // MIN_ROWS_PER_PART)
            if parts >= 2:
                _split(module, 0, parts)
    mx.eval(model.parameters())
