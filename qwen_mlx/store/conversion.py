"""A Hugging Face Qwen2 folder → an MLX folder (optionally quantized) that mlx-lm loads (`qwen-mlx convert`).

The output has mlx-lm's layout: config.json with the `quantization` block, `model.safetensors` (or
`model-0000i-of-0000n.safetensors` shards) with `{"format": "mlx"}` metadata, `model.safetensors.index.json`,
and the tokenizer files. Tensors stream: each is read, cast and quantized when its shard is written, so memory
holds about one output shard, never the whole model twice. Everything is written into a hidden folder beside
the target that is renamed at the end, so an interrupted run never leaves a folder that looks like a model.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from tokenizers import Tokenizer as BackendTokenizer

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import read_json
from qwen_mlx.store.gguf import GGUFFile, GGUFWeights, write_gguf_weights
from qwen_mlx.store.gguf_tokenizer import build_tokenizer, write_tokenizer_files
from qwen_mlx.store.load import load_model, resolve_model_path
from qwen_mlx.store.ollama import is_ollama_name, resolve_ollama
from qwen_mlx.store.quantize import check_quantization, dequantize_model, parameter_count, quantize_model
from qwen_mlx.store.weights import MAX_SHARD_BYTES, weight_files, write_json, write_weights

DTYPES = ("float16", "bfloat16", "float32")
T = TypeVar("T")
OWNER_FILE = ".converting"  # in a staging folder: the pid of the conversion writing it
# Besides config and weights, a model folder needs its tokenizer, chat template and generation defaults.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class ConversionSummary:
    mlx_path: Path
    source_bytes: int
    output_bytes: int
    bits_per_weight: float
    quantization: dict[str, Any] | None
    notes: tuple[str, ...] = ()  # one line each, after the summary: what a GGUF import kept and changed

    def __str__(self) -> str:
        q = self.quantization
        how = f"{q['bits']}-bit, group size {q['group_size']}" if q else "not quantized"
        return (
            f"Wrote {self.mlx_path}: {_gigabytes(self.output_bytes)} from {_gigabytes(self.source_bytes)} "
            f"({how}, {self.bits_per_weight:.2f} bits per weight)"
        ) + "".join(f"\n  {note}" for note in self.notes)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | None = None,
    dequantize: bool = False,
    q_keep: str | dict[str, int] | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> ConversionSummary:
    """Convert a Qwen2 model folder or Hugging Face repo id into an MLX model folder at `mlx_path`.

    quantize: affine `q_bits`-bit quantization in groups of `q_group_size` (Linear layers and the embedding).
    dtype: cast the floating-point tensors ("float16", "bfloat16", "float32"); by default they keep theirs.
    dequantize: turn an MLX-quantized model back into full precision.
    q_keep: layers kept at other bits, `{"embed_tokens": 8}` or the CLI form "embed_tokens,lm_head=8".
    force: replace an existing non-empty `mlx_path` (only once the new folder is complete).

    A GGUF file (`model.gguf`) or a model Ollama has pulled (`ollama:qwen2.5:7b`) goes to `convert_gguf`.
    """
    if is_gguf_source(hf_path):
        return convert_gguf(hf_path, mlx_path, quantize, q_bits, q_group_size, dtype, dequantize, q_keep, force,
                            max_shard_bytes)
    layer_bits = check_options(quantize, dequantize, dtype, q_keep, q_bits, q_group_size)
    target = prepare_target(mlx_path, force)
    source = resolve_model_path(hf_path)
    check_apart(source, target)
    if not (source / "tokenizer.json").exists():
        raise QwenMLXError(f"{source}: no tokenizer.json, without which the result cannot load; add it first")
    model, _ = load_model(source, lazy=True)
    already_quantized = model.config.quantization
    if quantize and already_quantized:
        raise QwenMLXError(f"{source}: the model is already quantized; convert it with -d first, or drop -q")
    if dequantize and not already_quantized:
        raise QwenMLXError(f"{source}: the model is not quantized, there is nothing to dequantize; drop -d")

    if dtype is not None:
        cast_floats(model, getattr(mx, dtype))
    quantization = already_quantized
    if quantize:
        quantization = quantize_model(model, q_bits, q_group_size, layer_bits)
    if dequantize:
        dequantize_model(model)
        quantization = None
    parameters = parameter_count(model)
    weights = dict(tree_flatten(model.parameters()))
    # From here `weights` holds the only references, so each tensor is freed once its shard is written.
    del model
    tensor_bytes = sum(v.nbytes for v in weights.values())

    def write(staging: Path) -> None:
        write_weights(staging, weights, parameters, max_shard_bytes)
        write_json(staging / "config.json", output_config(read_json(source / "config.json"), quantization))
        copy_tokenizer_files(source, staging)

    write_staged(target, force, write)
    return ConversionSummary(
        mlx_path=target,
        source_bytes=sum(p.stat().st_size for p in weight_files(source)),
        output_bytes=sum(p.stat().st_size for p in target.glob("*.safetensors")),
        bits_per_weight=tensor_bytes * 8 / parameters,
        quantization=quantization,
    )


def prepare_target(mlx_path: str | Path, force: bool) -> Path:
    """The output folder, resolved and checked before any work, with what a killed conversion left beside it gone."""
    if not str(mlx_path).strip():
        raise QwenMLXError("--mlx-path is empty (an unset shell variable?); give the folder to write")
    # Resolved, so that "." or "out/.." name a folder with a real name and parent to stage beside.
    target = Path(mlx_path).expanduser().resolve()
    check_target(target, force)
    clean_interrupted(target)
    return target


def staging_folder(target: Path) -> Path:
    """A new hidden folder beside `target`, marked with this process's pid so that clean_interrupted knows it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    (staging / OWNER_FILE).write_text(str(os.getpid()))
    return staging


