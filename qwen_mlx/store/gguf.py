"""A GGUF file (llama.cpp's format, the one Ollama stores) read as a Qwen2 model: its config, tensor names and
tensors in MLX's layout, written shard by shard as they are converted.

The file is memory-mapped by the `gguf` package (llama.cpp's own reader); a tensor is read only when its shard is
written, so memory holds about one output shard. Quantized tensors keep their quantization where MLX has the same
layout (see gguf_quants); float tensors keep their type.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.store.gguf_quants import EXACT_BITS, FLOAT_TYPES, GROUP_SIZE, REQUANTIZED_BITS, mlx_bits, to_affine
from qwen_mlx.store.weights import Deferred, write_weights

ARCHITECTURE = "qwen2"

# llama.cpp's tensor names (gguf-py's TensorNameMap for MODEL_ARCH.QWEN2) → Hugging Face's. llama.cpp's converter
# permutes q/k rows for Llama-style rotary embeddings only; Qwen2's are stored as Hugging Face has them.
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
NUMPY_FLOATS = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True)
class GGUFWeights:
    """What writing a GGUF file's tensors did, for config.json and the conversion's summary."""

    parameters: int
    tensor_bytes: int
    quantization: dict[str, Any] | None
    # GGUF type name → (MLX bits, largest |MLX − gguf| of its dequantized weights)
    kept: dict[str, tuple[int, float]]
    requantized: dict[str, tuple[int, float]]
    dtype: mx.Dtype | None  # what every tensor was dequantized to; None: quantization kept

    def notes(self) -> tuple[str, ...]:
        """The summary's lines on what became of each GGUF type."""
        if self.dtype is not None:
            return (f"GGUF tensors dequantized to {str(self.dtype).removeprefix('mlx.core.')}",)
        notes = []
        if self.kept:
            types = ", ".join(f"{kind} as {bits}-bit" for kind, (bits, _) in sorted(self.kept.items()))
            error = max(e for _, e in self.kept.values())
            notes.append(f"kept exactly: {types}, groups of {GROUP_SIZE} (largest change of a weight {error:.1e}, "
                         "the scales' rounding to float16)")
        for kind, (bits, error) in sorted(self.requantized.items()):
            notes.append(f"{kind} has no MLX layout: requantized to {bits}-bit, groups of {GROUP_SIZE} (largest "
                         f"change of a weight {error:.1e})")
        return tuple(notes)


@dataclass(frozen=True)
class GGUFFile:
    """A Qwen2 GGUF, opened and checked whole (metadata, tensor names and types); no tensor is read yet."""

    path: Path
    reader: gguf.GGUFReader
    config: dict[str, Any]  # config.json's fields

    @classmethod
    def open(cls, path: Path) -> GGUFFile:
        reader = open_gguf(path)
        config = hf_config(reader, path)
        check_tensors(reader, config, path)
        return cls(path, reader, config)


def open_gguf(path: Path) -> gguf.GGUFReader:
    """The file's reader (memory-mapped: no tensor is read yet), once its header and size are checked whole."""
    if path.is_dir():
        raise QwenMLXError(f"{path}: is a folder; give the .gguf file itself")
    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise QwenMLXError(f"{path}: file not found") from None
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        # gguf reports a bad magic, a tensor type newer than the package and a cut-off header alike
        raise QwenMLXError(f"{path}: not a readable GGUF file ({e}); re-download it, or upgrade the gguf package "
                           "if a recent llama.cpp wrote it") from None
    except OSError as e:
        raise QwenMLXError(f"{path}: cannot read it ({e.strerror or e})") from None
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise QwenMLXError(f"{path}: truncated ({size} bytes, its tensors need {end}); re-download it")
    return reader


