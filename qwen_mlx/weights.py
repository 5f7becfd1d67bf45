"""Safetensors weight files: reading a model folder's (checked before use) and writing them in shards."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from qwen_mlx.config import read_json
from qwen_mlx.errors import QwenMLXError

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB


def check_safetensors(path: Path) -> list[str]:
    """The tensor names in a safetensors file, after checking that its header and size are whole.

    A truncated download or a corrupt file is named here, not deep inside MLX at the first matmul.
    """
    return list(safetensors_header(path))


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Each tensor's {"dtype", "shape", "data_offsets"} from a safetensors file's header, once the header and the
    file's size are checked to be whole; no tensor data is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise QwenMLXError(f"{path}: missing; re-download the model") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise QwenMLXError(f"{path}: not a valid safetensors file ({e}); re-download it") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_len + end > size:
        raise QwenMLXError(
            f"{path}: truncated ({size} bytes, its header needs {8 + header_len + end}); re-download it"
        )
    return header


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, from its shard index when it has one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
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
            tensors = mx.load(str(path))
        except (RuntimeError, ValueError, OSError) as e:
            raise QwenMLXError(f"{path}: cannot read ({e}); re-download it") from None
        weights.update(tensors)
        origin.update(dict.fromkeys(tensors, path))
    return weights, origin


def plan_shards(weights: dict[str, mx.array], max_shard_bytes: int) -> list[list[str]]:
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


def write_weights(folder: Path, weights: dict[str, mx.array], parameters: int,
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