def write_staged(target: Path, force: bool, write: Callable[[Path], T]) -> T:
    """Run `write` on a staging folder beside `target`, then rename it into place: `target` is either the old
    folder or the complete new one, never half-written."""
    staging = staging_folder(target)
    try:
        result = write(staging)
        (staging / OWNER_FILE).unlink()
        move_into_place(staging, target, force)
    except BaseException as e:  # Ctrl-C included: leave nothing half-written behind
        shutil.rmtree(staging, ignore_errors=True)
        # A full disk, a read-only folder: the user's to fix. MLX reports a failed write as a RuntimeError.
        if isinstance(e, OSError | RuntimeError):
            raise QwenMLXError(f"{target}: writing failed ({e}); nothing was written, the old folder (if any) is "
                               "untouched") from None
        raise
    return result


def is_gguf_source(source: str | Path) -> bool:
    return is_ollama_name(str(source)) or Path(source).suffix.lower() == ".gguf"


def convert_gguf(
    source: str | Path,
    mlx_path: str | Path = "mlx_model",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | None = None,
    dequantize: bool = False,
    q_keep: str | dict[str, int] | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> ConversionSummary:
    """Convert a GGUF file, or `ollama:NAME[:TAG]` (a model Ollama has pulled), into an MLX model folder.

    By default the tensors keep the file's quantization wherever MLX has its layout, and the nearest MLX layout
    with at least its bits elsewhere (the summary says which, and the largest change of a weight). `dtype` or
    `dequantize` write full precision instead (float32 unless `dtype` says otherwise); `quantize` dequantizes and
    quantizes again as for a Hugging Face model (`q_bits`, `q_group_size`, `q_keep`).
    """
    layer_bits = check_options(quantize, dequantize, dtype, q_keep, q_bits, q_group_size)
    target = prepare_target(mlx_path, force)
    path = resolve_ollama(str(source)) if is_ollama_name(str(source)) else Path(source).expanduser().resolve()
    check_apart(path, target)
    gguf_file = GGUFFile.open(path)
    tokenizer = build_tokenizer(gguf_file.reader, path)  # before anything is written: its errors are the file's
    if quantize:
        return requantize_gguf(gguf_file, tokenizer, target, dtype, q_bits, q_group_size, layer_bits, force,
                               max_shard_bytes)
    float_dtype = getattr(mx, dtype) if dtype else mx.float32 if dequantize else None
    written = write_staged(
        target, force, lambda staging: write_gguf_folder(gguf_file, tokenizer, staging, float_dtype, max_shard_bytes))
    return ConversionSummary(
        mlx_path=target,
        source_bytes=path.stat().st_size,
        output_bytes=sum(p.stat().st_size for p in target.glob("*.safetensors")),
        bits_per_weight=written.tensor_bytes * 8 / written.parameters,
        quantization=written.quantization,
        notes=written.notes(),
    )


def write_gguf_folder(gguf_file: GGUFFile, tokenizer: BackendTokenizer, folder: Path, dtype: mx.Dtype | None,
                      max_shard_bytes: int) -> GGUFWeights:
    """A GGUF's model folder: its tensors (quantization kept, or dequantized to `dtype`), config, tokenizer."""
    written = write_gguf_weights(gguf_file.reader, folder, dtype, max_shard_bytes)
    write_json(folder / "config.json", output_config(gguf_file.config, written.quantization))
    write_tokenizer_files(gguf_file.reader, tokenizer, folder, gguf_file.config["max_position_embeddings"])
    return written


def requantize_gguf(gguf_file: GGUFFile, tokenizer: BackendTokenizer, target: Path, dtype: str | None, q_bits: int,
                    q_group_size: int, layer_bits: dict[str, int], force: bool,
                    max_shard_bytes: int) -> ConversionSummary:
    """-q on a GGUF: its weights in full precision (`dtype`, else float16, the precision of GGUF's own scales) in
    a hidden folder beside the target, quantized from there by the Hugging Face path, then removed."""
    staging = staging_folder(target)
    try:
        write_gguf_folder(gguf_file, tokenizer, staging, getattr(mx, dtype or "float16"), max_shard_bytes)
        summary = convert(staging, target, quantize=True, q_bits=q_bits, q_group_size=q_group_size,
                          q_keep=layer_bits, force=force, max_shard_bytes=max_shard_bytes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return replace(summary, source_bytes=gguf_file.path.stat().st_size)


def check_options(quantize: bool, dequantize: bool, dtype: str | None, q_keep: str | dict[str, int] | None,
                  q_bits: int, q_group_size: int) -> dict[str, int]:
    """The conversion's options checked together, before any file is touched; the bits of the layers kept."""
    if quantize and dequantize:
        raise QwenMLXError("choose either --quantize or --dequantize, not both")
    if dtype is not None and dtype not in DTYPES:
        raise QwenMLXError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    layer_bits = parse_q_keep([q_keep]) if isinstance(q_keep, str) else dict(q_keep or {})
    if layer_bits and not quantize:
        raise QwenMLXError("--q-keep only applies when quantizing; add -q")
    if quantize:
        check_quantization(q_bits, q_group_size)
    return layer_bits


def parse_q_keep(specs: Sequence[str]) -> dict[str, int]:
    """`["embed_tokens,lm_head=8", "down_proj=6"]` → `{"embed_tokens": 8, "lm_head": 8, "down_proj": 6}`.

    Each spec is comma-separated layer names with an optional `=BITS` for all of them (8 when left out).
    """
    layer_bits: dict[str, int] = {}
    for spec in specs:
        names, _, bits = spec.partition("=")
        try:
            value = int(bits) if bits else 8
        except ValueError:
            raise QwenMLXError(
                f"--q-keep {spec!r}: {bits!r} is not a number of bits; write e.g. embed_tokens,lm_head=8"
            ) from None
        layer_names = [n.strip() for n in names.split(",") if n.strip()]
        if not layer_names:
            raise QwenMLXError(f"--q-keep {spec!r}: no layer names; write e.g. embed_tokens,lm_head=8")
        layer_bits.update(dict.fromkeys(layer_names, value))
    return layer_bits


def check_target(target: Path, force: bool) -> None:
    """Refuse a target that would lose data, before any work is done: --force replaces only an empty folder or one
    that holds a model (config.json and safetensors weights), never the working directory's other files."""
    if target.exists() and not target.is_dir():
        raise QwenMLXError(f"{target}: exists and is not a folder; pick another --mlx-path")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        raise QwenMLXError(
            f"{target}: exists and is not empty; pass --force to replace it, or pick another --mlx-path"
        )
    if not ((target / "config.json").is_file() and any(target.glob("*.safetensors"))):
        others = ", ".join(sorted(p.name for p in target.iterdir())[:3])
        raise QwenMLXError(f"{target}: holds files that are not a model ({others}, ...); --force replaces only a "
                           "model folder, so it is left untouched; pick another --mlx-path")


def clean_interrupted(target: Path) -> None:
    """Tidy what a killed conversion left beside `target`: staging folders whose process is gone, and the old
    target of an interrupted replace (put back if the new one never arrived)."""
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        owner = leftover / OWNER_FILE
        try:
            pid = int(owner.read_text())
            os.kill(pid, 0)  # raises if no such process: its conversion was killed
        except (OSError, ValueError):
            shutil.rmtree(leftover, ignore_errors=True)
    for old in target.parent.glob(f".{target.name}.*.old"):
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(target)


def check_apart(source: Path, target: Path) -> None:
    """The target must neither be the source nor hold it nor sit inside it: the source is never modified."""
    s, t = source.resolve(), target.resolve()
    if s == t or s in t.parents or t in s.parents:
        raise QwenMLXError(f"{target}: overlaps the source folder {source}; pick an --mlx-path outside it")


def cast_floats(model: Any, dtype: mx.Dtype) -> None:
    """Cast every floating-point parameter (integer ones, like packed quantized weights, stay as they are)."""
    model.update(
        tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters())
    )


def output_config(config: dict[str, Any], quantization: dict[str, Any] | None) -> dict[str, Any]:
    """The source's config.json with the new quantization block (twice, as mlx-lm writes it), keys sorted."""
    dropped = ("_name_or_path", "quantization", "quantization_config")
    config = {k: v for k, v in config.items() if k not in dropped}
    # transformers >= 5 keeps the rope settings only in `rope_parameters`, which mlx-lm does not read: without
    # the classic keys it would silently run the model with its default rope_theta.
    rope = dict(config.get("rope_parameters") or {})
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope.pop("rope_theta"))
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", rope)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return dict(sorted(config.items()))


def copy_tokenizer_files(source: Path, folder: Path) -> None:
    for path in sorted(source.iterdir()):
        if path.name in COPIED_FILES or path.suffix == ".jinja":
            shutil.copyfile(path, folder / path.name)


def move_into_place(staging: Path, target: Path, force: bool) -> None:
    """Rename the finished folder to the target; an old target goes only once the new one is in place."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        staging.rename(target)
        return
    check_target(target, force)  # it may have been filled while we converted
    old = target.parent / f".{target.name}.{secrets.token_hex(4)}.old"
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old)


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"
