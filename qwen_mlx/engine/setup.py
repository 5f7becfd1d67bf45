"""Engines built from a typed settings object: the model worker a command runs on, the registry a server runs its
models in. The command line fills `EngineSettings` from its flags (`cli/flags.py`); a program can fill it itself.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn

from qwen_mlx.engine.lockstep import Lockstep
from qwen_mlx.engine.registry import LocalModels, ModelRegistry, ModelSource
from qwen_mlx.engine.speculative import DraftModel, load_draft
from qwen_mlx.engine.worker import CacheTiers, ModelWorker, UsageCounters, default_ram_bytes
from qwen_mlx.files import data_home
from qwen_mlx.model.cache import CacheSettings
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.parallel import Parallel
from qwen_mlx.store.catalog import models_home, record_use, repo_id_for
from qwen_mlx.store.load import DEFAULT_MODEL, load, resolve_model_path
from qwen_mlx.store.memory import check_context_fits, plan_for_folder, split_plan
from qwen_mlx.store.names import aliases_of
from qwen_mlx.store.synthetic import demo_model_folder
from qwen_mlx.text.tokenizer import Tokenizer

DEFAULT_CACHE_DISK_GB = 10.0
DEMO_NAME = "qwen2-demo"


@dataclass(frozen=True)
class EngineSettings:
    """The model and how it runs: everything the worker and the registry are built from.

    `step_delay` makes every model step sleep that many seconds first: a diagnostic that lets a tiny model stream
    slowly enough to watch, stop and disconnect from (the command line sets it from $QWEN_MLX_TOKEN_DELAY).
    """

    model: str = DEFAULT_MODEL
    demo: bool = False
    context: int | None = None
    cache: CacheSettings = field(default_factory=CacheSettings)
    draft_model: str | None = None
    num_draft_tokens: int | None = None
    prompt_lookup: int | None = None
    max_batch: int = 1
    max_queue: int | None = None
    cache_ram_gb: float | None = None
    cache_disk_gb: float | None = None
    max_models: int = 1
    keep_alive: float | None = 300.0  # seconds an idle model stays loaded; None: for ever
    step_delay: float = 0.0

    @property
    def speculation(self) -> dict[str, int | None]:
        """`stream_generate`'s speculation options every request gets unless it gives its own."""
        return {"num_draft_tokens": self.num_draft_tokens, "prompt_lookup": self.prompt_lookup}


def load_for_context(name: str | Path, settings: EngineSettings,
                     parallel: Parallel | None = None) -> tuple[nn.Module, Tokenizer]:
    """`load` with the settings' context (this rank's part with `parallel`), after checking that so many
    positions fit here with the cache settings (before any weight is read; `load` itself refuses weights that
    cannot fit at all)."""
    folder = resolve_model_path(name)
    if settings.context is not None:
        config = ModelConfig.from_file(folder / "config.json").with_context(settings.context)
        plan = plan_for_folder(folder, config)
        check_context_fits(plan if parallel is None else split_plan(plan, parallel.size), settings.context,
                           settings.cache, what=f"--context {settings.context}:")
    return load(folder, context_length=settings.context, parallel=parallel)


def served_model_name(settings: EngineSettings) -> str:
    """How a server names its model: "qwen2-demo", a local folder's name, or the repo id."""
    if settings.demo:
        return DEMO_NAME
    return Path(settings.model).name if Path(settings.model).is_dir() else settings.model


def model_source(settings: EngineSettings) -> ModelSource:
    """The model a server starts with, resolved (downloaded first if need be) before it serves; requests may call
    it by its served name, by what the settings said, or by an alias of its repo."""
    if settings.demo:
        return ModelSource(DEMO_NAME, demo_model_folder(data_home() / "models"), ("demo",), pinned=True)
    folder = resolve_model_path(settings.model)
    name = served_model_name(settings)
    # The repo's names only when the repo is what the name resolved to: a folder of that name (a path, or one
    # under $QWEN_MLX_HOME/models) is not the repo, and a request for the repo must not get it.
    from_repo = not Path(settings.model).expanduser().exists() and folder.parent != models_home()
    repo_id = repo_id_for(settings.model) if from_repo else None
    aliases = {settings.model, *([repo_id, *aliases_of(repo_id)] if repo_id else [])} - {name}
    return ModelSource(name, folder, tuple(sorted(aliases)), pinned=True)


