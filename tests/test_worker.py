"""ModelWorker: every MLX op on its own thread, requests from any thread, per-session caches, failures contained."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hf_models import save_tiny_qwen2

import qwen_mlx
from qwen_mlx import QwenMLXError
from qwen_mlx.engine.worker import Job, ModelWorker, WorkerBusy


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def worker(folder: Path) -> ModelWorker:
    worker = ModelWorker(lambda: qwen_mlx.load(folder))
    assert worker.wait_loaded(60) and worker.load_error is None
    yield worker
    worker.close()


def drain(job: Job) -> list[qwen_mlx.GenerationChunk]:
    chunks = []
    while not chunks or chunks[-1].finish_reason is None:
        chunk = job.get(timeout=60)
        assert chunk is not None, "the worker stopped answering"
        chunks.append(chunk)
    return chunks


def in_new_thread(fn):  # noqa: ANN001, ANN201
    """Run `fn` on a fresh thread, which has no MLX stream of its own (as Gradio's and uvicorn's workers)."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(value=fn()))
    thread.start()
    thread.join(120)
    return result["value"]


def test_requests_from_threads_without_an_mlx_stream_are_served(worker: ModelWorker, folder: Path) -> None:
    messages = [{"role": "user", "content": "hello"}]
    chunks = in_new_thread(lambda: drain(worker.submit("a", messages, temperature=0, max_tokens=6)))
    model, tokenizer = qwen_mlx.load(folder)
    expected = qwen_mlx.generate(model, tokenizer, messages, temperature=0, max_tokens=6)
    assert [c.token for c in chunks if c.token is not None] == expected.tokens
    assert chunks[-1].finish_reason == "length"


def test_a_session_reuses_its_turn_and_another_starts_from_the_shared_prefix(folder: Path) -> None:
    worker = ModelWorker(lambda: qwen_mlx.load(folder))
    try:
        first = [{"role": "user", "content": "one two three"}]
        stats = drain(worker.submit("s1", first, temperature=0, max_tokens=4))[-1].stats
        again = drain(worker.submit("s1", first, temperature=0, max_tokens=4))[-1].stats
        other = drain(worker.submit("s2", first, temperature=0, max_tokens=4))[-1].stats
        assert stats.prefilled_tokens == stats.prompt_tokens
        assert again.prefilled_tokens == 1  # the same prompt again: only its last token is recomputed
        assert other.prefilled_tokens == 1  # another conversation, the same prompt: computed once, shared
    finally:
        worker.close()


def test_cancel_ends_the_job_and_the_worker_goes_on(worker: ModelWorker) -> None:
    job = worker.submit("c", "count", temperature=0, max_tokens=500)
    assert job.get(timeout=60) is not None
    job.cancel()
    chunks = drain(job)
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].stats.generation_tokens < 500
    assert drain(worker.submit("c", "next", temperature=0, max_tokens=2))[-1].finish_reason == "length"


def test_user_errors_are_raised_to_the_caller_and_the_worker_goes_on(worker: ModelWorker) -> None:
    with pytest.raises(QwenMLXError, match="max_tokens"):
        drain(worker.submit("e", "hi", max_tokens=0))
    assert drain(worker.submit("e", "hi", temperature=0, max_tokens=2))[-1].finish_reason == "length"


def test_a_failed_load_is_reported_to_every_request() -> None:
    worker = ModelWorker(lambda: qwen_mlx.load("/no/such/model"))
    assert worker.wait_loaded(30)
    for _ in range(2):
        with pytest.raises(QwenMLXError, match="no such folder"):
            drain(worker.submit("x", "hi"))
    worker.close()


def test_conversations_share_their_common_prefix_and_keep_their_own_turns(folder: Path) -> None:
    """API clients send no session, only the whole conversation: each continues the cache it extends, and two
    conversations that share a system prompt share its KV without trimming each other's turns."""
    worker = ModelWorker(lambda: qwen_mlx.load(folder))
    try:
        assert worker.wait_loaded(60)
        system = list(range(20, 40))
        a, b = system + list(range(50, 90)), system + list(range(100, 140))

        def turn(prompt: list[int]) -> tuple[int, list[int]]:
            chunks = drain(worker.submit(None, prompt, temperature=0, max_tokens=3))
            return chunks[-1].stats.prefilled_tokens, [c.token for c in chunks if c.token is not None]

        prefilled_a, reply_a = turn(a)
        prefilled_b, reply_b = turn(b)
        assert prefilled_a == len(a)
        assert prefilled_b == len(b) - len(system)  # the system prompt came from a's turn
        # Each conversation's next turn finds its own turn whole: only its last reply token and the new ones run.
        assert turn(a + reply_a + [7, 8, 9])[0] == 4
        assert turn(b + reply_b + [7, 8, 9])[0] == 4
        stats = worker.cache_stats()
        assert (stats.hits, stats.misses, stats.ram_entries) == (3, 1, 2)  # the next turns took their turns
    finally:
        worker.close()


