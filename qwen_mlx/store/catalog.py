"""The models on this machine: Qwen2 repos in the Hugging Face cache and model folders under $QWEN_MLX_HOME/models
(where `convert` output and the demo model can live), with what `qwen-mlx list` shows, and their removal.

Nothing here downloads. Removal never reaches outside those two places: cached repos go through
huggingface_hub's own cache management (`scan_cache_dir` + `delete_revisions`), folders are removed only when they
sit directly inside $QWEN_MLX_HOME/models (a symlink there loses the link, never its target).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import data_home, replaced_atomically
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.store.names import aliases_of, looks_like_repo_id, repo_for_alias

log = logging.getLogger(__name__)

USAGE_FILE = "last-used.json"  # under data_home(): when each local model was last loaded
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class LocalModel:
    """A model on disk that qwen-mlx can load (a Qwen2 config.json)."""

    name: str  # the repo id (Hugging Face cache) or the folder's name ($QWEN_MLX_HOME/models)
    folder: Path  # what `load` reads: the snapshot of the cached repo, or the folder
    repo_id: str | None  # the Hugging Face cache repo it is; None: a folder (under $QWEN_MLX_HOME/models, say)
    size: int  # bytes on disk (every cached revision: what `rm` frees)
    modified: float  # seconds since the epoch
    config: dict[str, Any] = field(repr=False)
    revision: str | None = None  # the snapshot's commit hash

    @property
    def in_cache(self) -> bool:
        return self.repo_id is not None

    @property
    def aliases(self) -> list[str]:
        return aliases_of(self.repo_id) if self.repo_id else []

    @property
    def bits(self) -> str:
        """"4-bit", "8-bit" for quantized weights, else the float type ("bf16")."""
        quantization = self.config.get("quantization") or self.config.get("quantization_config") or {}
        if isinstance(quantization, dict) and quantization.get("bits"):
            return f"{quantization['bits']}-bit"
        dtype = str(self.config.get("torch_dtype") or self.config.get("dtype") or "")
        return DTYPE_NAMES.get(dtype, dtype or "?")

    @property
    def context_length(self) -> int | None:
        try:
            return ModelConfig.from_dict(self.config).context_length
        except QwenMLXError:
            return None

    @property
    def digest(self) -> str:
        """A stable id of this exact copy: the commit for a cached repo, else a hash of the files' names, sizes and
        modification times (it changes when the folder does)."""
        if self.revision:
            return self.revision
        entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.folder.iterdir()
                         if p.is_file())
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()

    def matches(self, name: str) -> bool:
        """`name` calls this model: its name, its repo id or an alias (an Ollama client's ":latest" tag allowed)."""
        given = name.strip()
        wanted = given.removesuffix(":latest")
        return wanted in (self.name, self.repo_id) or given.lower() in self.aliases


def models_home() -> Path:
    return data_home() / "models"


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def runnable_config(folder: Path) -> dict[str, Any] | None:
    """config.json of a folder qwen-mlx can load (a Qwen2 with weights), else None."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") != "qwen2":
        return None
    return config if any(folder.glob("*.safetensors")) else None


def local_models() -> list[LocalModel]:
    """Every local model, the cache's first, each list by name."""
    return sorted(cached_models(), key=lambda m: m.name.lower()) + sorted(home_models(), key=lambda m: m.name)


def cached_models() -> list[LocalModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        scan = scan_cache_dir(hub_cache())
    except CacheNotFound:
        return []
    found = []
    for repo in scan.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        # The revision refs/main names (what a plain download gives), else the newest one.
        revision = max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        config = runnable_config(revision.snapshot_path)
        if config is not None:
            found.append(LocalModel(repo.repo_id, revision.snapshot_path, repo.repo_id, repo.size_on_disk,
                                    repo.last_modified, config, revision.commit_hash))
    return found


def home_models() -> list[LocalModel]:
    home = models_home()
    if not home.is_dir():
        return []
    found = []
    for folder in home.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():
            continue  # a build in progress (the demo's, a conversion's) or a stray file
        config = runnable_config(folder)
        if config is not None:
            found.append(_folder_model(folder.name, folder, config))
    return found


def _folder_model(name: str, folder: Path, config: dict[str, Any]) -> LocalModel:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return LocalModel(name, folder, None, sum(p.stat().st_size for p in files),
                      max((p.stat().st_mtime for p in files), default=0.0), config)


def describe_folder(name: str, folder: Path) -> LocalModel:
    """The model in `folder`, called `name`: the catalog's entry when it is a local model (its repo, size on disk,
    revision), else what the folder itself says."""
    real = folder.resolve()
    known = next((m for m in local_models() if m.folder.resolve() == real), None)
    if known is not None:
        return replace(known, name=name)
    config = runnable_config(folder)
    if config is None:
        raise QwenMLXError(f"{folder}: not a Qwen2 model folder (config.json with model_type qwen2, *.safetensors)")
    return _folder_model(name, folder, config)


def find_local(name: str) -> LocalModel | None:
    """The local model `name` calls, in the one order every command and API follows (the README's models
    section): a folder under $QWEN_MLX_HOME/models by that name, then a repo in the Hugging Face cache by its id or
    alias. The folder comes first because its name is the user's own choice, even one that reads like an alias."""
    return find_home(name) or next((m for m in cached_models() if m.matches(name)), None)


def find_home(name: str) -> LocalModel | None:
    """The folder under $QWEN_MLX_HOME/models that `name` calls (Ollama's ":latest" tag allowed)."""
    return next((m for m in home_models() if m.matches(name)), None)


def repo_id_for(name: str) -> str | None:
    """The repo id `name` stands for: an alias's repo, or the name itself when it is a repo id."""
    stripped = name.strip()
    return repo_for_alias(stripped) or (stripped if looks_like_repo_id(stripped) else None)


def remove(model: LocalModel) -> None:
    """Delete `model` from disk: only ever inside the Hugging Face cache or $QWEN_MLX_HOME/models."""
    if model.in_cache:
        _remove_cached(model)
    else:
        _remove_home(model)
    forget_use(model.name)


def _remove_cached(model: LocalModel) -> None:
    from huggingface_hub import scan_cache_dir

    cache = hub_cache().resolve()
    scan = scan_cache_dir(cache)
    repo = next((r for r in scan.repos if r.repo_type == "model" and r.repo_id == model.repo_id), None)
    if repo is None:
        raise QwenMLXError(f"{model.repo_id}: no longer in the Hugging Face cache ({cache})")
    if repo.repo_path.resolve().parent != cache:
        raise QwenMLXError(f"{repo.repo_path}: not inside the Hugging Face cache {cache}; not removed")
    scan.delete_revisions(*(r.commit_hash for r in repo.revisions)).execute()


def _remove_home(model: LocalModel) -> None:
    home = models_home().resolve()
    folder = home / model.folder.name
    if model.folder.parent.resolve() != home or not (folder.is_symlink() or folder.is_dir()):
        raise QwenMLXError(f"{model.folder}: not a model folder directly inside {home}; not removed")
    if folder.is_symlink():
        folder.unlink()  # the link is ours; what it points to is the user's
    else:
        shutil.rmtree(folder)


def _read_usage() -> dict[str, float]:
    try:
        data = json.loads((data_home() / USAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int | float)} \
        if isinstance(data, dict) else {}


def _write_usage(usage: dict[str, float]) -> None:
    path = data_home() / USAGE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp:
            tmp.write_text(json.dumps(usage, indent=1, sort_keys=True), encoding="utf-8")
    except OSError as e:  # a read-only home: the model still loads, `list` just cannot say when it last did
        log.debug("could not record model use in %s: %s", path, e)


def record_use(name: str) -> None:
    """Note that the local model `name` was loaded now (two processes at once may lose one note: harmless)."""
    _write_usage({**_read_usage(), name: time.time()})


def forget_use(name: str) -> None:
    usage = _read_usage()
    if usage.pop(name, None) is not None:
        _write_usage(usage)


def last_used(name: str) -> float | None:
    return _read_usage().get(name)


def describe_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def environment_note() -> str:
    """Where the models are looked for, for messages."""
    return f"the Hugging Face cache ({hub_cache()}) and {models_home()}"

