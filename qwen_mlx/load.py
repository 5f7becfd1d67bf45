"""A model folder or Hugging Face repo id → (model, tokenizer). Safetensors only, checked before use."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen_mlx.config import ModelConfig, read_json
from qwen_mlx.cpu import prepare_for_cpu
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model import Qwen2
from qwen_mlx.quantize import prepare_quantized
from qwen_mlx.sample import SamplingParams
from qwen_mlx.tokenizer import Tokenizer

DEFAULT_MODEL = "mlx-community/Qwen2.5-7B-Instruct-4bit"

# What a model needs from a repo: configs, weights, the tokenizer. Never *.bin / *.pt (pickles).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "merges.txt", "vocab.json", "*.txt"]


def resolve_model_path(path_or_repo: str | os.PathLike[str]) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id, from the local cache or downloaded into it."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QwenMLXError(f"{path}: expected a model folder (with config.json and *.safetensors), got a file")
        return path
    repo_id = str(path_or_repo)
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise QwenMLXError(f"{repo_id}: no such folder, and not a Hugging Face repo id like 'Qwen/Qwen2.5-7B-Instruct'")
    return Path(_snapshot_download(repo_id))


def _snapshot_download(repo_id: str) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS)
    except GatedRepoError:
        raise QwenMLXError(
            f"{repo_id}: the repo is gated; accept its terms on huggingface.co and run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise QwenMLXError(
            f"{repo_id}: no such model on the Hugging Face hub (check the spelling, or log in for a private repo)"
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise QwenMLXError(
            f"{repo_id}: not in the local Hugging Face cache and {why}; download it once with "
            f"`hf download {repo_id}` while online (or pass a local folder)"
        ) from None
    except HFValidationError as e:
        raise QwenMLXError(f"{repo_id}: not a valid Hugging Face repo id ({e})") from None
    except (HfHubHTTPError, OSError) as e:
        raise QwenMLXError(f"{repo_id}: download failed ({e}); check the connection, or pass a local folder") from None


def check_safetensors(path: Path) -> list[str]:
    """The tensor names in a safetensors file, after checking that its header and size are whole.

    A truncated download or a corrupt file is named here, not deep inside MLX at the first matmul.
    """
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
    return list(header)


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


def load_model(path_or_repo: str | os.PathLike[str], lazy: bool = False) -> tuple[Qwen2, Path]:
    """The Qwen2 model of a folder or repo id, with its weights checked against config.json."""
    folder = resolve_model_path(path_or_repo)
    config = ModelConfig.from_file(folder / "config.json")
    weights, origin = load_weights(folder)
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if config.tie_word_embeddings:
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    model = Qwen2(config)
    if config.quantization:
        prepare_quantized(model, config.quantization, weights)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise QwenMLXError(
            f"{folder}: weight {missing[0]} is missing ({len(missing)} missing in all); "
            f"the weights do not match config.json"
        )
    for name, array in weights.items():
        if name not in expected:
            raise QwenMLXError(f"{origin[name]}: unexpected weight {name}; is this a Qwen2 model?")
        if array.shape != expected[name].shape:
            raise QwenMLXError(
                f"{origin[name]}: {name} has shape {tuple(array.shape)} but config.json implies "
                f"{tuple(expected[name].shape)}; the config and the weights do not belong together"
            )
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    model.sampling_defaults = SamplingParams.from_generation_config(folder)
    return model, folder


def load(path_or_repo: str | os.PathLike[str] = DEFAULT_MODEL, lazy: bool = False) -> tuple[Qwen2, Tokenizer]:
    """Load a Qwen2 / Qwen2.5 model and its tokenizer from a local folder or a Hugging Face repo id.

    >>> model, tokenizer = load("mlx-community/Qwen2.5-7B-Instruct-4bit")
    """
    model, folder = load_model(path_or_repo, lazy=lazy)
    if model.config.quantization and mx.default_device().type == mx.DeviceType.cpu:
        prepare_for_cpu(model)
    return model, Tokenizer.from_folder(folder)
