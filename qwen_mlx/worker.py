"""ModelWorker: one thread owns the model and runs every MLX operation; other threads send it requests.

MLX streams are thread-local (mlx >= 0.31.2), and web servers run handlers on whichever thread is free, so the
model, its caches and every array they touch stay on the worker's thread and its own stream. A request (`Job`)
carries a checked `GenerationRequest`, a cancel flag and a queue that the worker fills with `GenerationChunk`s,
the last of which has a `finish_reason` (or with the exception that ended it).

Up to `max_batch` jobs decode together, one forward pass per step for all of them (`decode.Decoder`); a new job's
prompt is prefilled a chunk at a time between the others' steps. With `max_queue`, at most that many jobs wait
for a free row, and `submit` raises `WorkerBusy` beyond it. Nothing a job does, and nothing a client does with
its chunks, ends the thread.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.cache import CacheSettings, PromptCache, longest_common_prefix
from qwen_mlx.decode import Decoder
from qwen_mlx.decode import Sequence as TokenSequence
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate import GenerationChunk, ReplyText, text_chunks
from qwen_mlx.request import GenerationRequest, Prompt, prepare_request
from qwen_mlx.speculative import DraftModel
from qwen_mlx.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ANONYMOUS = "\0anonymous:"  # session names of caches picked by prompt prefix; no user session starts with NUL
CLOSE_TIMEOUT_S = 10.0  # `close` returns after this long even if the thread is stuck inside MLX
RATE_WINDOW_S = 10.0  # aggregate tokens/s is measured over this many recent seconds

Loader = Callable[[], tuple[nn.Module, Tokenizer]]


class WorkerBusy(QwenMLXError):
    """The queue of waiting requests is full."""


@dataclass(eq=False)
class Job:
    """One generation request, as the worker runs it."""

    session: str | None
    request: GenerationRequest | None  # None: it failed before it was queued (its error is the first item)
    cancelled: threading.Event = field(default_factory=threading.Event)
    chunks: queue.SimpleQueue[GenerationChunk | BaseException] = field(default_factory=queue.SimpleQueue)
    started: threading.Event = field(default_factory=threading.Event)  # set once it has a row (it is decoding)
    prefill: tuple[int, int] | None = None  # (prompt tokens computed, to compute) while its prompt is prefilled
    done: threading.Event = field(default_factory=threading.Event)  # set once the last item is queued
    notify: Callable[[], None] | None = None  # called (on the worker's thread) after each item is queued

    def put(self, item: GenerationChunk | BaseException) -> None:
        self.chunks.put(item)
        if self.notify is None:
            return
        try:
            self.notify()
        except Exception:  # e.g. the client's event loop is already closed: that client is gone, not the worker
            log.debug("could not notify a client; cancelling its job", exc_info=True)
            self.cancel()

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


class SessionCaches:
    """The PromptCaches of the last `max_sessions` sessions (conversations, clients), least recently used out.

    A job without a session whose prompt resends a conversation (an API client) gets the anonymous cache that
    shares the longest prefix with it. A cache in use by a running job is never handed out twice or evicted.
    """

    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self.caches: OrderedDict[str, PromptCache] = OrderedDict()
        self.in_use: set[str] = set()
        self._anonymous = 0

    def checkout(self, session: str | None, prompt_ids: list[int], new: Callable[[], PromptCache]) -> str:
        """The session whose cache `prompt_ids` will run in, reserved until `checkin`."""
        if session is None:
            session = self._closest_anonymous(prompt_ids)
        if session not in self.caches:
            self.caches[session] = new()
        self.caches.move_to_end(session)
        self.in_use.add(session)
        self._evict()
        return session

    def checkin(self, session: str, keep: bool = True) -> None:
        self.in_use.discard(session)
        if not keep:  # it may hold a half-written step: rebuild it next time
            self.caches.pop(session, None)
        self._evict()

    def forget(self, session: str) -> None:
        if session not in self.in_use:
            self.caches.pop(session, None)

    def _evict(self) -> None:
        for name in [n for n in self.caches if n not in self.in_use][: max(0, len(self.caches) - self.max_sessions)]:
            del self.caches[name]

    def _closest_anonymous(self, ids: list[int]) -> str:
        """The anonymous cache sharing the longest prefix with `ids`, if that prefix is most of the cache (the
        next turn of its conversation: only the last reply may re-tokenize differently) or no room is left for a
        new one. Two clients with the same system prompt then keep a cache each instead of trimming each other's."""
        shared = [
            (longest_common_prefix(c.tokens, ids), len(c.tokens), k)
            for k, c in self.caches.items() if k.startswith(ANONYMOUS) and k not in self.in_use
        ]
        best = max(shared, default=None)
        if best is not None and best[0] > 0 and (2 * best[0] >= best[1] or len(self.caches) >= self.max_sessions):
            return best[2]
        self._anonymous += 1
        return f"{ANONYMOUS}{self._anonymous}"


