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
- Its quantized matmul costs about the same per row however many rows come (896x4864 at 4 bits: 2.8 ms for one,
  ~45 for 16, ~1300-2000 for 512), while an optimized BLAS's float32 matmul barely grows with them (22 ms for 16
  rows, 52 for 512, of which 18 are the dequantize). So with an optimized BLAS (`qwen_mlx.blas`) a step over more
  than `WIDE_ROWS` rows dequantizes the weight and multiplies in float32; and where memory allows, the weights are
  held dequantized in float32 for good (`weights="float"`): 0.9-1.6 ms for one row, 4.4-4.7 for 64, 26-28 for 512.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from qwen_mlx.blas import set_threads

HALF = (mx.float16, mx.bfloat16)
MAX_STREAMS = 8
# A part smaller than this is not worth a stream hand-off: Qwen2.5-0.5B's 896x128 k/v projections take 0.08 ms.
MIN_ROWS_PER_PART = 256
# Attention and MLP over a long prompt run this many tokens at a time (in_order). A 511-token prefill of
# Qwen2.5-0.5B on 2 cores: 72 MB of activations all at once, 38 MB by 64, 32 MB by 32, all at 8.2-8.5 tokens/s.
PREFILL_CHUNK = 32
# A quantized matmul over more rows than this dequantizes its weight and multiplies in float32 (with an optimized
# BLAS). At 896x4864, 4 bits in groups of 64, 16 rows take ~45 ms quantized and 22 dequantized; but at 5 bits in
# groups of 32 (a GGUF import of Qwen2.5-Coder-0.5B) the dequantize alone takes ~120 ms: 32 rows take 106 ms
# quantized and 126 dequantized, 512 rows 1695 and 145. A prompt's MLP runs PREFILL_CHUNK rows at a time, so
# those stay quantized; whole prompt chunks through the attention projections, batches and the output layer do not.
WIDE_ROWS = 32


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


def split_quantized_matmul(x: mx.array, layer: nn.Module, first_stream: int, parts: int,
                           wide_rows: int | None = None) -> mx.array:
    """`x @ dequantize(layer.weight).T`, its output rows in `parts` parts computed side by side on as many streams
    (numbered from `first_stream`; 0 is the caller's). Over more than `wide_rows` rows of `x`, each part
    dequantizes its rows to float32 and multiplies there: the BLAS's matmul, not MLX's quantized one."""
    rows = layer["weight"].shape[0]
    bounds = [rows * i // parts for i in range(parts + 1)]
    biases = layer.get("biases")
    wide = wide_rows is not None and x.size // x.shape[-1] > wide_rows
    outputs = []
    for stream, start, end in zip(_streams(first_stream, parts), bounds, bounds[1:], strict=False):
        with mx.stream(stream) if stream is not None else nullcontext():
            if wide:
                # Dequantized only once `x` is there: else MLX may dequantize every piece of a prompt (`in_order`)
                # ahead of time, and hold all those float32 copies at once.
                outputs.append(x @ dequantized(layer, start, end, after=x).T)
                continue
            outputs.append(mx.quantized_matmul(
                x, layer["weight"][start:end], layer["scales"][start:end],
                None if biases is None else biases[start:end],
                transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
            ))
    return outputs[0] if parts == 1 else mx.concatenate(outputs, axis=-1)


def dequantized(layer: nn.Module, start: int = 0, end: int | None = None, after: mx.array | None = None) -> mx.array:
    """Rows `start:end` of a quantized layer's weight, in float32. Its scales and biases are made float32 first:
    `mx.dequantize` computes in their dtype, and half precision would round every weight (the quantized matmul,
    given float32 inputs, computes in float32). With `after`, not before that array is computed."""
    biases = layer.get("biases")
    weight = layer["weight"][start:end]
    weight = weight if after is None else mx.depends(weight, after)
    return mx.dequantize(weight, layer["scales"][start:end].astype(mx.float32),
                         None if biases is None else biases[start:end].astype(mx.float32),
                         group_size=layer.group_size, bits=layer.bits, mode=layer.mode, dtype=mx.float32)


class SplitQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear (same parameters, same results) whose matmul runs on `parts` streams from `first_stream`."""

    first_stream = 0
    parts = 1
    wide_rows: int | None = None

    def __call__(self, x: mx.array) -> mx.array:
        x = split_quantized_matmul(x, self, self.first_stream, self.parts, self.wide_rows)
        if "bias" in self:
            x = x + self["bias"]
        return x


class SplitQuantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose use as the output projection (tied embeddings) runs on `parts` streams."""

    first_stream = 0
    parts = 1
    wide_rows: int | None = None

    def as_linear(self, x: mx.array) -> mx.array:
        return split_quantized_matmul(x, self, self.first_stream, self.parts, self.wide_rows)


def _split(module: nn.Module, first_stream: int, parts: int, wide_rows: int | None) -> None:
    if isinstance(module, nn.QuantizedLinear):
        module.__class__ = SplitQuantizedLinear
    elif isinstance(module, nn.QuantizedEmbedding):
        module.__class__ = SplitQuantizedEmbedding
    else:
        return
    module.first_stream, module.parts, module.wide_rows = first_stream, parts, wide_rows


def dequantize_weights(model: nn.Module) -> None:
    """Replace each quantized Linear and Embedding of `model` by a float32 one holding its dequantized weight, one
    layer at a time (each evaluated before the next: the peak is the float32 weights plus the quantized ones)."""
    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, SplitQuantizedLinear, SplitQuantizedEmbedding)
    for path, module in [(p, m) for p, m in model.named_modules() if type(m) in kinds]:
        weight = dequantized(module)
        mx.eval(weight)
        if isinstance(module, nn.QuantizedEmbedding):
            # Its lookups are then float32 where the quantized one's came in the scales' dtype: the same up to
            # half-precision rounding.
            replacement: nn.Module = nn.Embedding(*weight.shape)
        else:
            replacement = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                replacement.bias = module["bias"]
        replacement.weight = weight
        model.update_modules(tree_unflatten([(path, replacement)]))