def test_a_full_queue_refuses_new_jobs(folder: Path) -> None:
    from qwen_mlx.engine.worker import WorkerBusy

    worker = ModelWorker(lambda: qwen_mlx.load(folder), max_queue=1)
    try:
        assert worker.wait_loaded(60)
        gate = threading.Event()
        worker._inbox.put(gate.wait)  # hold the thread, so submitted jobs wait
        first = worker.submit("a", [1, 2, 3], max_tokens=2)
        with pytest.raises(WorkerBusy, match="busy"):
            worker.submit("b", [1, 2, 3], max_tokens=2)
        gate.set()
        assert drain(first)[-1].finish_reason == "length"
        assert drain(worker.submit("b", [1, 2, 3], max_tokens=2))[-1].finish_reason == "length"
    finally:
        worker.close()


def test_a_client_that_cannot_be_notified_is_cancelled_and_the_worker_goes_on(worker: ModelWorker) -> None:
    """As when uvicorn's event loop has closed at shutdown: `call_soon_threadsafe` raises in the worker's thread."""

    def closed_loop() -> None:
        raise RuntimeError("Event loop is closed")

    gone = worker.submit("n", "hello", temperature=0, max_tokens=200, notify=closed_loop)
    assert gone.done.wait(60) and gone.cancelled.is_set()
    chunks = []
    while (chunk := gone.get(timeout=0)) is not None:
        chunks.append(chunk)
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) < 200
    assert drain(worker.submit("n2", "hi", temperature=0, max_tokens=3))[-1].finish_reason == "length"


def test_close_returns_in_bounded_time_whatever_the_thread_is_doing(folder: Path) -> None:
    import time

    worker = ModelWorker(lambda: qwen_mlx.load(folder))
    assert worker.wait_loaded(60)
    stuck = threading.Event()
    worker._inbox.put(stuck.wait)  # the thread is busy with something that does not end
    started = time.monotonic()
    assert worker.close(timeout=1) is False
    assert time.monotonic() - started < 3
    stuck.set()


def test_a_waiting_job_knows_how_many_wait_before_it(folder: Path) -> None:
    """The queue position the web UI shows ("N ahead of you") is the worker's own: one queue per model."""
    from qwen_mlx.engine.setup import slowed

    worker = ModelWorker(lambda: (lambda m, t: (slowed(m, 0.05), t))(*qwen_mlx.load(folder)), max_batch=1)
    try:
        jobs = [worker.submit(None, "one two", temperature=0, max_tokens=20) for _ in range(3)]
        assert jobs[0].started.wait(60)
        assert [worker.position(j) for j in jobs] == [0, 0, 1] and worker.waiting == 2
        for job in jobs:
            drain(job)
        assert [worker.position(j) for j in jobs] == [0, 0, 0] and worker.waiting == 0
    finally:
        worker.close()


def test_the_counters_keep_growing_across_an_unload_and_a_reload(folder: Path) -> None:
    from qwen_mlx.engine.worker import UsageCounters

    counters = UsageCounters()
    worker = ModelWorker(lambda: qwen_mlx.load(folder), counters=counters)
    try:
        drain(worker.submit(None, "one two", temperature=0, max_tokens=5))
        assert (counters.generated_tokens, counters.decode_passes) == (5, 5)
        assert worker.unload(60)
        with pytest.raises(WorkerBusy, match="unloaded"):  # a clear refusal, not a model that is not there
            worker.submit(None, "five", max_tokens=1)
        worker.reload(lambda: qwen_mlx.load(folder))
        drain(worker.submit(None, "three four", temperature=0, max_tokens=3))
        assert (counters.generated_tokens, counters.decode_passes) == (8, 8)
    finally:
        worker.close()
