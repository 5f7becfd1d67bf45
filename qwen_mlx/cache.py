"""KV caches: preallocated (KVCache), bounded (RotatingKVCache), and prompt-prefix reuse (PromptCache)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import replaced_atomically


def causal_mask(length: int, offset: int, window: int | None = None) -> mx.array:
    """Boolean (length, offset + length) mask: query i sees key j iff j <= i (and i - j < window)."""
    keys = mx.arange(offset + length)[None]
    queries = mx.arange(offset, offset + length)[:, None]
    mask = queries >= keys
    if window is not None:
        mask = mask & (queries < keys + window)
    return mask


class KVCache:
    """Keys and values of every position so far, in a buffer that grows `step` positions at a time.

    Decoding writes into the preallocated slack instead of concatenating, so a token costs no copy of the cache.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev, length = self.offset, keys.shape[2]
        if self.keys is None or prev + length > self.keys.shape[2]:
            B, heads, _, dim = keys.shape
            n_steps = (self.step + length - 1) // self.step
            grow_k = mx.zeros((B, heads, n_steps * self.step, dim), keys.dtype)
            grow_v = mx.zeros((B, heads, n_steps * self.step, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = grow_k, grow_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], grow_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], grow_v], axis=2)
        self.offset += length
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_mask(self, length: int) -> str | None:
        # The fused kernel's "causal" aligns the queries with the last keys, so the offset needs no mask.
        return "causal" if length > 1 else None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def state(self) -> tuple[dict[str, mx.array], dict[str, int]]:
        if self.keys is None:
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