@dataclass(eq=False)
class Running:
    """A job in the decoder: its sequence, its text, and the session cache it holds."""

    job: Job
    session: str
    sequence: TokenSequence
    reply: ReplyText


class ModelWorker:
    """Owns a model on a dedicated thread: loads it there, then decodes up to `max_batch` jobs at a time.

    Each session (a conversation, a client) keeps its own PromptCache, so its next turn prefills only what is new;
    the `max_sessions` most recently used caches are kept (see `SessionCaches`).
    """

    def __init__(
        self,
        load: Loader,
        *,
        cache: CacheSettings | None = None,
        max_batch: int = 1,
        max_sessions: int = 4,
        max_queue: int | None = None,
        options: dict[str, Any] | None = None,
        load_draft: Callable[[Tokenizer], DraftModel] | None = None,
        on_status: Callable[[str], None] | None = None,
    ):
        self.cache_settings = cache or CacheSettings()
        # `stream_generate` options every request gets unless it gives its own (a server's draft model, say)
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        self._load_draft = load_draft
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.waiting = 0  # submitted jobs not yet decoding
        self.generated_tokens = 0  # over all jobs, for monitoring
        self._token_times: deque[float] = deque()  # when recent tokens were generated (`tokens_per_second`)
        self.model: nn.Module | None = None
        self.tokenizer: Tokenizer | None = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self._load = load
        self._on_status = on_status or (lambda message: None)
        self._lock = threading.Lock()
        # Jobs, and errands to run on this thread in turn.
        self._inbox: queue.SimpleQueue[Job | Callable[[], Any]] = queue.SimpleQueue()
        self._queued: deque[Job] = deque()  # jobs waiting for a row
        self._running: dict[TokenSequence, Running] = {}
        self._idle_waiters: list[threading.Event] = []  # set once no job is running (`close`)
        self._decoder: Decoder | None = None
        self._sessions = SessionCaches(max_sessions)
        self._closing = threading.Event()
        self._unload_asked = False  # `unload` was called: no more jobs
        self._unloading = False  # set on this thread by `unload`'s errand: end the loop once nothing runs
        self.unloaded = threading.Event()  # set once the model and its caches are dropped (the thread parks)
        self._reload = threading.Event()  # wakes the parked thread for the next model
        self._thread = threading.Thread(target=self._run, name="qwen-mlx-model", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (or failed to load); False if `timeout` ran out first."""
        return self.loaded.wait(timeout)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def idle(self) -> bool:
        """No job decoding, prefilling or waiting (a job counts as waiting from `submit` until it has a row)."""
        return not self._running and self.waiting == 0

    @property
    def active(self) -> int:
        """Jobs decoding (or prefilling) now."""
        return len(self._running)

    @property
    def decode_passes(self) -> int:
        """Forward passes that produced tokens so far: one batched pass serves every row decoding."""
        return self._decoder.passes if self._decoder is not None else 0

    def tokens_per_second(self) -> float:
        """Tokens generated per second over all jobs, in the last `RATE_WINDOW_S` seconds."""
        with self._lock:
            since = time.monotonic() - RATE_WINDOW_S
            while self._token_times and self._token_times[0] < since:
                self._token_times.popleft()
            return len(self._token_times) / RATE_WINDOW_S

    def submit(self, session: str | None, prompt: Prompt, *, notify: Callable[[], None] | None = None,
               **options: Any) -> Job:
        """Queue a reply to `prompt` in `session` (`stream_generate`'s options); read its chunks with `job.get()`,
        or when `notify` says one is there (an event loop's way of waiting). A bad request's error is the job's
        first item."""
        self.wait_loaded()
        try:
            if self.load_error is not None:
                raise self.load_error
            request = prepare_request(self.model, self.tokenizer, prompt, **{**self.options, **options})
        except QwenMLXError as e:
            job = Job(session, None, notify=notify)
            job.put(e)
            job.done.set()
            return job
        return self.submit_request(session, request, notify=notify)

    def submit_request(self, session: str | None, request: GenerationRequest, *,
                       notify: Callable[[], None] | None = None) -> Job:
        """Queue a request already checked (`prepare_request`); raises `WorkerBusy` when the queue is full."""
        if self._unload_asked:
            raise WorkerBusy("the model was unloaded; send the request again to load it")
        with self._lock:
            if self.max_queue is not None and self.waiting >= self.max_queue:
                raise WorkerBusy(f"the server is busy: {self.waiting} requests are already waiting; retry shortly")
            self.waiting += 1
        job = Job(session, request, notify=notify)
        self._inbox.put(job)
        return job

    def forget(self, session: str) -> None:
        """Drop a session's cache (its conversation was deleted), in turn on the worker's thread."""
        self._inbox.put(lambda: self._sessions.forget(session))

    def cancel_all(self) -> None:
        """Cancel the running and waiting jobs, and every job submitted from now on (the server is stopping):
        each ends within a token with finish_reason "cancelled"."""
        self._closing.set()
        for running in list(self._running.values()):
            running.job.cancel()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """`cancel_all`, then wait until the thread is idle, for at most `timeout` seconds; False if it did not get
        there in time.

        Call it before the interpreter exits: a thread inside MLX then aborts the process. The thread itself stays
        parked rather than ending, since MLX's thread-local cleanup at thread exit also needs the interpreter.
        """
        if self.unloaded.is_set():
            return True
        self.cancel_all()
        idle = threading.Event()
        self._inbox.put(lambda: self._idle_waiters.append(idle))
        if not idle.wait(timeout):
            log.warning("the model thread did not become idle within %.0f s", timeout)
            return False
        return True

    def unload(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Cancel every job (each ends within a token), then drop the model, its draft model, the session caches
        and the decoder on the thread, so that the memory their arrays hold is freed; False if that did not happen
        within `timeout`. The worker takes no jobs until `reload`.

        The thread is kept, parked, rather than ended: an MLX thread that ends can abort the process at exit (the
        CPU backend's stream threads), and a parked one is ready for the next model (`reload`).
        """
        if self.unloaded.is_set():
            return True
        self._unload_asked = True
        self.cancel_all()
        self._inbox.put(self._end_loop)
        return self.unloaded.wait(timeout)

    def reload(self, load: Loader, *, options: dict[str, Any] | None = None,
               load_draft: Callable[[Tokenizer], DraftModel] | None = None,
               on_status: Callable[[str], None] | None = None) -> None:
        """Load another model on this unloaded worker's thread, as a new worker would (see `__init__`)."""
        if not self.unloaded.is_set():
            raise RuntimeError("reload() needs an unloaded worker")
        self._load, self._load_draft = load, load_draft
        self._on_status = on_status or self._on_status
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        self.load_error = None
        self.generated_tokens = 0
        self._token_times.clear()
        self._unload_asked = self._unloading = False
        self._closing.clear()
        self.loaded.clear()
        self.unloaded.clear()
        self._reload.set()

    # --- on the worker's thread ---

    def _end_loop(self) -> None:
        self._unloading = True

    def _run(self) -> None:
        with mx.stream(mx.new_stream(mx.default_device())):
            while True:
                self._serve_model()
                self._drop_model()
                self._reload.wait()  # parked until `reload`
                self._reload.clear()

    def _serve_model(self) -> None:
        """Load the model, then take and decode jobs until `unload` asks to stop and nothing is left running."""
        self._on_status("loading the model")
        try:
            self.model, self.tokenizer = self._load()
            if self._load_draft is not None:
                self._on_status("loading the draft model")
                self.options["draft_model"] = self._load_draft(self.tokenizer)
            self._on_status("ready")
        except Exception as e:  # any failure is reported to every request, the thread lives on
            self.load_error = e if isinstance(e, QwenMLXError) else QwenMLXError(f"the model failed to load: {e}")
            log.error("the model failed to load", exc_info=not isinstance(e, QwenMLXError))
            self._on_status(f"failed: {self.load_error}")
        self.loaded.set()
        decoder = Decoder(self.model, self.tokenizer) if self.model is not None else None
        self._decoder = decoder
        while not (self._unloading and not self._running and not self._queued):
            try:
                self._take_inbox(block=not self._running and not self._queued)
                self._admit(decoder)
                if self._running:
                    self._step(decoder)
                else:
                    for idle in self._idle_waiters:
                        idle.set()
                    self._idle_waiters.clear()
            except Exception:  # a bug here must not end the thread: fail what is running, go on
                log.exception("the model thread hit an error; failing the running jobs")
                self._fail_all(decoder, QwenMLXError("internal error while generating; see the server log"))

    def _drop_model(self) -> None:
        """`unload`'s end: nothing may keep a reference to the model's or the caches' arrays, or their memory stays."""
        mx.synchronize()
        self.model = self.tokenizer = self._decoder = None
        self.options.pop("draft_model", None)
        self._sessions = SessionCaches(self._sessions.max_sessions)
        gc.collect()  # modules and caches may sit in reference cycles
        mx.clear_cache()
        self.unloaded.set()

    def _take_inbox(self, block: bool) -> None:
        """Move submitted jobs to the queue and run errands; wait for one when there is nothing else to do."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if isinstance(item, Job):
                    self._queued.append(item)
                else:
                    item()
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self, decoder: Decoder | None) -> None:
        """Start queued jobs while rows are free; a job whose conversation is still generating (a double send)
        waits for it, in order, without holding up the others."""
        deferred: list[Job] = []
        while self._queued and len(self._running) < self.max_batch:
            job = self._queued.popleft()
            if job.session is not None and job.session in self._sessions.in_use:
                deferred.append(job)
                continue
            if self.load_error is not None:
                self._end(job, self.load_error)
            elif job.cancelled.is_set() or self._closing.is_set():  # cancelled while waiting in the queue
                self._end(job, GenerationChunk("", None, "cancelled"))
            else:
                self._start(decoder, job)
            with self._lock:  # only now: `idle` must not read true between leaving the queue and taking a row
                self.waiting -= 1
        self._queued.extendleft(reversed(deferred))

    def _start(self, decoder: Decoder, job: Job) -> None:
        request = job.request
        if not self._running:
            mx.reset_peak_memory()  # a reply's peak memory counts from when the model last went busy
        session = self._sessions.checkout(job.session, request.prompt_ids,
                                          lambda: PromptCache.new(self.model, self.cache_settings))
        try:
            sequence = decoder.add(request, self._sessions.caches[session], job.cancelled,
                                   on_prefill=lambda done, total: setattr(job, "prefill", (done, total)))
        except Exception as e:
            self._sessions.checkin(session, keep=False)
            self._end(job, e if isinstance(e, QwenMLXError) else QwenMLXError(f"generation failed: {e}"))
            return
        reply = ReplyText(self.tokenizer, sequence, self.model.config.context_length)
        self._running[sequence] = Running(job, session, sequence, reply)
        job.started.set()

    def _step(self, decoder: Decoder) -> None:
        replies = {s: r.reply for s, r in self._running.items()}
        for reply, chunk in text_chunks(decoder, replies):
            running = self._running[reply.sequence]
            if chunk.finish_reason == "error":
                error = reply.sequence.error
                log.log(logging.INFO if isinstance(error, QwenMLXError) else logging.ERROR, "a generation failed",
                        exc_info=(type(error), error, error.__traceback__) if not isinstance(error, QwenMLXError)
                        else None)
                self._stop(running, error=error)
                continue
            if chunk.token is not None:
                self.generated_tokens += 1
                with self._lock:
                    self._token_times.append(time.monotonic())
            running.job.put(chunk)
            if chunk.finish_reason is not None:
                self._stop(running)

    def _stop(self, running: Running, error: BaseException | None = None) -> None:
        del self._running[running.sequence]
        self._sessions.checkin(running.session, keep=error is None)
        if not self._running:
            # A cancelled generation leaves its next step computing: wait for it, so that nothing runs on this
            # thread's stream while it is idle or when the process exits (MLX then aborts).
            mx.synchronize()
        if error is not None:
            self._end(running.job, error)
        else:
            running.job.done.set()

    def _fail_all(self, decoder: Decoder | None, error: QwenMLXError) -> None:
        if decoder is not None:
            decoder.clear()
        for running in list(self._running.values()):
            self._stop(running, error=error)

    def _end(self, job: Job, item: GenerationChunk | BaseException) -> None:
        job.put(item)
        job.done.set()


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
