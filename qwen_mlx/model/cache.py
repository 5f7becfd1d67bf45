"""KV caches: preallocated (KVCache), quantized (QuantizedKVCache), bounded (RotatingKVCache), their settings
(CacheSettings), several sequences decoded together (RowsCache), and prompt-prefix reuse (PromptCache)."""

from __future__ import annotations

import hashlib
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import replaced_atomically

Mask = mx.array | str | None


def causal_mask(length: int, offset: int, window: int | None = None) -> mx.array:
    """Boolean (length, offset + length) mask: query i sees key j iff j <= i (and i - j < window)."""
    keys = mx.arange(offset + length)[None]
    queries = mx.arange(offset, offset + length)[:, None]
    mask = queries >= keys
    if window is not None:
        mask = mask & (queries < keys + window)
    return mask


class BaseCache(ABC):
    """The interface every cache kind implements (mlx-lm's `_BaseCache`), so the model and the generation loop
    never ask which kind they hold: positions so far (`offset`), `update_and_fetch`, `make_mask`, rewinding
    (`trim`, `is_trimmable`), saving (`state` / `from_state`), size (`nbytes`) and a fresh copy (`empty`)."""

    offset: int
    # YaRN on demand: the keys were rotated with the long RoPE (see `PromptCache.fit_rope`); a new cache is plain.
    rope_scaled: bool = False

    @abstractmethod
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """Store the new positions' keys and values; return every position the next attention sees."""

    def wants_long_rope(self, positions: int, switch: int) -> bool:
        """Whether a sequence of `positions` kept here needs YaRN on demand's long RoPE: once it holds more than
        the original context of `switch` positions."""
        return positions > switch

    @abstractmethod
    def make_mask(self, length: int) -> Mask:
        """The attention mask for `length` new positions: None, the fused kernel's "causal", or an array."""

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (the next ones overwrite them); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @abstractmethod
    def state(self) -> tuple[dict[str, mx.array], dict[str, int]]:
        """Arrays and integer settings that `from_state` rebuilds the cache from (`save_prompt_cache`)."""

    @classmethod
    @abstractmethod
    def from_state(cls, arrays: dict[str, mx.array], meta: dict[str, int]) -> BaseCache: ...

    @abstractmethod
    def empty(self) -> BaseCache:
        """A new, empty cache of the same kind and settings."""


