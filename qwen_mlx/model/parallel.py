"""One model over several processes (`mlx.launch`), on MLX's own transports (`mx.distributed`: ring, JACCL, MPI).

- Tensor parallel: every block is split across the ranks. q/k/v/gate/up keep whole attention heads (and KV heads)
  or MLP columns by output rows; o/down keep the matching input columns, and one `all_sum` per layer adds up
  their partial outputs (as `mlx.nn.layers.distributed`'s sharded linears do). Quantized layers split along whole
  groups. Best over fast links: two sums per layer per step.
- Pipeline parallel: each rank runs a contiguous stage of blocks and `send`s the hidden state to the next; one
  message per stage per step, for links too slow for a sum per layer (ring over Ethernet).

In both, the embedding and the output projection are split by vocabulary rows: a rank looks up the ids in its
rows (one `all_sum` puts the embedding together) and computes the logits of its rows (one `all_gather` puts
them together). So every rank holds about 1/N of the weights, replicated norms aside, and every rank ends a step
with the same full logits: they sample the same token and stay in step (`lockstep`).

A rank reads only its slices from the safetensors files (`weights.read_tensor`), never the whole tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import LayerCache
from qwen_mlx.model.config import ModelConfig

MODES = ("tensor", "pipeline")

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Stored tensors split by output rows (axis 0) and by input columns (the last axis) in tensor parallel.
BY_ROWS = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "mlp.gate_proj.", "mlp.up_proj.")
BY_COLUMNS = ("self_attn.o_proj.", "mlp.down_proj.")
VOCAB_TABLES = ("model.embed_tokens.", "lm_head.")


@dataclass(frozen=True)
class Parallel:
    """How this process shares a model: `mode` over `group`, as rank `rank` of `size`."""

    mode: str
    group: mx.distributed.Group

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def leads(self) -> bool:
        """Rank 0 owns the tokenizer's input and output, HTTP and the UI; the others follow its steps."""
        return self.rank == 0


def start_group(mode: str | None) -> Parallel | None:
    """This process's group under `mlx.launch` (None when it runs alone and no mode is asked for).

    Several processes with no mode run tensor parallel, as mlx-lm's do.
    """
    if mode is not None and mode not in MODES:
        raise QwenMLXError(f"--parallel {mode!r}: choose one of {', '.join(MODES)}")
    group = mx.distributed.init()
    if group.size() == 1:
        if mode is not None:
            raise QwenMLXError(f"--parallel {mode} needs several processes: start the command with mlx.launch, e.g. "
                               f"`mlx.launch --hosts mac1,mac2 -- qwen-mlx ... --parallel {mode}` (see the README)")
        return None
    return Parallel(mode or "tensor", group)


def check_shardable(config: ModelConfig, parallel: Parallel) -> None:
    """A one-line error when the model cannot be split over this group."""
    n = parallel.size
    if parallel.mode == "pipeline":
        if config.num_hidden_layers < n:
            raise QwenMLXError(f"cannot split {config.num_hidden_layers} layers into {n} pipeline stages: use at most "
                               f"{config.num_hidden_layers} processes")
        return
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % n or kv_heads % n:
        raise QwenMLXError(f"cannot split {heads} attention heads and {kv_heads} KV heads evenly over {n} processes: "
                           f"use a number of processes that divides {kv_heads}, or --parallel pipeline")
    if config.intermediate_size % n:
        raise QwenMLXError(f"cannot split the MLP's {config.intermediate_size} columns evenly over {n} processes; "
                           "use --parallel pipeline")


def stage_layers(num_layers: int, parallel: Parallel) -> range:
    """The contiguous blocks rank r runs in pipeline parallel: the first ranks take one more when they do not
    divide evenly (rank 0 also embeds and samples first, so it is no busier than the rest)."""
    base, extra = divmod(num_layers, parallel.size)
    start = parallel.rank * base + min(parallel.rank, extra)
    return range(start, start + base + (parallel.rank < extra))


@dataclass(frozen=True)
class Part:
    """The slice of a stored tensor a rank keeps: `[start, stop)` along `axis`, padded with zero rows to `length`
    (vocabulary tables, so every rank's slice has one shape), under the model's name `name`."""

    name: str
    axis: int | None = None  # None: the whole tensor
    start: int = 0
    stop: int = 0
    length: int = 0


