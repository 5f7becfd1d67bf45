"""ModelWorker: one thread owns the model and runs every MLX operation; other threads send it requests.

MLX streams are thread-local (mlx >= 0.31.2), and web servers run handlers on whichever thread is free, so the
model, its caches and every array they touch stay on the worker's thread and its own stream. A request (`Job`)
carries the prompt, a cancel flag and a queue that the worker fills with `GenerationChunk`s, the last of which
has a `finish_reason` (or with the exception that ended it). One generation runs at a time; with `max_queue`,
at most that many wait, and `submit` raises `WorkerBusy` beyond it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.cache import PromptCache, longest_common_prefix
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate import GenerationChunk, Prompt, stream_generate
from qwen_mlx.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ANONYMOUS = "\0anonymous:"  # session names of caches picked by prompt prefix; no user session starts with NUL

Loader = Callable[[], tuple[nn.Module, Tokenizer]]


class WorkerBusy(QwenMLXError):
    """The queue of waiting requests is full."""


@dataclass
class Job:
    """One generation request; `stream_generate`'s keyword arguments go in `options`."""

    session: str
    prompt: Prompt
    options: dict[str, Any] = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)
    chunks: queue.SimpleQueue[GenerationChunk | BaseException] = field(default_factory=queue.SimpleQueue)
    done: threading.Event = field(default_factory=threading.Event)  # set once the last item is queued
    notify: Callable[[], None] | None = None  # called (on the worker's thread) after each item is queued

    def put(self, item: GenerationChunk | BaseException) -> None:
        self.chunks.put(item)
        if self.notify is not None:
            self.notify()

    def cancel(self) -> None:
        """Stop the generation: the worker finishes it within one token, with finish_reason "cancelled"."""
        self.cancelled.set()

    def get(self, timeout: float | None = None) -> GenerationChunk | None:
        """The next chunk, or None if none came within `timeout` seconds; raises the error that ended the job."""
        try:
            item = self.chunks.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


