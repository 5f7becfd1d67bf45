"""A model folder, name, alias or Hugging Face repo id → (model, tokenizer). Safetensors only, checked before use."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.cpu import WIDE_ROWS, prepare_for_cpu
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.model.parallel import Parallel, check_shardable, shard_model, start_group, weight_part
from qwen_mlx.model.qwen2 import Qwen2
from qwen_mlx.store.catalog import find_home, home_models, record_use, repo_id_for
from qwen_mlx.store.hub import download
from qwen_mlx.store.memory import (
    CPU_WEIGHTS_LABELS,
    check_model_fits,
    choose_cpu_weights,
    plan_for_folder,
    split_plan,
)
from qwen_mlx.store.names import unknown_name
from qwen_mlx.store.quantize import prepare_quantized
from qwen_mlx.store.weights import fingerprint, load_weights, read_tensor
from qwen_mlx.text.tokenizer import Tokenizer

DEFAULT_MODEL = "mlx-community/Qwen2.5-7B-Instruct-4bit"


def resolve_model_path(path_or_repo: str | os.PathLike[str]) -> Path:
    """A local folder as is; then in `catalog.find_local`'s order, a model folder under $QWEN_MLX_HOME/models by
    its name, an alias (`qwen2.5:7b`) or a Hugging Face repo id from the local cache, downloaded into it first when
    it is not there."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QwenMLXError(f"{path}: expected a model folder (with config.json and *.safetensors), got a file")
        return path
    name = str(path_or_repo)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        raise QwenMLXError(f"{name}: no such folder, and not a Hugging Face repo id like 'Qwen/Qwen2.5-7B-Instruct'")
    mine = find_home(name)
    if mine is not None:
        record_use(mine.name)
        return mine.folder
    repo_id = repo_id_for(name)
    if repo_id is None:
        raise unknown_name(name, [m.name for m in home_models()])
    folder = download(repo_id, name)
    record_use(repo_id)
    return folder


def load_model(path_or_repo: str | os.PathLike[str], lazy: bool = False, context_length: int | None = None,
               parallel: Parallel | None = None) -> tuple[Qwen2, Path]:
    """The Qwen2 model of a folder or repo id, with its weights checked against config.json; `context_length`
    as for `load`; with `parallel`, only this rank's part of it (`parallel.shard_model`)."""
    folder = resolve_model_path(path_or_repo)
    config = ModelConfig.from_file(folder / "config.json")
    if context_length is not None:
        config = config.with_context(context_length)
    plan = plan_for_folder(folder, config)
    check_model_fits(plan if parallel is None else split_plan(plan, parallel.size), folder)
    weights, origin = load_weights(folder)
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if config.tie_word_embeddings:
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    model = Qwen2(config, SamplingParams.from_generation_config(folder),
                  fingerprint(folder, sorted(set(origin.values()))))
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
        if mx.issubdtype(array.dtype, mx.floating) != mx.issubdtype(expected[name].dtype, mx.floating):
            kind = "floating-point" if mx.issubdtype(expected[name].dtype, mx.floating) else "packed integer"
            raise QwenMLXError(f"{origin[name]}: {name} is {array.dtype} where {kind} weights belong; the file is "
                               "not a Qwen2 checkpoint of this config")
    if parallel is not None:
        load_part(model, expected, origin, parallel)
        return model, folder
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, folder


def load_part(model: Qwen2, expected: dict[str, mx.array], origin: dict[str, Path], parallel: Parallel) -> None:
    """Shard `model` for this rank and read its slices of the weights, one tensor at a time."""
    check_shardable(model.config, parallel)
    parts = {name: weight_part(name, tuple(array.shape), model.config, parallel) for name, array in expected.items()}
    shard_model(model, parallel)
    local = {}
    for name, part in parts.items():
        if part is not None:
            local[part.name] = read_tensor(origin[name], name, part.axis, part.start, part.stop, part.length)
    model.update(tree_unflatten(list(local.items())))
    model.eval()
    # Every rank is ready before the first step, so a slow disk on one does not look like a lost peer.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=parallel.group))


def load(path_or_repo: str | os.PathLike[str] = DEFAULT_MODEL, lazy: bool = False,
         context_length: int | None = None, parallel: Parallel | str | None = None) -> tuple[Qwen2, Tokenizer]:
    """Load a Qwen2 / Qwen2.5 model and its tokenizer from a local folder, a model under $QWEN_MLX_HOME/models, an
    alias (`qwen2.5:7b`, see `names.ALIASES`) or a Hugging Face repo id.

    With `parallel` ("tensor" or "pipeline", or a `parallel.Parallel`), a process started by `mlx.launch` loads
    only its part of the model, to run it together with the others (see `qwen_mlx.model.parallel`).

    `context_length=N` sets the context: up to config.json's own length, a limit; past it (e.g. 131072 for a
    Qwen2.5 of 32768), YaRN on demand: plain RoPE while a conversation fits the original length, then one
    re-encode of the context with YaRN (factor N / original), after which it runs as a static-YaRN model.

    >>> model, tokenizer = load("mlx-community/Qwen2.5-7B-Instruct-4bit", context_length=131072)
    """
    if isinstance(parallel, str):
        parallel = start_group(parallel)
    model, folder = load_model(path_or_repo, lazy=lazy, context_length=context_length, parallel=parallel)
    if model.config.quantization and mx.default_device().type == mx.DeviceType.cpu:
        prepare_cpu_weights(model, folder, parallel)
    return model, Tokenizer.from_folder(folder)


def prepare_cpu_weights(model: Qwen2, folder: Path, parallel: Parallel | None) -> None:
    """A quantized model on MLX's CPU build: its weights held in float32 where the plan allows, else as stored with
    wide steps in float32 where an optimized BLAS serves (`memory.choose_cpu_weights`); `model.cpu_weights` says
    which and why. A split model's parts stay quantized (its layers are the shards')."""
    if parallel is not None:
        weights, why = "quantized", "a split model's parts stay as stored"
    else:
        weights, why = choose_cpu_weights(plan_for_folder(folder, model.config))
    wide_rows = WIDE_ROWS if weights == "wide" else None
    prepare_for_cpu(model, weights="float" if weights == "float" else "quantized", wide_rows=wide_rows)
    model.cpu_weights = f"{CPU_WEIGHTS_LABELS[weights]} ({why})"