def metadata(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def required(reader: gguf.GGUFReader, key: str, path: Path) -> Any:
    value = metadata(reader, key)
    if value is None:
        raise QwenMLXError(f"{path}: no {key} in its metadata; the file is incomplete, re-download it")
    return value


def hf_config(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """config.json from the `qwen2.*` metadata (llama.cpp's names for the same numbers)."""
    arch = metadata(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise QwenMLXError(f"{path}: a {arch!r} model, but qwen-mlx runs Qwen2 / Qwen2.5 (GGUF architecture "
                           f"'qwen2'); pick a Qwen2 or Qwen2.5 GGUF")
    hidden = int(required(reader, "qwen2.embedding_length", path))
    heads = int(required(reader, "qwen2.attention.head_count", path))
    key_length = metadata(reader, "qwen2.attention.key_length")
    if key_length is not None and int(key_length) * heads != hidden:
        raise QwenMLXError(f"{path}: {heads} heads of {key_length} do not make the hidden size {hidden}, as in "
                           "every Qwen2 model")
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "num_hidden_layers": int(required(reader, "qwen2.block_count", path)),
        "intermediate_size": int(required(reader, "qwen2.feed_forward_length", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata(reader, "qwen2.attention.head_count_kv", heads)),
        "rms_norm_eps": float(required(reader, "qwen2.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": float(metadata(reader, "qwen2.rope.freq_base", 1_000_000.0)),
        "max_position_embeddings": int(required(reader, "qwen2.context_length", path)),
        "vocab_size": len(required(reader, "tokenizer.ggml.tokens", path)),
        # llama.cpp leaves output.weight out when the model reuses the embedding as its output projection
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "bos_token_id": metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata(reader, "tokenizer.ggml.eos_token_id"),
        "rope_scaling": rope_scaling(reader, path),
    }
    return {k: v for k, v in config.items() if v is not None}


def rope_scaling(reader: gguf.GGUFReader, path: Path) -> dict[str, Any] | None:
    kind = metadata(reader, "qwen2.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "yarn":
        raise QwenMLXError(f"{path}: rope scaling {kind!r} is not supported; Qwen2.5 uses 'yarn'")
    return {
        "rope_type": "yarn",
        "factor": float(required(reader, "qwen2.rope.scaling.factor", path)),
        "original_max_position_embeddings": int(required(reader, "qwen2.rope.scaling.original_context_length",
                                                         path)),
    }


def hf_name(name: str) -> str | None:
    """`blk.3.attn_q.bias` → `model.layers.3.self_attn.q_proj.bias`; None for a tensor Qwen2 does not have."""
    stem, _, kind = name.rpartition(".")
    if stem in GLOBAL_NAMES and kind == "weight":
        return f"{GLOBAL_NAMES[stem]}.weight"
    match = LAYER_TENSOR.fullmatch(name)
    if match and match[2] in LAYER_NAMES:
        return f"model.layers.{match[1]}.{LAYER_NAMES[match[2]]}.{match[3]}"
    return None


def check_tensors(reader: gguf.GGUFReader, config: dict[str, Any], path: Path) -> None:
    """Every tensor is one Qwen2 has, of a type this converter reads, and the vocabulary fits the embedding."""
    for t in reader.tensors:
        if hf_name(t.name) is None:
            raise QwenMLXError(f"{path}: tensor {t.name!r} is not part of a Qwen2 model; is this a Qwen2 GGUF?")
        if t.tensor_type not in FLOAT_TYPES and mlx_bits(t.tensor_type) is None:
            known = ", ".join(q.name for q in (*FLOAT_TYPES, *EXACT_BITS, *REQUANTIZED_BITS))
            raise QwenMLXError(f"{path}: tensor {t.name} is of type {t.tensor_type.name}, which qwen-mlx cannot "
                               f"convert (it reads {known})")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise QwenMLXError(f"{path}: no token_embd.weight tensor; the file is incomplete, re-download it")
    rows = int(embedding.shape[-1])  # GGUF lists dimensions fastest first: (hidden, vocab)
    if rows != config["vocab_size"]:
        raise QwenMLXError(f"{path}: its vocabulary lists {config['vocab_size']} tokens but the embedding has "
                           f"{rows} rows; the file is inconsistent, re-download it")


def quantization_block(reader: gguf.GGUFReader) -> dict[str, Any] | None:
    """mlx-lm's `quantization` block: the most common bits as the default, each layer with other bits by name."""
    layer_bits: dict[str, int] = {}
    for t in reader.tensors:
        name, bits = hf_name(t.name), mlx_bits(t.tensor_type)
        if name is not None and bits is not None:
            layer_bits[name.removesuffix(".weight")] = bits
    if not layer_bits:
        return None
    counts = {b: list(layer_bits.values()).count(b) for b in set(layer_bits.values())}
    bits = max(counts, key=lambda b: (counts[b], b))
    block: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    for layer, b in sorted(layer_bits.items()):
        if b != bits:
            block[layer] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return block


def write_gguf_weights(reader: gguf.GGUFReader, folder: Path, dtype: mx.Dtype | None,
                       max_shard_bytes: int) -> GGUFWeights:
    """Write the tensors into `folder` as safetensors shards, each converted only when its shard is written.

    dtype None keeps the file's quantization (and its float tensors' type); a dtype dequantizes every tensor to it.
    """
    errors: dict[str, float] = {}
    weights: dict[str, Deferred] = {}
    for t in reader.tensors:
        weights.update(deferred_tensors(t, dtype, errors))
    tensor_bytes = sum(w.nbytes for w in weights.values())
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    write_weights(folder, weights, parameters, max_shard_bytes)
    types = {t.tensor_type for t in reader.tensors if t.tensor_type not in FLOAT_TYPES}
    kept = {q.name: (EXACT_BITS[q], errors[q.name]) for q in types if q in EXACT_BITS and dtype is None}
    requantized = {q.name: (REQUANTIZED_BITS[q], errors[q.name]) for q in types
                   if q in REQUANTIZED_BITS and dtype is None}
    return GGUFWeights(parameters, tensor_bytes, quantization_block(reader) if dtype is None else None,
                       kept, requantized, dtype)


def deferred_tensors(t: gguf.ReaderTensor, dtype: mx.Dtype | None, errors: dict[str, float]) -> dict[str, Deferred]:
    """The output tensors of GGUF tensor `t`, each made when written; a quantized one's weight, scales and biases
    come from one conversion, made at the first of them and handed out once each."""
    name = hf_name(t.name)
    assert name is not None  # check_tensors ran first
    rows, cols = int(np.prod(t.shape[1:])), int(t.shape[0])  # GGUF's (in, out) → Hugging Face's (out, in)
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type in FLOAT_TYPES or dtype is not None:
        out_dtype = dtype or {gguf.GGMLQuantizationType.BF16: mx.bfloat16,
                              gguf.GGMLQuantizationType.F16: mx.float16}.get(t.tensor_type, mx.float32)
        return {name: Deferred(rows * cols * out_dtype.size, lambda: float_tensor(t, shape, dtype))}
    bits = mlx_bits(t.tensor_type)
    assert bits is not None
    made: dict[str, mx.array] = {}
    base = name.removesuffix(".weight")

    def make(key: str) -> Callable[[], mx.array]:
        def tensor() -> mx.array:
            if not made:
                affine = to_affine(np.asarray(t.data), t.tensor_type, rows, cols)
                kind = t.tensor_type.name
                errors[kind] = max(errors.get(kind, 0.0), affine.max_error)
                made.update({f"{base}.weight": affine.weight, f"{base}.scales": affine.scales,
                             f"{base}.biases": affine.biases})
            return made.pop(key)
        return tensor

    groups = rows * cols // GROUP_SIZE
    return {
        f"{base}.weight": Deferred(rows * cols * bits // 8, make(f"{base}.weight")),
        f"{base}.scales": Deferred(groups * 2, make(f"{base}.scales")),
        f"{base}.biases": Deferred(groups * 2, make(f"{base}.biases")),
    }


def float_tensor(t: gguf.ReaderTensor, shape: tuple[int, ...], dtype: mx.Dtype | None) -> mx.array:
    """A tensor in full precision: a float one as stored (BF16's bits moved as they are, numpy has no bfloat16),
    a quantized one dequantized by gguf; cast to `dtype` when given."""
    raw = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        array = mx.array(raw.view(np.uint16).reshape(shape)).view(mx.bfloat16)
    elif t.tensor_type in NUMPY_FLOATS:
        array = mx.array(raw.view(NUMPY_FLOATS[t.tensor_type]).reshape(shape))
    else:
        array = mx.array(gguf.quants.dequantize(raw, t.tensor_type).reshape(shape))
    return array.astype(dtype) if dtype is not None else array