class ModelWorker:
    """Owns a model on a dedicated thread: loads it there, then serves `Job`s one at a time from a queue.

    Each session (a conversation, a client) keeps its own PromptCache, so its next turn prefills only what is
    new; the `max_sessions` most recently used caches are kept. A job without a session whose prompt is token ids
    (an API request that resends the whole conversation) gets the cache sharing the longest prefix with it.
    """

    def __init__(
        self,
        load: Loader,
        *,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        max_sessions: int = 4,
        max_queue: int | None = None,
        on_status: Callable[[str], None] | None = None,
    ):
        self.max_kv_size = max_kv_size
        self.kv_bits = kv_bits
        self.max_sessions = max_sessions
        self.max_queue = max_queue
        self.waiting = 0  # submitted jobs not yet started
        self.generated_tokens = 0  # over all jobs, for monitoring
        self._waiting_lock = threading.Lock()
        self.model: nn.Module | None = None
        self.tokenizer: Tokenizer | None = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self._load = load
        self._on_status = on_status or (lambda message: None)
        # Jobs, and errands to run on this thread in turn.
        self._jobs: queue.SimpleQueue[Job | Callable[[], Any]] = queue.SimpleQueue()
        self._caches: OrderedDict[str, PromptCache] = OrderedDict()
        self._current: Job | None = None
        self._anonymous = 0
        self._session_of: dict[int, str] = {}
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qwen-mlx-model", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (or failed to load); False if `timeout` ran out first."""
        return self.loaded.wait(timeout)

    def submit(
        self, session: str | None, prompt: Prompt, *, notify: Callable[[], None] | None = None, **options: Any
    ) -> Job:
        """Queue a generation of a reply to `prompt` in `session`; read its chunks with `job.get()`, or when
        `notify` says one is there (an event loop's way of waiting)."""
        with self._waiting_lock:
            if self.max_queue is not None and self.waiting >= self.max_queue:
                raise WorkerBusy(f"the server is busy: {self.waiting} requests are already waiting; retry shortly")
            self.waiting += 1
        job = Job(session, prompt, options, notify=notify)
        self._jobs.put(job)
        return job

    @property
    def busy(self) -> bool:
        return self._current is not None

    def forget(self, session: str) -> None:
        """Drop a session's cache (its conversation was deleted), in turn on the worker's thread."""
        self._jobs.put(lambda: self._caches.pop(session, None))

    def close(self) -> None:
        """Cancel the running and waiting jobs (new ones are cancelled too) and wait until the thread is idle.

        Call it before the interpreter exits: a thread inside MLX then aborts the process. The thread itself stays
        parked rather than ending, since MLX's thread-local cleanup at thread exit also needs the interpreter.
        """
        self._closing.set()
        if self._current is not None:
            self._current.cancel()
        idle = threading.Event()
        self._jobs.put(idle.set)
        idle.wait()

    def _run(self) -> None:
        with mx.stream(mx.new_stream(mx.default_device())):
            self._on_status("loading the model")
            try:
                self.model, self.tokenizer = self._load()
                self._on_status("ready")
            except Exception as e:  # any failure is reported to every request, the thread lives on
                self.load_error = e if isinstance(e, QwenMLXError) else QwenMLXError(f"the model failed to load: {e}")
                log.error("the model failed to load", exc_info=not isinstance(e, QwenMLXError))
                self._on_status(f"failed: {self.load_error}")
            self.loaded.set()
            while True:
                job = self._jobs.get()
                if isinstance(job, Job):
                    self._serve(job)
                else:
                    job()

    def _serve(self, job: Job) -> None:
        self._current = job
        with self._waiting_lock:
            self.waiting -= 1
        try:
            if self.load_error is not None:
                job.put(self.load_error)
            elif job.cancelled.is_set() or self._closing.is_set():  # cancelled while waiting in the queue
                job.put(GenerationChunk("", None, "cancelled"))
            else:
                for chunk in stream_generate(
                    self.model, self.tokenizer, job.prompt,
                    prompt_cache=self._cache(job), cancel=job.cancelled, **job.options,
                ):
                    if chunk.token is not None:
                        self.generated_tokens += 1
                    job.put(chunk)
        except QwenMLXError as e:
            job.put(e)
        except Exception as e:  # a bug in one request must not stop the worker
            log.exception("generation failed")
            # The cache may hold a half-written step: rebuild it next time.
            self._caches.pop(self._session_of.pop(id(job), job.session), None)
            job.put(e)
        finally:
            # A cancelled generation leaves its next step computing: wait for it, so that nothing runs on
            # this thread's stream between jobs or when the process exits (MLX then aborts).
            mx.synchronize()
            self._session_of.pop(id(job), None)
            self._current = None
            job.done.set()

    def _cache(self, job: Job) -> PromptCache:
        session = job.session
        if session is None:
            session = self._closest_session(job.prompt)
            self._session_of[id(job)] = session
        if session not in self._caches:
            self._caches[session] = PromptCache.new(self.model, self.max_kv_size, kv_bits=self.kv_bits)
            while len(self._caches) > self.max_sessions:
                self._caches.popitem(last=False)
        self._caches.move_to_end(session)
        return self._caches[session]

    def _closest_session(self, prompt: Prompt) -> str:
        """The anonymous cache sharing the longest prefix with `prompt`, if that prefix is most of the cache (the
        next turn of its conversation: only the last reply may re-tokenize differently) or no room is left for a
        new one. Two clients with the same system prompt then keep a cache each instead of trimming each other's."""
        ids = list(prompt) if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) else []
        shared = [
            (longest_common_prefix(c.tokens, ids), len(c.tokens), k)
            for k, c in self._caches.items() if k.startswith(ANONYMOUS)
        ]
        best = max(shared, default=None)
        if best is not None and best[0] > 0 and (2 * best[0] >= best[1] or len(self._caches) >= self.max_sessions):
            return best[2]
        self._anonymous += 1
        return f"{ANONYMOUS}{self._anonymous}"


class SlowedModel:
    """The model, sleeping `delay` seconds before each step, so a tiny test model streams slowly enough to watch,
    stop and disconnect from (QWEN_MLX_TOKEN_DELAY; tests and diagnostics only)."""

    def __init__(self, model: nn.Module, delay: float):
        self._model, self._delay = model, delay

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self._delay)
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def slowed_for_tests(model: nn.Module) -> nn.Module:
    delay = float(os.environ.get("QWEN_MLX_TOKEN_DELAY") or 0)
    return SlowedModel(model, delay) if delay > 0 else model