def weight_part(name: str, shape: tuple[int, ...], config: ModelConfig, parallel: Parallel) -> Part | None:
    """What of stored tensor `name` (of `shape`) this rank keeps; None: nothing (another stage's layer)."""
    n, r = parallel.size, parallel.rank
    if name.startswith(VOCAB_TABLES):
        rows = -(-shape[0] // n)
        return Part(name, 0, min(r * rows, shape[0]), min((r + 1) * rows, shape[0]), rows)
    layer = LAYER.match(name)
    if layer is None:
        return Part(name)  # the final norm
    index, rest = int(layer.group(1)), layer.group(2)
    if parallel.mode == "pipeline":
        stage = stage_layers(config.num_hidden_layers, parallel)
        return Part(f"model.layers.{index - stage.start}.{rest}") if index in stage else None
    axis = 0 if rest.startswith(BY_ROWS) else -1 if rest.startswith(BY_COLUMNS) else None
    if axis is None:
        return Part(name)  # norms
    if rest.endswith(".bias") and axis == -1:
        return Part(name)
    size = shape[axis]
    if size % n:
        raise QwenMLXError(f"{name}: {size} {'rows' if axis == 0 else 'columns'} do not split evenly over {n} "
                           "processes (a quantized layer splits along whole groups); use --parallel pipeline")
    return Part(name, axis, r * size // n, (r + 1) * size // n, size // n)


def shard_model(model: nn.Module, parallel: Parallel) -> None:
    """Reshape a Qwen2 (before its weights are loaded) into this rank's part: its heads and sums, or its stage;
    its vocabulary rows."""
    config: ModelConfig = model.config
    if parallel.mode == "tensor":
        for layer in model.layers:
            layer.self_attn.n_heads //= parallel.size
            layer.self_attn.n_kv_heads //= parallel.size
            layer.self_attn.group = layer.mlp.group = parallel.group
    else:
        stage = stage_layers(config.num_hidden_layers, parallel)
        model.model.layers = model.model.layers[stage.start:stage.stop]
        model.model.stage = Stage(parallel.group)
    rows = -(-config.vocab_size // parallel.size)
    start = min(parallel.rank * rows, config.vocab_size)
    tables = [model.model.embed_tokens] + ([] if config.tie_word_embeddings else [model.lm_head])
    for table in tables:
        table.__class__ = VOCAB_CLASSES[table.__class__]
        table.group, table.start, table.vocab_size = parallel.group, start, config.vocab_size
        table.rows = min(start + rows, config.vocab_size) - start


class Stage:
    """A pipeline stage's messages: the hidden state in from the previous rank, out to the next, and the last
    stage's output shared with every rank (each computes its vocabulary rows of the logits from it)."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()

    def receive(self, h: mx.array) -> mx.array:
        if self.rank == 0:
            return h
        # The embedding `h` is not used here, but its all_sum must still run on this rank (the others wait for it).
        return mx.depends(mx.distributed.recv_like(h, self.rank - 1, group=self.group), h)

    def pass_on(self, h: mx.array, cache: LayerCache | None) -> mx.array:
        if self.rank < self.size - 1:
            h = mx.distributed.send(h, self.rank + 1, group=self.group)
            if cache is not None and hasattr(cache, "keys"):
                # A prompt chunk evaluates only the caches (no logits): through this stage's last cache, that
                # evaluation sends too, or the next stage would wait for it (as in mlx-lm's pipeline).
                keys = cache.keys
                cache.keys = tuple(mx.depends(list(keys), [h])) if isinstance(keys, tuple) else mx.depends(keys, h)
        # The sent array stands in for each earlier stage's part, so the send runs before the gather needs it.
        everyone = mx.distributed.all_gather(h, group=self.group)
        return everyone[(self.size - 1) * h.shape[0]:]


class VocabRows:
    """A vocabulary table's rows [start, start + rows) on this rank, zero-padded so every rank's has one shape.

    Mixed into nn.Embedding / nn.QuantizedEmbedding / nn.Linear / nn.QuantizedLinear by `shard_model`, so the
    parameters keep their names and their quantized kernels.
    """

    group: mx.distributed.Group
    start: int = 0
    rows: int = 0
    vocab_size: int = 0

    if TYPE_CHECKING:
        # What the layer this is mixed into provides (the `super()` calls below reach it through the MRO).
        def __call__(self, x: mx.array) -> mx.array: ...

        def as_linear(self, x: mx.array) -> mx.array: ...

    def gather_vocab(self, part: mx.array) -> mx.array:
        """(..., rows of this rank) → (..., vocab): all_gather joins along the first axis, so the vocab goes there."""
        everyone = mx.distributed.all_gather(mx.moveaxis(part, -1, 0), group=self.group)
        return mx.moveaxis(everyone[: self.vocab_size], 0, -1)


class VocabEmbedding(VocabRows):
    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.start
        here = (local >= 0) & (local < self.rows)
        h = super().__call__(mx.where(here, local, 0))
        return mx.distributed.all_sum(mx.where(here[..., None], h, mx.zeros((), h.dtype)), group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.gather_vocab(super().as_linear(x))


class VocabHead(VocabRows):
    def __call__(self, x: mx.array) -> mx.array:
        return self.gather_vocab(super().__call__(x))


class ShardedEmbedding(VocabEmbedding, nn.Embedding):
    pass


class ShardedQuantizedEmbedding(VocabEmbedding, nn.QuantizedEmbedding):
    pass


class ShardedHead(VocabHead, nn.Linear):
    pass


class ShardedQuantizedHead(VocabHead, nn.QuantizedLinear):
    pass


VOCAB_CLASSES: dict[type, type] = {
    nn.Embedding: ShardedEmbedding,
    nn.QuantizedEmbedding: ShardedQuantizedEmbedding,
    nn.Linear: ShardedHead,
    nn.QuantizedLinear: ShardedQuantizedHead,
}