class QuantizedKVCache:
    """A KVCache whose keys and values are stored as `bits`-bit affine groups (`mx.quantize`), as mlx-lm's
    QuantizedKVCache: at 4 bits a long context takes a quarter of the float16 memory. Attention then runs on the
    quantized tensors directly (`model.quantized_attention`)."""

    step = 256

    def __init__(self, group_size: int = 64, bits: int = 8) -> None:
        if bits not in (4, 8):
            raise QwenMLXError(f"kv_bits {bits} is not supported; use 4 or 8")
        self.group_size = group_size
        self.bits = bits
        self.keys: tuple[mx.array, mx.array, mx.array] | None = None
        self.values: tuple[mx.array, mx.array, mx.array] | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[tuple[mx.array, ...], tuple[mx.array, ...]]:
        if keys.shape[-1] % self.group_size:
            raise QwenMLXError(
                f"kv_group_size {self.group_size} does not divide the head size {keys.shape[-1]}; try 32 or 64"
            )
        prev, length = self.offset, keys.shape[2]
        if self.keys is None or prev + length > self.keys[0].shape[2]:
            B, heads = keys.shape[:2]
            size = (self.step + length - 1) // self.step * self.step

            def grown(old: tuple[mx.array, ...] | None, dim: int, dtype: mx.Dtype) -> tuple[mx.array, ...]:
                groups = dim // self.group_size
                shapes = [(dim * self.bits // 32, mx.uint32), (groups, dtype), (groups, dtype)]
                new = [mx.zeros((B, heads, size, d), t) for d, t in shapes]
                if old is None:
                    return tuple(new)
                return tuple(mx.concatenate([o[..., :prev, :], n], axis=2) for o, n in zip(old, new, strict=True))

            self.keys = grown(self.keys, keys.shape[-1], keys.dtype)
            self.values = grown(self.values, values.shape[-1], values.dtype)
        self.offset += length
        for stored, new in ((self.keys, keys), (self.values, values)):
            for buffer, part in zip(stored, mx.quantize(new, group_size=self.group_size, bits=self.bits), strict=True):
                buffer[..., prev : self.offset, :] = part
        return (
            tuple(k[..., : self.offset, :] for k in self.keys),
            tuple(v[..., : self.offset, :] for v in self.values),
        )

    def make_mask(self, length: int) -> mx.array | None:
        # The quantized attention has no fused causal mode: spell the mask out.
        return causal_mask(length, self.offset) if length > 1 else None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(a.nbytes for a in (*self.keys, *self.values))

    def state(self) -> tuple[dict[str, mx.array], dict[str, int]]:
        meta = {"offset": self.offset, "group_size": self.group_size, "bits": self.bits}
        if self.keys is None:
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


class RotatingKVCache:
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
            raise QwenMLXError(f"max_kv_size {max_size} must be larger than keep={keep}")
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
        if self.keys is None:
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
        if self.keys is None or (prev >= self.keys.shape[2] and self.keys.shape[2] < self.max_size):
            B, heads, _, dim = keys.shape
            size = min(self.step, self.max_size - prev)
            grow_k = mx.zeros((B, heads, size, dim), keys.dtype)
            grow_v = mx.zeros((B, heads, size, values.shape[3]), values.dtype)
            if self.keys is None:
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

    def make_mask(self, length: int) -> mx.array | str | None:
        if length == 1:
            return None  # one query sees every key the buffer holds, in whatever order
        offset = min(self.max_size - 1, self.offset)
        if offset + length > self.max_size:
            return causal_mask(length, offset, window=self.max_size)
        return "causal"

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        self._idx -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def state(self) -> tuple[dict[str, mx.array], dict[str, int]]:
        meta = {"offset": self.offset, "idx": self._idx, "max_size": self.max_size, "keep": self.keep}
        if self.keys is None:
            return {}, meta
        return {"keys": self.keys, "values": self.values}, meta

    @classmethod
    def from_state(cls, arrays: dict[str, mx.array], meta: dict[str, int]) -> RotatingKVCache:
        cache = cls(meta["max_size"], meta["keep"])
        cache.keys, cache.values = arrays.get("keys"), arrays.get("values")
        cache.offset, cache._idx = meta["offset"], meta["idx"]
        return cache


Cache = KVCache | QuantizedKVCache | RotatingKVCache


def make_cache(
    model: nn.Module,
    max_kv_size: int | None = None,
    keep: int = 4,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> list[Cache]:
    """One cache per layer: preallocated and unbounded, rotating with `max_kv_size` positions, or quantized to
    `kv_bits` (4 or 8) for long contexts in less memory."""
    if max_kv_size is not None and kv_bits is not None:
        raise QwenMLXError("choose either a rotating cache (max_kv_size) or a quantized one (kv_bits), not both")
    if kv_bits is not None:
        return [QuantizedKVCache(kv_group_size, kv_bits) for _ in model.layers]
    if max_kv_size is None:
        return [KVCache() for _ in model.layers]
    return [RotatingKVCache(max_kv_size, keep) for _ in model.layers]


def longest_common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class PromptCache:
    """A model's per-layer caches together with the token ids they hold, so a new prompt that starts the same
    way (the next chat turn, a regenerate, an edited message) prefills only what is new."""

    caches: list[Cache]
    tokens: list[int] = field(default_factory=list)

    @classmethod
    def new(
        cls,
        model: nn.Module,
        max_kv_size: int | None = None,
        keep: int = 4,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ) -> PromptCache:
        return cls(make_cache(model, max_kv_size, keep, kv_bits, kv_group_size))

    @property
    def offset(self) -> int:
        return self.caches[0].offset if self.caches else 0

    def reuse(self, prompt: list[int]) -> list[int]:
        """Trim the caches back to the longest prefix they share with `prompt`; return the tokens to prefill.

        At least one token is always left to prefill, since its logits pick the first reply token.
        """
        common = min(longest_common_prefix(self.tokens, prompt), len(prompt) - 1)
        stale = len(self.tokens) - common
        if stale > 0:
            if all(c.is_trimmable() for c in self.caches):
                for c in self.caches:
                    c.trim(stale)
            else:
                # A rotating cache past its window has evicted positions; it cannot be rewound, only rebuilt.
                self.caches = [_empty_like(c) for c in self.caches]
                common = 0
        self.tokens = list(prompt[:common])
        return list(prompt[common:])

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


def _empty_like(cache: Cache) -> Cache:
    if isinstance(cache, RotatingKVCache):
        return RotatingKVCache(cache.max_size, cache.keep)
    if isinstance(cache, QuantizedKVCache):
        return QuantizedKVCache(cache.group_size, cache.bits)
    return KVCache()


def save_prompt_cache(path: str | Path, prompt_cache: PromptCache, metadata: dict[str, str] | None = None) -> None:
    """Write the caches and their token ids to one safetensors file, atomically (temp file, then rename)."""
    path = Path(path)
    arrays: dict[str, mx.array] = {}
    layers = []
    for i, cache in enumerate(prompt_cache.caches):
        state, meta = cache.state()
        arrays.update({f"layers.{i}.{name}": a for name, a in state.items()})
        layers.append({"type": type(cache).__name__, **meta})
    header = {
        "format": "qwen-mlx-prompt-cache",
        "layers": json.dumps(layers),
        "tokens": json.dumps(prompt_cache.tokens),
        "metadata": json.dumps(metadata or {}),
    }
    # mx.save_safetensors appends ".safetensors" to a name without it: give the temporary file that suffix.
    with replaced_atomically(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, header)


def load_prompt_cache(path: str | Path) -> tuple[PromptCache, dict[str, str]]:
    """Read a file written by `save_prompt_cache`: the PromptCache and the metadata saved with it."""
    try:
        # Named format: mx.load goes by the extension otherwise, and save_prompt_cache accepts any file name.
        arrays, header = mx.load(str(path), format="safetensors", return_metadata=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise QwenMLXError(f"{path}: cannot read the prompt cache ({e})") from None
    if header.get("format") != "qwen-mlx-prompt-cache":
        raise QwenMLXError(f"{path}: not a qwen-mlx prompt cache (write one with `qwen-mlx cache-prompt`)")
    classes = {"KVCache": KVCache, "QuantizedKVCache": QuantizedKVCache, "RotatingKVCache": RotatingKVCache}
    caches = []
    for i, meta in enumerate(json.loads(header["layers"])):
        prefix = f"layers.{i}."
        layer_arrays = {name[len(prefix) :]: a for name, a in arrays.items() if name.startswith(prefix)}
        caches.append(classes[meta.pop("type")].from_state(layer_arrays, meta))
    return PromptCache(caches, json.loads(header["tokens"])), json.loads(header["metadata"])
