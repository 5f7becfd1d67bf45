"""A model folder or Hugging Face repo id → (model, tokenizer). Safetensors only, checked before use."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen_mlx.config import ModelConfig
from qwen_mlx.cpu import prepare_for_cpu
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.memory import check_model_fits, plan_for_folder
from qwen_mlx.model import Qwen2
from qwen_mlx.quantize import prepare_quantized
from qwen_mlx.sample import SamplingParams
from qwen_mlx.tokenizer import Tokenizer
from qwen_mlx.weights import load_weights

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


def load_model(path_or_repo: str | os.PathLike[str], lazy: bool = False,
               context_length: int | None = None) -> tuple[Qwen2, Path]:
    """The Qwen2 model of a folder or repo id, with its weights checked against config.json; `context_length`
    as for `load`."""
    folder = resolve_model_path(path_or_repo)
    config = ModelConfig.from_file(folder / "config.json")
    if context_length is not None:
        config = config.with_context(context_length)
    check_model_fits(plan_for_folder(folder, config), folder)
    weights, origin = load_weights(folder)
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if config.tie_word_embeddings:
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    model = Qwen2(config, SamplingParams.from_generation_config(folder))
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
    return model, folder


def load(path_or_repo: str | os.PathLike[str] = DEFAULT_MODEL, lazy: bool = False,
         context_length: int | None = None) -> tuple[Qwen2, Tokenizer]:
    """Load a Qwen2 / Qwen2.5 model and its tokenizer from a local folder or a Hugging Face repo id.

    `context_length=N` sets the context: up to config.json's own length, a limit; past it (e.g. 131072 for a
    Qwen2.5 of 32768), YaRN on demand: plain RoPE while a conversation fits the original length, then one
    re-encode of the context with YaRN (factor N / original), after which it runs as a static-YaRN model.

    >>> model, tokenizer = load("mlx-community/Qwen2.5-7B-Instruct-4bit", context_length=131072)
    """
    model, folder = load_model(path_or_repo, lazy=lazy, context_length=context_length)
    if model.config.quantization and mx.default_device().type == mx.DeviceType.cpu:
        prepare_for_cpu(model)
    return model, Tokenizer.from_folder(folder)
