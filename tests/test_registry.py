"""`registry.ModelRegistry` in-process with real tiny models: load on first use, least recently used out with its
memory returned, keep-alive, a busy model kept, a slow load blocking no other model, and names as requests give
them (`LocalModels`)."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import pytest

from qwen_mlx.engine.lifecycle import Phase
from qwen_mlx.engine.registry import (
    LocalModels,
    ModelNotFound,
    ModelRegistry,
    ModelsBusy,
    ModelSource,
    keep_alive_seconds,
)
from qwen_mlx.engine.worker import ModelWorker
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.store.load import load_model
from qwen_mlx.store.memory import first_chunk_bytes, plan_for_folder
from qwen_mlx.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def folders(tiny_model_dir: Callable[..., Path]) -> dict[str, Path]:
    return {"a": tiny_model_dir("reg-a", max_position_embeddings=256),
            "b": tiny_model_dir("reg-b", max_position_embeddings=256, hidden_size=32, num_attention_heads=2,
                                num_key_value_heads=1)}


TOKENIZERS: dict[Path, Tokenizer] = {}  # reading Qwen's tokenizer.json takes seconds; the weights load afresh


class Starts:
    """A registry's `start`: real workers over the tiny models, each load optionally held until its gate opens."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.loads: list[str] = []
        self.reused = 0

    def __call__(self, source: ModelSource, spare: ModelWorker | None) -> ModelWorker:
        def load() -> tuple[object, object]:
            gate = self.gates.get(source.name)
            if gate is not None:
                assert gate.wait(30)
            self.loads.append(source.name)
            if source.folder not in TOKENIZERS:
                TOKENIZERS[source.folder] = Tokenizer.from_folder(source.folder)
            return load_model(source.folder)[0], TOKENIZERS[source.folder]

        if spare is not None:
            self.reused += 1
            spare.reload(load)
            return spare
        return ModelWorker(load)


@pytest.fixture
def make_registry(folders: dict[str, Path]) -> Iterator[Callable[..., tuple[ModelRegistry, Starts]]]:
    made: list[ModelRegistry] = []

    def make(**options: object) -> tuple[ModelRegistry, Starts]:
        starts = Starts()
        models = LocalModels([ModelSource(n, f, (f"alias-{n}",), pinned=True) for n, f in folders.items()])
        registry = ModelRegistry(models, starts, **options)  # type: ignore[arg-type]
        made.append(registry)
        return registry, starts

    yield make
    for registry in made:
        registry.close()


def reply(registry: ModelRegistry, name: str, max_tokens: int = 6) -> str:
    entry = registry.acquire(name)
    try:
        job = entry.worker.submit(None, "Hello there", max_tokens=max_tokens, temperature=0)
    finally:
        registry.release(entry)
    text = []
    while True:
        chunk = job.get(timeout=60)
        text.append(chunk.text)
        if chunk.finish_reason is not None:
            return "".join(text)


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_each_name_gets_its_own_model_and_the_least_recently_used_makes_room(make_registry) -> None:
    registry, starts = make_registry(max_models=1)
    gc.collect()  # what earlier tests left to the collector must not be freed between the measurements
    baseline = mx.get_active_memory()
    first = reply(registry, "a")
    with_a = mx.get_active_memory()
    entry_a = registry.loaded()[0]
    assert entry_a.name == "a" and entry_a.size > 0 and with_a - baseline >= entry_a.size
    assert reply(registry, "alias-a") == first  # an alias is the same model: no second load
    assert starts.loads == ["a"]
    model_a = weakref.ref(entry_a.worker.model)
    reply(registry, "b")
    threads = threading.active_count()
    assert [e.name for e in registry.loaded()] == ["b"]
    gc.collect()
    assert model_a() is None  # nothing holds a's model any more
    b_size = registry.loaded()[0].size
    # a's weights and caches are gone: what is left is b's (smaller) model and b's caches.
    assert mx.get_active_memory() - baseline < entry_a.size + b_size // 2 + (with_a - baseline - entry_a.size)
    assert mx.get_active_memory() < with_a
    # Back to a: a's answer as before, on the thread b's model had (swapping models piles up no threads).
    assert reply(registry, "a") == first
    assert starts.loads == ["a", "b", "a"] and starts.reused == 2
    assert threading.active_count() == threads


def planned_bytes(folder: Path) -> int:
    plan = plan_for_folder(folder)
    return plan.weights + first_chunk_bytes(plan)