def with_room(buffer: mx.array | None, used: int, new: mx.array, step: int) -> mx.array:
    """`buffer` (batch, heads, positions, dim) with room for `new` after its first `used` positions, grown by
    whole `step`s: decoding then writes into the slack instead of concatenating, so a token costs no copy."""
    if buffer is not None and used + new.shape[2] <= buffer.shape[2]:
        return buffer
    B, heads, length, dim = new.shape
    room = mx.zeros((B, heads, (length + step - 1) // step * step, dim), new.dtype)
    return room if buffer is None else mx.concatenate([buffer[..., :used, :], room], axis=2)


class KVCache(BaseCache):
    """Keys and values of every position so far, in a buffer that grows `step` positions at a time."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        self.keys = with_room(self.keys, prev, keys, self.step)
        self.values = with_room(self.values, prev, values, self.step)
        self.offset += keys.shape[2]
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_mask(self, length: int) -> Mask:
        # The fused kernel's "causal" aligns the queries with the last keys, so the offset needs no mask.
        return "causal" if length > 1 else None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None or self.values is None else self.keys.nbytes + self.values.nbytes

    def state(self) -> tuple[dict[str, mx.array], dict[str, int]]:
        if self.keys is None or self.values is None:
            return {}, {"offset": 0}
        return {
            "keys": self.keys[..., : self.offset, :],
            "values": self.values[..., : self.offset, :],
        }, {"offset": self.offset}

    @classmethod
    def from_state(cls, arrays: dict[str, mx.array], meta: dict[str, int]) -> KVCache:
        cache = cls()
        cache.keys, cache.values = arrays.get("keys"), arrays.get("values")
        cache.offset = meta["offset"]
        return cache

    def empty(self) -> KVCache:
        return KVCache()


class QuantizedKVCache(BaseCache):
    """A KVCache whose keys and values are stored as `bits`-bit affine groups (`mx.quantize`), as mlx-lm's
    QuantizedKVCache: at 4 bits a long context takes a quarter of the float16 memory. Attention then runs on the
    quantized tensors directly (`attention.quantized_attention`)."""

    step = 256

    def __init__(self, group_size: int = 64, bits: int = 8) -> None:
        if bits not in (4, 8):
            raise QwenMLXError(f"kv_bits {bits} is not supported; use 4 or 8", "kv_bits")
        self.group_size = group_size
        self.bits = bits
        # (packed codes, scales, biases) each; None until the first positions arrive
        self.keys: tuple[mx.array, ...] | None = None
        self.values: tuple[mx.array, ...] | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[tuple[mx.array, ...], tuple[mx.array, ...]]:
        if keys.shape[-1] % self.group_size:
            raise QwenMLXError(
                f"kv_group_size {self.group_size} does not divide the head size {keys.shape[-1]}; try 32 or 64",
                "kv_group_size",
            )
        prev = self.offset
        self.offset += keys.shape[2]
        stored = []
        for buffers, new in ((self.keys, keys), (self.values, values)):
            parts = mx.quantize(new, group_size=self.group_size, bits=self.bits)
            grown = tuple(with_room(b, prev, p, self.step) for b, p in zip(buffers or (None,) * 3, parts, strict=True))
            for buffer, part in zip(grown, parts, strict=True):
                buffer[..., prev : self.offset, :] = part
            stored.append(grown)
        self.keys, self.values = stored
        return (
            tuple(k[..., : self.offset, :] for k in self.keys),
            tuple(v[..., : self.offset, :] for v in self.values),
        )

    def make_mask(self, length: int) -> Mask:
        # The quantized attention has no fused causal mode: spell the mask out.
        return causal_mask(length, self.offset) if length > 1 else None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None or self.values is None else sum(a.nbytes for a in (*self.keys, *self.values))

    def state(self) -> tuple[dict[str, mx.array], dict[str, int]]:
        meta = {"offset": self.offset, "group_size": self.group_size, "bits": self.bits}
        if self.keys is None or self.values is None:
            return {}, meta
        arrays = {f"keys.{i}": a[..., : self.offset, :] for i, a in enumerate(self.keys)}
        arrays.update({f"values.{i}": a[..., : self.offset, :] for i, a in enumerate(self.values)})
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, mx.array], meta: dict[str, int]) -> QuantizedKVCache:
        cache = cls(meta["group_size"], meta["bits"])
        if arrays:
            cache.keys = tuple(arrays[f"keys.{i}"] for i in range(3))
            cache.values = tuple(arrays[f"values.{i}"] for i in range(3))
        cache.offset = meta["offset"]
        return cache

    def empty(self) -> QuantizedKVCache:
        return QuantizedKVCache(self.group_size, self.bits)


class RotatingKVCache(BaseCache):
    """At most `max_size` positions: the first `keep` (attention sinks) stay forever, the rest is a ring buffer.

    The semantics are mlx-lm's RotatingKVCache, so the two attend to the same positions at every step:
    - one token at a time, it writes in place and wraps around after the sinks;
    - a chunk of several tokens (prefill, a follow-up turn) is appended after the cache is put back in temporal
      order and cut to its last max_size - 1 positions, so that every new position sees max_size keys under a
      sliding-window mask; the next single-token step trims the buffer back to max_size.
    """

    step = 256

    def __init__(self, max_size: int, keep: int = 4) -> None:
        if max_size <= keep:
            raise QwenMLXError(f"max_kv_size {max_size} must be larger than keep={keep}", "max_kv_size")
        self.max_size = max_size
        self.keep = keep
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self._idx = 0  # where the next position is written

    def _evict(self, v: mx.array, n: int) -> mx.array:
        """Drop the n oldest positions after the sinks."""
        if n <= 0:
            return v
        return mx.concatenate([v[..., : self.keep, :], v[..., n + self.keep :, :]], axis=2)

    def _temporal_order(self, v: mx.array) -> mx.array:
        if self._idx == v.shape[2]:
            return v
        if self._idx < self.offset:  # wrapped: sinks, then oldest (from _idx), then newest (up to _idx)
            return mx.concatenate(
                [v[..., : self.keep, :], v[..., self._idx :, :], v[..., self.keep : self._idx, :]], axis=2
            )
        return v[..., : self._idx, :]

    def _append_chunk(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            ordered_k, ordered_v = self._temporal_order(self.keys), self._temporal_order(self.values)
            excess = ordered_k.shape[2] - self.max_size + 1
            self.keys = mx.concatenate([self._evict(ordered_k, excess), keys], axis=2)
            self.values = mx.concatenate([self._evict(ordered_v, excess), values], axis=2)
        self.offset += keys.shape[2]
        self._idx = self.keys.shape[2]
        return self.keys, self.values

    def _append_one(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        if self.keys is None or self.values is None or (
                prev >= self.keys.shape[2] and self.keys.shape[2] < self.max_size):
            B, heads, _, dim = keys.shape
            size = min(self.step, self.max_size - prev)
            grow_k = mx.zeros((B, heads, size, dim), keys.dtype)
            grow_v = mx.zeros((B, heads, size, values.shape[3]), values.dtype)
            if self.keys is None or self.values is None:
                self.keys, self.values = grow_k, grow_v
            else:
                self.keys = mx.concatenate([self.keys, grow_k], axis=2)
                self.values = mx.concatenate([self.values, grow_v], axis=2)
            self._idx = prev
        excess = self.keys.shape[2] - self.max_size
        if excess > 0:  # left over from a chunk: back to max_size, in temporal order
            self.keys, self.values = self._evict(self.keys, excess), self._evict(self.values, excess)
            self._idx = self.max_size
        if self._idx == self.max_size:
            self._idx = self.keep
        self.keys[..., self._idx : self._idx + 1, :] = keys
        self.values[..., self._idx : self._idx + 1, :] = values
        self.offset += 1
        self._idx += 1
        if self.offset < self.keys.shape[2]:
            return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        return self.keys, self.values

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[2] == 1:
            return self._append_one(keys, values)
        return self._append_chunk(keys, values)

    def make_mask(self, length: int) -> Mask:
        if length == 1:
            return None  # one query sees every key the buffer holds, in whatever order
        offset = min(self.max_size - 1, self.offset)
        if offset + length > self.max_size:
            return causal_mask(length, offset, window=self.max_size)
        return "causal"

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def wants_long_rope(self, positions: int, switch: int) -> bool:
        # A window no wider than the original context never puts two positions further apart than pretraining
        # did: plain RoPE stays in distribution however far the positions count (and evicted tokens could not be
        # re-encoded anyway).
        return self.max_size > switch and positions > switch

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self._idx -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None or self.values is None else self.keys.nbytes + self.values.nbytes

    def state(self) -> tuple[dict[str, mx.array], dict[str, int]]:
        meta = {"offset": self.offset, "idx": self._idx, "max_size": self.max_size, "keep": self.keep}
        if self.keys is None or self.values is None:
            return {}, meta
        return {"keys": self.keys, "values": self.values}, meta

    @classmethod
    def from_state(cls, arrays: dict[str, mx.array], meta: dict[str, int]) -> RotatingKVCache:
        cache = cls(meta["max_size"], meta["keep"])
        cache.keys, cache.values = arrays.get("keys"), arrays.get("values")
        cache.offset, cache._idx = meta["offset"], meta["idx"]
        return cache

    def empty(self) -> RotatingKVCache:
        return RotatingKVCache(self.max_size, self.keep)


CACHE_KINDS: dict[str, type[BaseCache]] = {c.__name__: c for c in (KVCache, QuantizedKVCache, RotatingKVCache)}


@dataclass(frozen=True)
class CacheSettings:
    """How a sequence's KV cache is kept: unbounded (the default), rotating over `max_kv_size` positions with the
    first `keep` always kept, or quantized to `kv_bits` (4 or 8) in groups of `kv_group_size`."""

    max_kv_size: int | None = None
    keep: int = 4
    kv_bits: int | None = None
    kv_group_size: int = 64

    def __post_init__(self) -> None:
        if self.max_kv_size is not None and self.kv_bits is not None:
            raise QwenMLXError("choose either a rotating cache (max_kv_size, --max-kv-size) or a quantized one "
                               "(kv_bits, --kv-bits), not both", "max_kv_size")
        if self.max_kv_size is not None and self.max_kv_size <= self.keep:
            raise QwenMLXError(f"max_kv_size (--max-kv-size) {self.max_kv_size} must be larger than {self.keep}, "
                               "the first positions it always keeps", "max_kv_size")
        if self.kv_bits is not None and self.kv_bits not in (4, 8):
            raise QwenMLXError(f"kv_bits {self.kv_bits} is not supported; use 4 or 8", "kv_bits")
        if self.kv_group_size not in (32, 64, 128):
            raise QwenMLXError(f"kv_group_size {self.kv_group_size} is not supported; use 32, 64 or 128",
                               "kv_group_size")

    @property
    def rotating(self) -> bool:
        return self.max_kv_size is not None

    def check_head_size(self, head_dim: int) -> None:
        """Refuse, before any request, a quantized cache that cannot hold a model of `head_dim` values a head:
        `mx.quantize` packs each head's values in `kv_group_size` groups, so every step would fail."""
        if self.kv_bits is not None and head_dim % self.kv_group_size:
            raise QwenMLXError(f"--kv-bits {self.kv_bits} (kv_bits={self.kv_bits}) cannot store this model's KV cache: "
                               f"its head size {head_dim} is not a multiple of the {self.kv_group_size}-value groups "
                               "it quantizes (kv_group_size); leave --kv-bits out for this model", "kv_bits")

    def layer_cache(self) -> BaseCache:
        if self.kv_bits is not None:
            return QuantizedKVCache(self.kv_group_size, self.kv_bits)
        if self.max_kv_size is not None:
            return RotatingKVCache(self.max_kv_size, self.keep)
        return KVCache()


def make_cache(model: nn.Module, settings: CacheSettings | None = None) -> list[BaseCache]:
    """One cache per layer of `model`, as `settings` say (default: preallocated and unbounded)."""
    settings = settings or CacheSettings()
    return [settings.layer_cache() for _ in model.layers]


class RowsCache:
    """One layer's caches of several sequences that decode a token each in the same forward pass.

    Each sequence keeps its own cache (of any kind, its own length), so nothing is padded or copied when
    sequences join or leave: the projections and the MLP run batched, attention runs per row on that row's keys
    (`attention.scaled_dot_product_attention` takes the lists this returns).
    """

    def __init__(self, rows: list[BaseCache]):
        self.rows = rows

    @property
    def offset(self) -> mx.array:
        return mx.array([row.offset for row in self.rows])

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """Each row's new position into its own cache; every row's keys, and every row's values, as lists."""
        fetched = [row.update_and_fetch(keys[i : i + 1], values[i : i + 1]) for i, row in enumerate(self.rows)]
        return [k for k, _ in fetched], [v for _, v in fetched]

    def make_mask(self, length: int) -> Mask:
        if length != 1:
            raise ValueError("sequences decoded together take one token each per step")
        return None


# What a layer's attention gets as its cache: where the new positions start (an int, or one per sequence),
# somewhere to put their keys and values, and the mask they need.
LayerCache = BaseCache | RowsCache


def settle_rope(caches: Sequence[LayerCache], length: int, switch: int) -> None:
    """Before `length` new positions go into `caches` (one per layer) of a model with YaRN on demand: a new cache
    that they take past the original context (`switch` positions) starts with the long RoPE, as a static-YaRN run
    would; a cache already holding plain-RoPE positions cannot be taken past it here (`PromptCache.fit_rope`
    re-encodes it first, from the tokens it keeps)."""
    rows = caches[0].rows if isinstance(caches[0], RowsCache) else [caches[0]]
    for i, row in enumerate(rows):
        if row.rope_scaled or not row.wants_long_rope(row.offset + length, switch):
            continue
        if row.offset:
            raise ValueError(f"this cache holds {row.offset} positions under plain RoPE and {length} more take it "
                             f"past the original context ({switch}): re-encode it first (PromptCache.fit_rope)")
        for layer in caches:
            (layer.rows[i] if isinstance(layer, RowsCache) else layer).rope_scaled = True


def longest_common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share. Slices compare in C: a 32K-token conversation takes microseconds,
    where a Python loop over it would take milliseconds every turn."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n - 1  # a[:low] == b[:low], a[:high + 1] != b[:high + 1]
    while low < high:
        mid = (low + high + 1) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class PromptCache:
    """A model's per-layer caches together with the token ids they hold, so a new prompt that starts the same
    way (the next chat turn, a regenerate, an edited message) prefills only what is new."""

    caches: list[BaseCache]
    tokens: list[int] = field(default_factory=list)
    draft: PromptCache | None = None  # a draft model's own cache for the same conversation (speculative decoding)

    @classmethod
    def new(cls, model: nn.Module, settings: CacheSettings | None = None) -> PromptCache:
        return cls(make_cache(model, settings))

    @property
    def offset(self) -> int:
        return self.caches[0].offset if self.caches else 0

    @property
    def rope_scaled(self) -> bool:
        return bool(self.caches) and self.caches[0].rope_scaled

    def fit_rope(self, switch: int | None, todo: list[int], ahead: int = 0) -> list[int]:
        """YaRN on demand: what to prefill for `todo` (what `reuse` left) with `ahead` more positions to follow.

        `switch` is the model's original context (`ModelConfig.yarn_switch`; None: one RoPE, nothing to do). A
        sequence that fits it runs plain RoPE, one that outgrows it runs YaRN over every position, as a
        static-YaRN run would. Since the long RoPE changes every layer's hidden states, keys and values of other
        layers cannot be rotated over: when the sequence's length calls for the other RoPE than the caches hold,
        they are emptied and switched, and the tokens they held come first in what is returned, to be computed
        again (one re-encode of the context, once per conversation).
        """
        if switch is None or not self.caches:
            return todo
        scaled = self.caches[0].wants_long_rope(self.offset + len(todo) + ahead, switch)
        if scaled == self.rope_scaled:
            return todo
        held, self.tokens = self.tokens, []
        self.caches = [c.empty() for c in self.caches]
        for c in self.caches:
            c.rope_scaled = scaled
        return held + todo

    def plain_room(self, switch: int | None) -> int | None:
        """Positions this cache may still take under plain RoPE before YaRN on demand needs the re-encode; None:
        no switch ahead."""
        if switch is None or not self.caches or self.rope_scaled:
            return None
        if not self.caches[0].wants_long_rope(switch + 1, switch):
            return None
        return switch - self.offset

    def is_trimmable(self) -> bool:
        return all(c.is_trimmable() for c in self.caches)

    def trim(self, n: int) -> None:
        """Forget the last `n` positions (rejected draft tokens, a reply cut short)."""
        for c in self.caches:
            c.trim(n)
        del self.tokens[len(self.tokens) - n :]

    def run_chunk(self, model: nn.Module, tokens: list[int]) -> list[mx.array]:
        """Run `tokens` through `model` into these caches (nothing evaluated yet); the arrays to evaluate."""
        model(mx.array(tokens)[None], cache=self.caches)
        self.tokens += tokens
        return [a for c in self.caches for a in c.state()[0].values()]

    def prefill(self, model: nn.Module, tokens: list[int], step_size: int = 512,
                cancel: threading.Event | None = None,
                on_progress: Callable[[int, int], None] | None = None) -> bool:
        """Run `tokens` through `model` into these caches, `step_size` at a time so activations stay bounded;
        `on_progress(done, total)` hears of each chunk.

        Returns False if `cancel` was set between two chunks (a long prompt can take minutes on a CPU); the caches
        then hold the chunks done so far, and `tokens` says which.
        """
        for start in range(0, len(tokens), step_size):
            if cancel is not None and cancel.is_set():
                return False
            mx.eval(self.run_chunk(model, tokens[start : start + step_size]))
            if on_progress is not None:
                on_progress(min(start + step_size, len(tokens)), len(tokens))
        return True

    def reuse(self, prompt: list[int]) -> list[int]:
        """Trim the caches back to the longest prefix they share with `prompt`; return the tokens to prefill.

        At least one token is always left to prefill, since its logits pick the first reply token.
        """
        common = min(longest_common_prefix(self.tokens, prompt), len(prompt) - 1)
        stale = len(self.tokens) - common
        if stale > 0:
            if self.is_trimmable():
                self.trim(stale)
            else:
                # A rotating cache past its window has evicted positions; it cannot be rewound, only rebuilt.
                self.caches = [c.empty() for c in self.caches]
                common = 0
        self.tokens = list(prompt[:common])
        return list(prompt[common:])

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


def save_prompt_cache(path: str | Path, prompt_cache: PromptCache, metadata: dict[str, str] | None = None) -> None:
    """Write the caches and their token ids to one safetensors file, atomically (temp file, then rename)."""
    path = Path(path)
    if path.is_dir():
        raise QwenMLXError(f"{path}: is a folder; give the prompt cache a file name, e.g. "
                           f"{path / 'prompt.safetensors'}")
    if not path.parent.is_dir():
        raise QwenMLXError(f"{path.parent}: no such folder; create it first or write the cache elsewhere")
    arrays: dict[str, mx.array] = {}
    layers = []
    for i, cache in enumerate(prompt_cache.caches):
        state, meta = cache.state()
        arrays.update({f"layers.{i}.{name}": a for name, a in state.items()})
        layers.append({"type": type(cache).__name__, **meta, "rope_scaled": int(cache.rope_scaled)})
    header = {
        "format": "qwen-mlx-prompt-cache",
        "layers": json.dumps(layers),
        "tokens": json.dumps(prompt_cache.tokens),
        "metadata": json.dumps(metadata or {}),
    }
    header["checksum"] = cache_checksum(arrays, header["layers"], header["tokens"])
    try:
        # mx.save_safetensors appends ".safetensors" to a name without it: give the temporary file that suffix.
        with replaced_atomically(path, suffix=".safetensors") as tmp:
            mx.save_safetensors(str(tmp), arrays, header)
    except (OSError, RuntimeError) as e:  # a full disk, a read-only folder (MLX reports write errors as these)
        raise QwenMLXError(f"{path}: cannot write the prompt cache ({e}); nothing was written") from None


def cache_checksum(arrays: dict[str, mx.array], layers: str, tokens: str) -> str:
    """blake2b of what a prompt-cache file holds: its layers' settings, its token ids, and each array's name, dtype,
    shape and bytes (row-major), so zeroed pages or flipped bits are refused instead of computed on."""
    digest = hashlib.blake2b(f"{layers}\n{tokens}\n".encode(), digest_size=16)
    for name in sorted(arrays):
        array = mx.contiguous(arrays[name])  # a slice of a preallocated buffer has no row-major bytes of its own
        mx.eval(array)
        digest.update(f"{name}:{array.dtype}:{array.shape}\n".encode())
        digest.update(memoryview(array))  # type: ignore[arg-type]  # mx.array has the buffer protocol, not its stub
    return digest.hexdigest()


def load_prompt_cache(path: str | Path) -> tuple[PromptCache, dict[str, str]]:
    """Read a file written by `save_prompt_cache`: the PromptCache and the metadata saved with it. Anything else
    (another safetensors file, a damaged or hand-edited cache) is a one-line error naming the file."""
    try:
        # Named format: mx.load goes by the extension otherwise, and save_prompt_cache accepts any file name.
        loaded = mx.load(str(path), format="safetensors", return_metadata=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise QwenMLXError(f"{path}: cannot read the prompt cache ({e})") from None
    # mx.load's stub gives one return type for all its modes; with return_metadata it is (arrays, metadata).
    arrays, header = cast(tuple[dict[str, mx.array], dict[str, str]], loaded)
    if header.get("format") != "qwen-mlx-prompt-cache":
        raise QwenMLXError(f"{path}: not a qwen-mlx prompt cache (write one with `qwen-mlx cache-prompt`)")
    try:
        layers, tokens, metadata = (json.loads(header[k]) for k in ("layers", "tokens", "metadata"))
        caches = [_layer_from_state(i, meta, arrays) for i, meta in enumerate(layers)]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise QwenMLXError(f"{path}: a damaged prompt cache ({type(e).__name__}: {e}); write it again with "
                           "`qwen-mlx cache-prompt`") from None
    if not isinstance(metadata, dict) or not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise QwenMLXError(f"{path}: a damaged prompt cache (its metadata or token list); write it again")
    # Files written before there was a checksum have none: read as they are.
    if "checksum" in header and header["checksum"] != cache_checksum(arrays, header["layers"], header["tokens"]):
        raise QwenMLXError(f"{path}: a damaged prompt cache (its contents do not match their checksum); write it "
                           "again")
    if any(c.offset != len(tokens) for c in caches):
        raise QwenMLXError(f"{path}: its token list ({len(tokens)} ids) does not match its arrays; write it again")
    return PromptCache(caches, tokens), metadata


def _layer_from_state(i: int, meta: Any, arrays: dict[str, mx.array]) -> BaseCache:
    prefix = f"layers.{i}."
    kind_name = meta.get("type") if isinstance(meta, dict) else None
    kind = CACHE_KINDS.get(kind_name) if isinstance(kind_name, str) else None
    if kind is None:
        raise ValueError(f"layer {i} has no known cache type")
    layer_arrays = {name[len(prefix) :]: a for name, a in arrays.items() if name.startswith(prefix)}
    settings = {k: v for k, v in meta.items() if k not in ("type", "rope_scaled")}
    if not all(type(v) is int for v in settings.values()):
        raise ValueError(f"layer {i}'s settings are not integers")
    cache = kind.from_state(layer_arrays, settings)
    cache.rope_scaled = bool(meta.get("rope_scaled", 0))  # YaRN on demand: the RoPE its keys were rotated with
    return cache


def check_prompt_cache(prompt_cache: PromptCache, model: nn.Module, source: str) -> None:
    """A loaded prompt cache must fit the model it will run with: as many layers, and keys and values of its
    KV heads and head size (else the first step fails deep inside MLX)."""
    config = model.config
    if len(prompt_cache.caches) != config.num_hidden_layers:
        raise QwenMLXError(f"{source}: the prompt cache has {len(prompt_cache.caches)} layers, the model "
                           f"{config.num_hidden_layers}; it was made with another model")
    for i, cache in enumerate(prompt_cache.caches):
        for name in ("keys", "values"):
            stored = getattr(cache, name, None)
            mismatch = None if stored is None else shape_mismatch(stored, cache, config.num_key_value_heads,
                                                                   config.head_dim)
            if mismatch:
                raise QwenMLXError(f"{source}: the prompt cache's {name} in layer {i} {mismatch}; it was made with "
                                   "another model")


def shape_mismatch(stored: mx.array | tuple[mx.array, ...], cache: BaseCache, heads: int,
                   head_dim: int) -> str | None:
    """What keeps a layer's stored keys or values from fitting a model of `heads` KV heads of `head_dim` (a plain
    array, or a quantized cache's packed codes, scales and biases), or None."""
    parts: Iterable[tuple[mx.array, int]]
    if isinstance(stored, tuple):
        assert isinstance(cache, QuantizedKVCache)  # the one kind that stores (codes, scales, biases)
        bits, group_size = cache.bits, cache.group_size
        if len(stored) != 3 or head_dim % group_size:
            return f"do not fit this model's head size {head_dim} (in {group_size}-value groups)"
        parts = zip(stored, (head_dim * bits // 32, head_dim // group_size, head_dim // group_size), strict=True)
    else:
        parts = [(stored, head_dim)]
    for array, width in parts:
        if array.ndim != 4 or array.shape[0] != 1:
            return f"have shape {tuple(array.shape)}, not (1, KV heads, positions, head size)"
        if array.shape[1] != heads:
            return f"have {array.shape[1]} KV heads, this model {heads}"
        if array.shape[3] != width:
            if width == head_dim:
                return f"have head size {array.shape[3]}, this model {head_dim}"
            return f"hold {array.shape[3]} columns a position where this model's head size {head_dim} needs {width}"
    return None