def prepare_for_cpu(model: nn.Module, streams: int | None = None, weights: str = "quantized",
                    wide_rows: int | None = None) -> None:
    """Set up a quantized Qwen2 (in place) to run fast on MLX's CPU backend.

    `weights="quantized"`: in no more memory than as stored. Quantized layers keep their scales and biases as
    stored; large quantized matmuls are split across `streams` streams (default: `cpu_streams()`), and a step over
    more than `wide_rows` rows (None: never) multiplies in float32 (`split_quantized_matmul`), with OpenBLAS on one
    thread per stream. `weights="float"`: every quantized weight dequantized to float32 and held so, its matmuls
    the BLAS's own, on as many BLAS threads as streams.

    Either way the few other half-precision tensors (norms, the q/k/v biases, any layer left unquantized) become
    float32, since the CPU kernels are slow on half precision and they are small; activations are float32, the KV
    cache keeps the stored dtype, and long prompts go through attention and MLP `PREFILL_CHUNK` tokens at a time.
    """
    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    stored = {m.scales.dtype for _, m in model.named_modules() if isinstance(m, kinds)}
    streams = cpu_streams() if streams is None else streams
    if weights == "float":
        dequantize_weights(model)
        set_threads(streams)
    _upcast_small_tensors(model)
    for layer in model.layers:
        layer.self_attn.prefill_chunk = layer.mlp.prefill_chunk = PREFILL_CHUNK
    if stored & set(HALF):
        model.model.compute_dtype = mx.float32
        kv_dtype = next(iter(stored)) if len(stored) == 1 else mx.float32
        for layer in model.layers:
            layer.self_attn.kv_dtype = kv_dtype
    if weights == "quantized":
        _split_across_streams(model, streams, wide_rows)
    mx.eval(model.parameters())


def _upcast_small_tensors(model: nn.Module) -> None:
    """Every half-precision parameter but a quantized layer's scales and biases, in float32."""
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


def _split_across_streams(model: nn.Module, streams: int, wide_rows: int | None) -> None:
    if streams >= 2:
        _streams(0, streams)
        if wide_rows is not None:
            # The float32 steps run one matmul per stream, side by side: OpenBLAS's own threads would fight them.
            set_threads(1)
        for layer in model.layers:
            # The MLP's gate and up projections are the widest outputs (4864 columns for 0.5B): rather than split
            # each and copy the parts together, run them side by side whole, half the streams each.
            _split(layer.mlp.gate_proj, 0, streams // 2, wide_rows)
            _split(layer.mlp.up_proj, streams // 2, streams - streams // 2, wide_rows)
    for _, module in model.named_modules():
        if "scales" in module and module.__class__ in (nn.QuantizedLinear, nn.QuantizedEmbedding):
            parts = max(1, min(streams, module["weight"].shape[0] // MIN_ROWS_PER_PART))
            if parts >= 2 or wide_rows is not None:
                _split(module, 0, parts, wide_rows)