def test_a_model_loads_beside_another_only_where_the_memory_plan_says_both_fit(make_registry,
                                                                                folders: dict[str, Path]) -> None:
    need = {name: planned_bytes(folder) for name, folder in folders.items()}
    roomy, _ = make_registry(max_models=2, budget=lambda: need["a"] + need["b"])
    reply(roomy, "a")
    reply(roomy, "b")
    assert sorted(e.name for e in roomy.loaded()) == ["a", "b"]

    tight, starts = make_registry(max_models=2, budget=lambda: need["a"] + need["b"] - 1)
    first = reply(tight, "a")
    reply(tight, "b")  # a is idle: it makes room, as the least recently used does for --max-models
    assert [e.name for e in tight.loaded()] == ["b"]
    assert reply(tight, "a") == first and starts.loads == ["a", "b", "a"]

    # With the loaded model busy, the other waits for it, then is refused with the sizes.
    held = tight.acquire("a")
    try:
        with pytest.raises(ModelsBusy, match=r"'b' needs .* of memory and .* is left beside the loaded models"):
            tight.acquire("b", timeout=0.5)
    finally:
        tight.release(held)
    assert [e.name for e in tight.loaded()] == ["a"]


def test_keep_alive_unloads_an_idle_model_and_returns_its_memory(make_registry) -> None:
    now = [1000.0]
    registry, _ = make_registry(max_models=2, keep_alive=60.0, clock=lambda: now[0])
    baseline = mx.get_active_memory()
    reply(registry, "a")
    entry = registry.loaded()[0]
    entry_b = registry.acquire("b")
    registry.release(entry_b, keep_alive=None)  # this one stays for ever
    now[0] += 59
    time.sleep(0.6)
    assert {e.name for e in registry.loaded()} == {"a", "b"}
    now[0] += 2
    wait_for(lambda: [e.name for e in registry.loaded()] == ["b"] and entry.worker.phase is Phase.UNLOADED)
    assert entry.worker.model is None
    assert mx.get_active_memory() - baseline < entry.size


def test_a_request_keep_alive_of_zero_unloads_once_idle(make_registry) -> None:
    registry, _ = make_registry(max_models=1)
    entry = registry.acquire("a")
    registry.release(entry, keep_alive=0.0)
    wait_for(lambda: not registry.loaded())


def test_a_busy_model_is_not_unloaded_for_another(make_registry) -> None:
    registry, _ = make_registry(max_models=1)
    entry = registry.acquire("a")
    job = entry.worker.submit(None, "Tell me a long story", max_tokens=200, temperature=0)
    registry.release(entry)
    with pytest.raises(ModelsBusy, match="busy"):
        registry.acquire("b", timeout=0.5)
    job.cancel()
    while job.get(timeout=30).finish_reason is None:
        pass
    assert registry.acquire("b").name == "b"


def test_a_slow_load_does_not_hold_up_a_loaded_model(make_registry) -> None:
    registry, starts = make_registry(max_models=2)
    reply(registry, "a")
    starts.gates["b"] = threading.Event()
    loading = threading.Thread(target=reply, args=(registry, "b"))
    loading.start()
    wait_for(lambda: len(registry.loaded()) == 2)
    started = time.monotonic()
    assert reply(registry, "a")  # answered while b is still loading
    assert time.monotonic() - started < 20 and loading.is_alive()
    starts.gates["b"].set()
    loading.join(60)
    assert starts.loads == ["a", "b"]


def test_a_failed_load_is_the_request_error_and_the_next_request_tries_again(make_registry,
                                                                             tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    registry, _ = make_registry(max_models=1)
    registry.models.pinned.append(ModelSource("broken", broken, pinned=True))
    for _ in range(2):
        with pytest.raises(QwenMLXError, match="broken: no tokenizer.json"):
            registry.acquire("broken")
        assert registry.loaded() == []
    assert reply(registry, "a")


def test_an_unknown_name_is_not_found_with_the_close_names(make_registry) -> None:
    registry, _ = make_registry()
    with pytest.raises(ModelNotFound, match="qwen-mlx pull") as error:
        registry.acquire("qwen2.5:8b")
    assert "qwen2.5:7b" in str(error.value)


@pytest.mark.parametrize(("value", "seconds"), [("5m", 300.0), ("1h30m", 5400.0), ("90s", 90.0), ("500ms", 0.5),
                                                ("0", 0.0), (0, 0.0), (2.5, 2.5), ("300", 300.0), ("-1", None),
                                                (-1, None), ("-5m", None), ("300000000000", None), (1e300, None),
                                                ("2562047h", None), ("2500000h", 2500000 * 3600.0)])
def test_keep_alive_takes_ollama_durations(value: object, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["5x", "", "m", "1h 5m", True, None, [5], float("nan")])
def test_keep_alive_refuses_what_is_no_duration(value: object) -> None:
    with pytest.raises(QwenMLXError, match="keep_alive"):
        keep_alive_seconds(value)
