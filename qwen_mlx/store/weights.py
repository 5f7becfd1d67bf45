"""Safetensors weight files: reading a model folder's (checked before use), fingerprints, writing them in shards."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import data_home, read_json, replaced_atomically

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB


def check_safetensors(path: Path) -> dict[str, str]:
    """The tensor names of a safetensors file and their dtypes, after checking that its header and size are whole.

    A truncated download or a corrupt file is named here, not deep inside MLX at the first matmul.
    """
    return {name: entry["dtype"] for name, entry in safetensors_header(path).items()}


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Each tensor's {"dtype", "shape", "data_offsets"} from a safetensors file's header, once the header and the
    file's size are checked to be whole; no tensor data is read."""
    try:
        if path.is_dir():
            raise QwenMLXError(f"{path}: is a folder, not a safetensors file; re-download the model")
        size = path.stat().st_size
        header, header_len = read_header(path)
        entries = header_entries(header)
    except FileNotFoundError:
        raise QwenMLXError(f"{path}: missing; re-download the model") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise QwenMLXError(f"{path}: not a valid safetensors file ({e}); re-download it") from None
    except OSError as e:  # a symlink loop, no permission
        raise QwenMLXError(f"{path}: cannot read it ({e.strerror or e})") from None
    end = max((entry["data_offsets"][1] for entry in entries.values()), default=0)
    if 8 + header_len + end > size:
        raise QwenMLXError(
            f"{path}: truncated ({size} bytes, its header needs {8 + header_len + end}); re-download it"
        )
    return entries


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own cap on a header (its reference reader refuses more)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (its "__metadata__" included) and its length in bytes. The length in the first 8
    bytes is checked against the file's size and the format's cap before anything is read: a damaged or foreign
    file can claim any length, and reading it would run out of memory. ValueError says what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"its header length ({header_len} bytes) runs past the end of the file or the "
                             f"format's {MAX_HEADER_BYTES}-byte limit")
        try:
            header = json.loads(f.read(header_len))
        except RecursionError:
            raise ValueError("its header nests too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    return header, header_len


def header_entries(header: Any) -> dict[str, dict[str, Any]]:
    """A safetensors header's tensor entries, each checked for a dtype, a shape and two data offsets."""
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not isinstance(entry.get("dtype"), str) or not isinstance(entry.get("shape"), list)):
            raise ValueError(f"tensor {name!r} has no valid dtype, shape and data_offsets")
    return entries


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, from its shard index when it has one (only files inside the folder)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise QwenMLXError(f"{index}: weight_map must map tensor names to shard file names; re-download it")
        inside = folder.resolve()
        files = sorted({folder / name for name in weight_map.values()})
        outside = [f.name for f in files if f.resolve().parent != inside]
        if outside:
            raise QwenMLXError(f"{index}: shard {outside[0]!r} is not a file in the model folder; qwen-mlx reads "
                               "only the folder's own files")
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise QwenMLXError(f"{folder}: shard {missing[0]} listed in {index.name} is missing; re-download the model")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise QwenMLXError(
                f"{folder}: only pickled weights ({pickled[0]}), which qwen-mlx never loads because unpickling can "
                f"run code; use the model's safetensors version (or save it with safe_serialization=True)"
            )
        raise QwenMLXError(f"{folder}: no *.safetensors weights found")
    return files


def load_weights(folder: Path) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """All tensors of a folder (lazily: nothing is read until it is evaluated), and the file each came from."""
    weights: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for path in weight_files(folder):
        check_safetensors(path)
        try:
            # mx.load's stub gives one return type for all formats; a safetensors file is a dict of arrays.
            tensors = cast(dict[str, mx.array], mx.load(str(path), format="safetensors"))
        except (RuntimeError, ValueError, OSError) as e:
            raise QwenMLXError(f"{path}: cannot read ({e}); re-download it") from None
        weights.update(tensors)
        origin.update(dict.fromkeys(tensors, path))
    return weights, origin


# safetensors dtype → (how numpy reads its bytes, the MLX dtype); numpy has no bfloat16, so its bits come as uint16.
SAFETENSORS_DTYPES: dict[str, tuple[Any, mx.Dtype]] = {
    "F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16), "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32), "I32": (np.int32, mx.int32), "U8": (np.uint8, mx.uint8),
    "I8": (np.int8, mx.int8), "U16": (np.uint16, mx.uint16), "I16": (np.int16, mx.int16),
    "I64": (np.int64, mx.int64), "U64": (np.uint64, mx.uint64), "BOOL": (np.bool_, mx.bool_),
}


