"""Several models behind one server: a request names its model, which is loaded on first use on a worker thread of
its own; at most `max_models` stay loaded (the least recently used idle one makes room), and one left idle for its
keep-alive is unloaded, its memory freed.

`ModelRegistry` is thread-safe and blocking (`acquire` waits for a load), so any server can use it: the HTTP
server calls it through `asyncio.to_thread`, so a load never holds up requests to models already loaded. Which
names exist is `LocalModels`' business: the models a server was started with (`--model`, `--demo`) and every
local model (`catalog`); nothing is downloaded on a request's behalf.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen_mlx.engine.lifecycle import Phase
from qwen_mlx.engine.worker import ModelWorker, UsageCounters
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.store.catalog import LocalModel, describe_folder, find_local, local_models
from qwen_mlx.store.memory import first_chunk_bytes, gb, memory_budget, plan_for_folder
from qwen_mlx.store.names import close_matches

log = logging.getLogger(__name__)

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default: 5 minutes
ACQUIRE_TIMEOUT_S = 600.0  # how long a request waits for a busy model to make room
POLL_S = 0.25  # how often idle models are checked against their keep-alive
# Ollama parses keep_alive into Go's time.Duration, which ends at about 292 years; anything longer is "for ever"
# here too, so that no keep-alive is past what a timestamp (/api/ps's expires_at) can hold.
LONGEST_KEEP_ALIVE_S = 290 * 365 * 86400.0


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: object, what: str = "keep_alive") -> float | None:
    """A keep-alive as Ollama takes it: seconds as a number, or a Go duration ("5m", "1h30m", "90s"); a negative
    one, or one of centuries (past `LONGEST_KEEP_ALIVE_S`), keeps the model loaded for ever (None); 0 unloads it as
    soon as it is idle."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise QwenMLXError(f"{what} must be a number of seconds or a duration like '5m', not {value!r}", "keep_alive")
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise QwenMLXError(f"{what} {value!r} is not a duration; use e.g. '5m', '1h', '30s', '0' or '-1' "
                                   "(for ever)", "keep_alive") from None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
        value = sign * seconds
    if value != value or value in (float("inf"), float("-inf")):  # NaN or infinite: no duration
        raise QwenMLXError(f"{what} {value!r} is not a duration", "keep_alive")
    return None if value < 0 or value > LONGEST_KEEP_ALIVE_S else float(value)


class ModelNotFound(QwenMLXError):
    """No local model goes by the name a request gave (an HTTP 404)."""


class ModelsBusy(QwenMLXError):
    """Every loaded model is busy and none could make room in time (an HTTP 503)."""


@dataclass(frozen=True)
class ModelSource:
    """A model a server can load: the name it answers to (and its aliases), and its folder."""

    name: str
    folder: Path
    aliases: tuple[str, ...] = ()
    pinned: bool = False  # given on the command line (--model, --demo): its own options, e.g. a draft model

    @property
    def key(self) -> str:
        """Two names for the same files are one model."""
        return str(self.folder.resolve())

    def answers_to(self, name: str) -> bool:
        return name == self.name or name in self.aliases


@dataclass(eq=False)
class LoadedModel:
    """A model with a worker (loading or loaded), as the registry tracks it."""

    source: ModelSource
    worker: ModelWorker
    keep_alive: float | None  # seconds idle before it is unloaded; None: never
    last_used: float  # the registry's clock
    started: float = field(default_factory=time.monotonic)
    loaded_at: float | None = None  # wall-clock time the load finished
    load_seconds: float = 0.0
    size: int = 0  # bytes of its weights in memory
    pending: int = 0  # requests holding it between `acquire` and `release` (not yet submitted to the worker)

    @property
    def name(self) -> str:
        return self.source.name

    def expires_in(self, now: float) -> float | None:
        """Seconds until the keep-alive unloads it (None: never), counted from its last use."""
        return None if self.keep_alive is None else max(0.0, self.last_used + self.keep_alive - now)


Starter = Callable[[ModelSource, ModelWorker | None], ModelWorker]  # a worker loading the source (reusing the given
# unloaded one when there is one)


