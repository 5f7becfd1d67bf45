"""GGUF's block quantizations as MLX's affine groups: w = scale·q + bias, 32 inputs a group, q packed into uint32.

Where a GGUF type is affine over 32 consecutive inputs with one scale and one offset, it already *is* an MLX
layout: its integers are repacked unchanged and its scale and offset become the group's scale and bias (rounded to
float16, the only change). The other types are dequantized by the `gguf` package and quantized again by MLX.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

GROUP_SIZE = 32  # the exact types' groups (a K-quant's sub-blocks) are MLX's smallest group size
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
CHUNK_VALUES = 1 << 22  # weights converted at once: temporaries of tens of MB, whatever the tensor's size

# Types whose groups are MLX's groups, and the bits their integers keep.
EXACT_BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q5_K: 5, Q.Q8_0: 8}

# The others: the type's own integer bits + 2, the next MLX width, so that requantizing adds well under the type's own
# rounding. Measured on Qwen2.5-Coder-0.5B's Q6_K tensors (groups of 16), the relative RMS change of the weights:
# 1.9e-2 at 6 bits (as large as Q6_K's own rounding), 4.9e-3 at 8. Two more bits cut it about fourfold for every
# type (random blocks: Q2_K 2.5e-2 at 4 bits, Q3_K 3.5e-2 at 5, IQ4_XS 1.5e-2 at 6).
REQUANTIZED_BITS = {
    Q.Q6_K: 8, Q.Q2_K: 4, Q.Q3_K: 5,
    Q.IQ1_S: 3, Q.IQ1_M: 3, Q.TQ1_0: 4, Q.TQ2_0: 4,
    Q.IQ2_XXS: 4, Q.IQ2_XS: 4, Q.IQ2_S: 4, Q.IQ3_XXS: 5, Q.IQ3_S: 5,
    Q.IQ4_NL: 6, Q.IQ4_XS: 6, Q.MXFP4: 6,
}


@dataclass(frozen=True)
class AffineTensor:
    """One matrix in MLX's quantized layout, and how far it is from gguf's own dequantized values."""

    weight: mx.array  # uint32, (rows, cols * bits / 32)
    scales: mx.array  # float16, (rows, cols / 32)
    biases: mx.array  # float16, (rows, cols / 32)
    bits: int
    max_error: float


def mlx_bits(qtype: Q) -> int | None:
    """The bits a quantized GGUF type becomes in MLX; None for a type this converter cannot read."""
    return EXACT_BITS.get(qtype) or REQUANTIZED_BITS.get(qtype)


def to_affine(raw: np.ndarray, qtype: Q, rows: int, cols: int) -> AffineTensor:
    """A quantized GGUF tensor (its raw bytes, a row of blocks per output row) in MLX's layout.

    Converted a few thousand rows at a time: an embedding's float32 temporaries would be several gigabytes.
    """
    step = max(1, CHUNK_VALUES // cols)
    parts = [_rows_to_affine(raw[i : i + step], qtype, cols) for i in range(0, rows, step)]
    return AffineTensor(
        weight=mx.concatenate([p.weight for p in parts]),
        scales=mx.concatenate([p.scales for p in parts]),
        biases=mx.concatenate([p.biases for p in parts]),
        bits=parts[0].bits,
        max_error=max(p.max_error for p in parts),
    )


def _rows_to_affine(raw: np.ndarray, qtype: Q, cols: int) -> AffineTensor:
    rows = raw.shape[0]
    reference = mx.array(quants.dequantize(raw, qtype).reshape(rows, cols))
    if qtype in EXACT_BITS:
        q, scale, bias = UNPACK[qtype](np.ascontiguousarray(raw).reshape(-1, quants.GGML_QUANT_SIZES[qtype][1]))
        bits = EXACT_BITS[qtype]
        weight = mx.array(pack(q.reshape(rows, cols), bits))
        scales = mx.array(scale.reshape(rows, -1).astype(np.float16))
        biases = mx.array(bias.reshape(rows, -1).astype(np.float16))
    else:
        bits = REQUANTIZED_BITS[qtype]
        weight, scales, biases = requantize(reference, bits)
    # The layout's own error: its values computed in float32, so that float16 arithmetic does not add to it.
    ours = mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32), group_size=GROUP_SIZE,
                         bits=bits)
    max_error = float(mx.abs(ours - reference).max())
    return AffineTensor(weight, scales, biases, bits, max_error)


def requantize(w: mx.array, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """Each group's min-to-max range in 2**bits − 1 steps, the integers rounded against the float16 scale and bias
    as stored: every weight within half a step (plus float16's rounding). mx.quantize moves its grid to put zero
    on it, which costs up to 1.3 steps at the range's ends (measured on Qwen2.5-Coder's Q6_K tensors)."""
    groups = w.reshape(w.shape[0], -1, GROUP_SIZE)
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    scales = ((high - low) / (2**bits - 1)).astype(mx.float16)
    biases = low.astype(mx.float16)
    step = mx.where(scales == 0, 1, scales).astype(mx.float32)[..., None]
    q = mx.clip(mx.round((groups - biases.astype(mx.float32)[..., None]) / step), 0, 2**bits - 1)
    weight = pack(np.array(q.astype(mx.uint8)).reshape(w.shape), bits)
    return mx.array(weight), scales, biases


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [0, 2**bits) in MLX's packing: each row one little-endian bit stream read as uint32, value i in
    bits [i·bits, (i+1)·bits) (checked against mx.dequantize for 2, 3, 4, 5, 6 and 8 bits).

    Every 8 values fill exactly `bits` bytes, so they are gathered in one uint64 and its low `bits` bytes kept.
    """
    rows, cols = q.shape
    word = np.zeros((rows, cols // 8), dtype=np.uint64)
    for k in range(8):
        word |= q[:, k::8].astype(np.uint64) << np.uint64(k * bits)
    as_bytes = word.astype("<u8").view(np.uint8).reshape(rows, cols // 8, 8)[..., :bits]
    return np.ascontiguousarray(as_bytes).reshape(rows, -1).view(np.uint32)


# Unpacking ggml's blocks (ggml-common.h's block_q*) into (q, scale, bias) per group of 32, w = scale·q + bias.
# Each takes blocks as rows of bytes; the layouts follow gguf.quants' dequantize_blocks.

def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, chunk: int) -> np.ndarray:
    """ggml's 4-bit order: each `chunk` bytes hold `chunk` values in their low nibbles, then `chunk` in the high."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, chunk) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _bits(b: np.ndarray) -> np.ndarray:
    return np.unpackbits(b, axis=-1, bitorder="little")


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:], 16), d, -8 * d  # w = d·(q − 8)


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles(b[:, 4:], 16), _f16(b[:, :2]), _f16(b[:, 2:4])  # w = d·q + m


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 6:], 16) | (_bits(b[:, 2:6]) << 4)  # the fifth bits: one little-endian uint32
    return q, d, -16 * d  # w = d·(q − 16)


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = _nibbles(b[:, 8:], 16) | (_bits(b[:, 4:8]) << 4)
    return q, _f16(b[:, :2]), _f16(b[:, 2:4])  # w = d·q + m


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b[:, :2])
    # MLX's q is unsigned: d·q = d·(q + 128) − 128·d
    q = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, -128 * d


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """256 values a super-block in 8 groups of 32: w = d·sc·q − dmin·m, sc and m 6-bit per group."""
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = quants.Q4_K.get_scale_min(b[:, 4:16])
    return _nibbles(b[:, 16:], 32).reshape(-1, 32), (d * sc).reshape(-1, 1), (-dmin * m).reshape(-1, 1)


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = quants.Q4_K.get_scale_min(b[:, 4:16])
    # The fifth bits: bit j of byte i belongs to value i of group j.
    high = _bits(b[:, 16:48].reshape(n, 32, 1)).transpose(0, 2, 1).reshape(n, 256)
    q = _nibbles(b[:, 48:], 32) | (high << 4)
    return q.reshape(-1, 32), (d * sc).reshape(-1, 1), (-dmin * m).reshape(-1, 1)


UNPACK = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k}