def read_tensor(path: Path, name: str, axis: int | None = None, start: int = 0, stop: int = 0,
                length: int = 0) -> mx.array:
    """Tensor `name` of a safetensors file, or only its `[start, stop)` along `axis` zero-padded to `length`.

    The file is memory-mapped, so only the pages of that slice are read: a rank of a sharded model never holds a
    whole tensor it keeps a part of.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        entry = header_entries(json.loads(f.read(header_len)))[name]
    np_dtype, dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    data = np.memmap(path, dtype=np_dtype, mode="r", offset=8 + header_len + begin, shape=shape) if end > begin \
        else np.zeros(shape, np_dtype)
    if axis is not None:
        index = [slice(None)] * len(shape)
        index[axis] = slice(start, stop)
        data = data[tuple(index)]
        if length > stop - start:
            pad = [(0, 0)] * len(shape)
            pad[axis] = (0, length - (stop - start))
            data = np.pad(data, pad)
    array = mx.array(np.ascontiguousarray(data))
    del data
    return array.view(dtype) if array.dtype != dtype else array


FINGERPRINT_INDEX = "fingerprints.json"  # under data_home(): each weight file's digest, by its size, mtime and inode
HASH_CHUNK = 8 << 20


def fingerprint(folder: Path, files: list[Path], index: Path | None = None) -> str:
    """A digest that tells one checkpoint from another: config.json and every byte of every weight file, so two
    models of one shape that differ anywhere never share a cache. A file's own digest is computed once (about a
    second per GB) and remembered in `index` (default: fingerprints.json under the app's home) by its size,
    modification time and inode; a file whose stamp differs from the remembered one is read again."""
    index = index or data_home() / FINGERPRINT_INDEX
    known = read_fingerprint_index(index)
    digest = hashlib.blake2b((folder / "config.json").read_bytes(), digest_size=16)
    changed = False
    for path in files:
        info = path.stat()
        key, stamp = str(path.resolve()), [info.st_size, info.st_mtime_ns, info.st_ino]
        remembered = known.get(key)
        if not (isinstance(remembered, list) and remembered[:3] == stamp and len(remembered) == 4):
            remembered = known[key] = [*stamp, file_digest(path)]
            changed = True
        digest.update(f"{path.name}:{remembered[3]}".encode())
    if changed:
        write_fingerprint_index(index, known)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes, read in chunks into one buffer."""
    digest = hashlib.blake2b(digest_size=16)
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def read_fingerprint_index(index: Path) -> dict[str, Any]:
    """The remembered digests; a missing or damaged index is an empty one (every file is read again)."""
    try:
        return read_json(index)
    except QwenMLXError:
        return {}


def write_fingerprint_index(index: Path, known: dict[str, Any]) -> None:
    """Write the digests back atomically, without those of files that are gone. A home it cannot write to only
    costs reading the weights again next time."""
    kept = {key: value for key, value in known.items() if Path(key).exists()}
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(index) as tmp:
            tmp.write_text(json.dumps(kept), encoding="utf-8")
    except OSError as e:
        log.warning("could not remember the weights' digests in %s: %s", index, e)


@dataclass(frozen=True)
class Deferred:
    """A tensor made only when its shard is written, its size known before: a GGUF import converts each tensor
    there, so memory holds one shard's tensors, never the whole model."""

    nbytes: int
    make: Callable[[], mx.array]


def plan_shards(weights: dict[str, mx.array] | dict[str, Deferred], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order; a tensor over the limit gets a shard of its own (as in mlx-lm)."""
    shards: list[list[str]] = []
    size = 0
    for name, array in weights.items():
        if not shards or size + array.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += array.nbytes
    return shards


def write_weights(folder: Path, weights: dict[str, mx.array] | dict[str, Deferred], parameters: int,
                  max_shard_bytes: int = MAX_SHARD_BYTES, desc: str = "Converting") -> None:
    """Evaluate and write the tensors shard by shard, with a progress bar; consumes `weights`."""
    shards = plan_shards(weights, max_shard_bytes)
    n = len(shards)
    file_names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    if n == 1:
        file_names = ["model.safetensors"]
    total = sum(v.nbytes for v in weights.values())
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
        for file_name, names in zip(file_names, shards, strict=True):
            shard = {}
            for name in names:
                bar.set_postfix_str(name, refresh=False)
                array = weights.pop(name)
                if isinstance(array, Deferred):
                    array = array.make()
                mx.eval(array)
                shard[name] = array
                bar.update(array.nbytes)
            write_shard(folder / file_name, shard)
            weight_map.update(dict.fromkeys(names, file_name))
            del shard
    index = {
        "metadata": {"total_size": total, "total_parameters": parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(folder / "model.safetensors.index.json", index)


def write_shard(path: Path, tensors: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=4)