def cache_tiers(settings: EngineSettings, parallel: Parallel | None = None) -> CacheTiers:
    """The prefix cache's memory and disk (none when split over processes: each machine's disk would hold other
    turns)."""
    ram = default_ram_bytes() if settings.cache_ram_gb is None else int(settings.cache_ram_gb * 1e9)
    if parallel is not None:
        return CacheTiers(ram)
    disk_gb = DEFAULT_CACHE_DISK_GB if settings.cache_disk_gb is None else settings.cache_disk_gb
    return CacheTiers(ram, data_home() / "kv-cache", int(disk_gb * 1e9))


def report_status(label: str) -> Callable[[str], None]:
    """A worker's progress (loading, loaded, unloaded) as one stderr line each."""
    return lambda message: print(f"qwen-mlx: {label}: {message}", file=sys.stderr, flush=True)


def start_worker(settings: EngineSettings, label: str, parallel: Parallel | None = None,
                 max_batch: int | None = None, folder: Path | None = None,
                 counters: UsageCounters | None = None) -> ModelWorker:
    """The model worker a command runs on: the settings' model loaded on its thread (this rank's part of it with
    `parallel`), its progress on stderr (rank 0's)."""

    def load_model() -> tuple[nn.Module, Tokenizer]:
        source = folder or (demo_model_folder(data_home() / "models") if settings.demo else settings.model)
        model, tokenizer = load_for_context(source, settings, parallel)
        return slowed(model, settings.step_delay), tokenizer

    speaks = parallel is None or parallel.leads
    return ModelWorker(load_model, cache=settings.cache, max_batch=max_batch or settings.max_batch,
                       max_queue=settings.max_queue, tiers=cache_tiers(settings, parallel),
                       options=settings.speculation, load_draft=draft_loader(settings),
                       on_status=report_status(label) if speaks else None,
                       lockstep=Lockstep(parallel.group) if parallel else None, counters=counters)


def draft_loader(settings: EngineSettings) -> Callable[[Tokenizer], DraftModel] | None:
    """What loads the settings' draft model once its target's tokenizer is known (to check they match)."""
    if not settings.draft_model:
        return None
    draft_model = settings.draft_model

    def draft_for(tokenizer: Tokenizer) -> DraftModel:
        return load_draft(draft_model, tokenizer, context_length=settings.context)

    return draft_for


def start_registry(settings: EngineSettings,
                   parallel: Parallel | None = None) -> tuple[ModelRegistry, ModelSource]:
    """The registry a server runs its models in, starting with the settings' model. Only that model gets the
    draft model (a draft must share its model's tokenizer) and the settings' context (another model runs with
    its own).

    With `parallel` it serves that one model only, loaded for the server's life: every rank holds its part.
    """
    pinned = model_source(settings)
    counters = UsageCounters()  # one set for the server: every model it loads counts into it

    def start(source: ModelSource, spare: ModelWorker | None) -> ModelWorker:
        if parallel is not None:
            return start_worker(settings, source.name, parallel, folder=source.folder, counters=counters)

        def load_source() -> tuple[nn.Module, Tokenizer]:
            model, tokenizer = load_for_context(source.folder, settings) if source.pinned else load(source.folder)
            if not source.pinned:
                record_use(source.name)
            return slowed(model, settings.step_delay), tokenizer

        draft = draft_loader(settings) if source.pinned else None
        if spare is not None:
            spare.reload(load_source, options=settings.speculation, load_draft=draft,
                         on_status=report_status(source.name))
            return spare
        return ModelWorker(load_source, cache=settings.cache, max_batch=settings.max_batch,
                           max_queue=settings.max_queue, options=settings.speculation, load_draft=draft,
                           on_status=report_status(source.name), tiers=cache_tiers(settings), counters=counters)

    registry = ModelRegistry(LocalModels([pinned], only_pinned=parallel is not None), start,
                             max_models=settings.max_models, keep_alive=None if parallel else settings.keep_alive,
                             resident=parallel is not None, counters=counters)
    return registry, pinned


class SlowedModel:
    """The model, sleeping `delay` seconds before each step (`EngineSettings.step_delay`)."""

    def __init__(self, model: nn.Module, delay: float):
        self._model, self._delay = model, delay

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self._delay)
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def slowed(model: nn.Module, delay: float) -> nn.Module:
    return SlowedModel(model, delay) if delay > 0 else model  # type: ignore[return-value]