class ModelRegistry:
    """The loaded models of one server: load on first use, least recently used out, idle ones unloaded."""

    def __init__(self, models: LocalModels, start: Starter, *, max_models: int = 1,
                 keep_alive: float | None = DEFAULT_KEEP_ALIVE_S, clock: Callable[[], float] = time.monotonic,
                 resident: bool = False, budget: Callable[[], int] | None = None,
                 counters: UsageCounters | None = None):
        if max_models < 1:
            raise QwenMLXError(f"max_models {max_models} must be at least 1", "max_models")
        self.models = models
        self.max_models = max_models
        self.keep_alive = keep_alive
        # True: a model once loaded stays for the server's life, whatever a request says (one split over
        # processes, `parallel`: the other ranks hold their parts of it and cannot load another).
        self.resident = resident
        self._start = start
        self._clock = clock
        self._loaded: dict[str, LoadedModel] = {}
        self._unloading = 0  # models being unloaded: they still hold their memory, so they count against the limit
        self._unloading_bytes = 0  # ... and their planned bytes against the memory budget
        # Bytes MLX may use here (the memory plan's budget): a model is loaded only where it fits beside the others.
        self._budget = budget or (lambda: memory_budget().nbytes)
        self._planned: dict[str, int] = {}  # source key → the memory plan's bytes for it: weights, a first chunk
        self._spare: list[ModelWorker] = []  # unloaded workers whose threads wait for the next model
        self._cond = threading.Condition()
        self._closed = False
        self.counters = counters or UsageCounters()  # the workers `start` makes count into it (engine/setup.py)
        self._reaper = threading.Thread(target=self._reap, name="qwen-mlx-keep-alive", daemon=True)
        self._reaper.start()

    def acquire(self, name: str, timeout: float = ACQUIRE_TIMEOUT_S) -> LoadedModel:
        """The model `name` calls, loaded (this waits for the load, and for room when every slot is busy). Hand it
        back with `release` once its job is submitted: from then on the worker's own queue keeps it in use."""
        source = self._loaded_source(name) or self.models.resolve(name)
        deadline = self._clock() + timeout
        entry = self._claim(source, deadline)
        if not entry.worker.wait_loaded(max(0.0, deadline - self._clock())):
            self.release(entry)
            raise ModelsBusy(f"model {name!r} is still loading after {timeout:.0f} s; retry shortly")
        if entry.worker.load_error is not None:
            with self._cond:
                entry.pending -= 1
                if self._loaded.get(source.key) is entry:
                    self._take_out(entry)
            self._retire(entry)
            raise entry.worker.load_error
        if entry.loaded_at is None:
            with self._cond:
                if entry.loaded_at is None:
                    entry.load_seconds = time.monotonic() - entry.started
                    model = entry.worker.model
                    assert model is not None  # loaded without error, and claimed (`pending`): not unloaded
                    # tree_flatten's stub covers its `destination` modes too; without one it returns pairs.
                    parameters = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
                    entry.size = sum(a.nbytes for _, a in parameters)
                    entry.loaded_at = time.time()
        return entry

    def release(self, entry: LoadedModel, keep_alive: float | None | str = "default") -> None:
        """The request is done with `entry` (its job, if any, is with the worker). `keep_alive` (seconds, None for
        ever) sets how long it stays loaded once idle, from now on; "default": the registry's."""
        with self._cond:
            entry.pending -= 1
            entry.last_used = self._clock()
            if keep_alive != "default" and not self.resident:
                entry.keep_alive = keep_alive  # type: ignore[assignment]
            self._cond.notify_all()

    def loaded(self) -> list[LoadedModel]:
        """The models with a worker now (loading or loaded), most recently used first."""
        with self._cond:
            return sorted(self._loaded.values(), key=lambda e: e.last_used, reverse=True)

    def find_loaded(self, name: str) -> LoadedModel | None:
        with self._cond:
            return next((e for e in self._loaded.values() if e.source.answers_to(name)), None)

    def unload(self, name: str, *, if_idle: bool = False) -> bool:
        """Unload the model `name` calls now if it is idle, else as soon as it is (with `if_idle`, a busy one is
        left as it was: a delete refused as busy must change nothing); False if it is not loaded."""
        entry = self.find_loaded(name)
        if entry is None:
            return False
        if self.resident:
            raise QwenMLXError(f"model {name!r} stays loaded: it is split over processes (--parallel), each holding "
                               "its part, for as long as the server runs")
        with self._cond:
            idle = self._loaded.get(entry.source.key) is entry and entry.pending == 0 and entry.worker.idle
            if idle:
                self._take_out(entry)
            elif not if_idle:
                entry.keep_alive = 0.0
        if idle:
            self._retire(entry)
        return True

    def cancel_all(self) -> None:
        """The server is stopping: every running and waiting job ends within a token."""
        for entry in self.loaded():
            entry.worker.cancel_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for entry in self.loaded():
            entry.worker.close()

    # --- inside ---

    def _loaded_source(self, name: str) -> ModelSource | None:
        entry = self.find_loaded(name)
        return entry.source if entry is not None else None

    def _claim(self, source: ModelSource, deadline: float) -> LoadedModel:
        """The entry for `source` with a pending use counted, started (after making room) if it has none."""
        self._plan(source)  # the headers are read here, not under the lock every request waits on
        while True:
            victim = None
            with self._cond:
                entry = self._loaded.get(source.key)
                if entry is not None:
                    entry.pending += 1
                    entry.last_used = self._clock()
                    return entry
                room = self._room_for(source)
                if len(self._loaded) + self._unloading < self.max_models and room is None:
                    worker = self._start(source, self._spare.pop() if self._spare else None)
                    entry = LoadedModel(source, worker, self.keep_alive, self._clock(), pending=1)
                    self._loaded[source.key] = entry
                    return entry
                victim = self._least_recently_used_idle()
                if victim is not None:
                    self._take_out(victim)
                elif not self._cond.wait(min(POLL_S, max(0.0, deadline - self._clock()))) and \
                        self._clock() >= deadline:
                    if room is not None:
                        raise ModelsBusy(f"{source.name!r} needs {room} beside the loaded models, which are busy; "
                                         "retry later")
                    raise ModelsBusy(f"all {self.max_models} loaded models are busy, so {source.name!r} cannot be "
                                     "loaded now; retry later, or raise --max-models")
            if victim is not None:
                log.info("unloading %s to make room for %s", victim.name, source.name)
                self._retire(victim)

    def _plan(self, source: ModelSource) -> None:
        """The memory plan's bytes for `source` (weights and a first chunk), from its headers, once."""
        if source.key in self._planned:
            return
        try:
            plan = plan_for_folder(source.folder)
            need = plan.weights + first_chunk_bytes(plan)
        except QwenMLXError:
            need = 0  # an unreadable folder: the load names what is wrong with it
        with self._cond:
            self._planned[source.key] = need

    def _room_for(self, source: ModelSource) -> str | None:
        """None if `source` fits in memory beside the models loaded (and those still unloading), by the memory
        plan; else what it needs against what is left. With nothing else loaded it is always tried: a model that
        fits nowhere is refused by `load` in its own words. Called under the lock, after `_plan`."""
        held = sum(self._planned.get(e.source.key, 0) for e in self._loaded.values()) + self._unloading_bytes
        if held == 0:
            return None
        need, left = self._planned.get(source.key, 0), self._budget() - held
        return None if need <= left else f"{gb(need)} of memory and {gb(max(0, left))} is left"

    def _take_out(self, entry: LoadedModel) -> None:
        """Move `entry` from the loaded models to those unloading (under the lock); `_retire` unloads it."""
        del self._loaded[entry.source.key]
        self._unloading += 1
        self._unloading_bytes += self._planned.get(entry.source.key, 0)

    def _least_recently_used_idle(self) -> LoadedModel | None:
        idle = [e for e in self._loaded.values() if e.pending == 0 and e.worker.loaded and e.worker.idle]
        return min(idle, key=lambda e: e.last_used, default=None)

    def _retire(self, entry: LoadedModel) -> None:
        """Unload `entry` (already out of `_loaded`, counted in `_unloading`) and keep its thread for the next."""
        try:
            if not entry.worker.unload():
                log.warning("model %s did not unload in time; its thread is abandoned", entry.name)
        finally:
            with self._cond:
                self._unloading -= 1
                self._unloading_bytes -= self._planned.get(entry.source.key, 0)
                if entry.worker.phase is Phase.UNLOADED:
                    self._spare.append(entry.worker)
                self._cond.notify_all()

    def _reap(self) -> None:
        """Unload the models idle past their keep-alive (a busy model's idle time starts when it is idle again)."""
        while True:
            with self._cond:
                self._cond.wait(POLL_S)
                if self._closed:
                    return
                now = self._clock()
                expired = []
                for entry in list(self._loaded.values()):
                    if entry.pending or not entry.worker.loaded:
                        continue
                    if not entry.worker.idle:
                        entry.last_used = now
                    elif entry.keep_alive is not None and now - entry.last_used >= entry.keep_alive:
                        self._take_out(entry)
                        expired.append(entry)
            for entry in expired:
                log.info("unloading %s: idle for its keep-alive", entry.name)
                self._retire(entry)


class LocalModels:
    """The names a server answers to: the models it was started with, then every local model (`catalog`)."""

    def __init__(self, pinned: list[ModelSource], only_pinned: bool = False):
        self.pinned = pinned
        self.only_pinned = only_pinned  # no other local model may be loaded (a model split over processes)

    def resolve(self, name: str) -> ModelSource:
        if not isinstance(name, str) or not name.strip():
            raise QwenMLXError("model must name a model (see GET /v1/models)", "model")
        pinned = next((s for s in self.pinned if s.answers_to(name)), None)
        if pinned is not None:
            return pinned
        if self.only_pinned:
            raise ModelNotFound(f"model {name!r}: this server runs only {self.pinned[0].name!r}, split over processes "
                                "(--parallel)", "model")
        model = find_local(name)
        if model is None:
            matches = close_matches(name, [m.name for m in self.listing()])
            hint = f" (did you mean {', '.join(matches)}?)" if matches else ""
            raise ModelNotFound(f"model {name!r} is not on this machine{hint}; download it with `qwen-mlx pull "
                                f"{name}` or POST /api/pull", "model")
        return self.source_of(model)

    def source_of(self, model: LocalModel) -> ModelSource:
        key = str(model.folder.resolve())
        pinned = next((s for s in self.pinned if s.key == key), None)
        return pinned or ModelSource(model.name, model.folder, tuple(model.aliases))

    def listing(self) -> list[LocalModel]:
        """Every model a request may name, each once (by the name it answers to), the pinned ones first."""
        found = [describe_folder(s.name, s.folder) for s in self.pinned]
        if self.only_pinned:
            return found
        keys = {s.key for s in self.pinned}
        for model in local_models():
            if str(model.folder.resolve()) not in keys:
                keys.add(str(model.folder.resolve()))
                found.append(model)
        return found
