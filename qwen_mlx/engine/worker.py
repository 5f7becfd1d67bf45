"""ModelWorker: one thread owns the model and runs every MLX operation; other threads send it requests.

MLX streams are thread-local (mlx >= 0.31.2), and web servers run handlers on whichever thread is free, so the
model, its caches and every array they touch stay on the worker's thread and its own stream. A request (`Job`)
carries a checked `GenerationRequest`, a cancel flag and a queue that the worker fills with `GenerationChunk`s,
the last of which has a `finish_reason` (or with the exception that ended it).

Up to `max_batch` jobs decode together, one forward pass per step for all of them (`decode.Decoder`); a new job's
prompt is prefilled a chunk at a time between the others' steps. With `max_queue`, at most that many jobs wait
for a free row, and `submit` raises `WorkerBusy` beyond it. Nothing a job does, and nothing a client does with
its chunks, ends the thread.

With a `Lockstep` (a model split over several processes, `parallel`), every rank runs this loop: rank 0 takes
the requests and shares each turn's decisions as a `lockstep.Plan`, the others follow it (`follow`), so all of
them run the same forward passes. A rank that fails there ends its process with one line; `mlx.launch` then
stops the others (and without it, they notice the lost peer at their next collective).
"""

from __future__ import annotations

import bisect
import gc
import itertools
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.engine.decode import Decoder
from qwen_mlx.engine.decode import Sequence as TokenSequence
from qwen_mlx.engine.generate import GenerationChunk, GenerationStats, ReplyText, text_chunks
from qwen_mlx.engine.lifecycle import Lifecycle, Phase
from qwen_mlx.engine.lockstep import HEARTBEAT_S, Lockstep, Plan, Start, decode_request, encode_request
from qwen_mlx.engine.prefix_cache import CacheStats, DiskTier, PrefixCache, ReplyMemory, settings_tag
from qwen_mlx.engine.request import GenerationRequest, Prompt, prepare_request
from qwen_mlx.engine.speculative import DraftModel
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import CacheSettings, PromptCache
from qwen_mlx.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0  # `close` returns after this long even if the thread is stuck inside MLX
FLUSH_TIMEOUT_S = 120.0  # ... and after this long writing the prefix cache to disk at shutdown
RATE_WINDOW_S = 10.0  # aggregate tokens/s is measured over this many recent seconds

Loader = Callable[[], tuple[nn.Module, Tokenizer]]


# Upper bounds (seconds) of the latency histograms: a first token comes after a prefill of milliseconds (a cached
# prompt) to minutes (a long one on a laptop); one more token takes milliseconds (a small model) to a second.
FIRST_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    """Observations counted into buckets by upper bound, as Prometheus reads them (`counts` per bucket, not
    cumulative; the last one is +Inf)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class UsageCounters:
    """The totals a server reports (GET /health, GET /metrics): one set per server, shared by every worker its
    registry starts, so they keep growing as models unload and load."""

    generated_tokens: int = 0
    decode_passes: int = 0  # forward passes that produced tokens: one batched pass serves every row decoding
    requests: int = 0  # generation requests submitted to a worker
    replies: int = 0  # ... and finished (stopped, cut at max_tokens or cancelled)
    prompt_tokens: int = 0  # the prompts of finished replies, cached parts included
    prefilled_tokens: int = 0  # ... of which computed (the rest came from the prefix cache)
    draft_tokens: int = 0  # speculative decoding: tokens proposed and verified
    accepted_draft_tokens: int = 0  # ... and the ones the model agreed with
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(FIRST_TOKEN_BUCKETS_S))
    time_per_output_token: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS_S))
    http_requests: dict[tuple[str, int], int] = field(default_factory=dict)  # answers by (API, HTTP status)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_reply(self, stats: GenerationStats) -> None:
        """A finished reply's statistics; several workers' threads (one per model) share these counters."""
        with self.lock:
            self.replies += 1
            self.prompt_tokens += stats.prompt_tokens
            self.prefilled_tokens += stats.prefilled_tokens
            self.draft_tokens += stats.draft_tokens
            self.accepted_draft_tokens += stats.accepted_draft_tokens
            if stats.generation_tokens > 0:
                self.time_to_first_token.observe(stats.time_to_first_token)
            if stats.generation_tps > 0:
                self.time_per_output_token.observe(1 / stats.generation_tps)

    def count_http(self, api: str, status: int) -> None:
        with self.lock:
            self.http_requests[api, status] = self.http_requests.get((api, status), 0) + 1


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
    notify: Callable[[], object] | None = None  # called (on the worker's thread) after each item is queued
    discard: bool = False  # a following rank's copy of rank 0's job: its output goes nowhere

    def put(self, item: GenerationChunk | BaseException) -> None:
        if self.discard:
            return
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


@dataclass(eq=False)
class Running:
    """A job in the decoder: its sequence and its text."""

    job: Job
    sequence: TokenSequence
    reply: ReplyText
    cancel: threading.Event  # what the decoder checks: the job's own flag, or under lockstep its shared copy
    uid: int | None = None  # its name in lockstep plans


@dataclass(frozen=True)
class Forget:
    """An errand: drop `session`'s cached turn."""

    session: str


@dataclass(frozen=True)
class CacheTiers:
    """Where the prefix cache keeps finished turns: at most `ram_bytes` in memory, then up to `disk_bytes` of
    files under `folder` (None: no disk tier)."""

    ram_bytes: int
    folder: Path | None = None
    disk_bytes: int = 0


def default_ram_bytes() -> int:
    """A tenth of the machine's memory for cached prefixes (the memory the model and its live rows need aside)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.1)
    except (ValueError, OSError):
        return 2 << 30


class ModelWorker:
    """Owns a model on a dedicated thread: loads it there, then decodes up to `max_batch` jobs at a time.

    Finished turns go to one `PrefixCache` for the process (RAM, then disk with `tiers.folder`), so any request
    starts from the longest prefix computed before, its own conversation's or another's, also after a restart.
    A session (a conversation) runs one job at a time: a second one waits for the first, in order.
    """

    def __init__(
        self,
        load: Loader,
        *,
        cache: CacheSettings | None = None,
        max_batch: int = 1,
        tiers: CacheTiers | None = None,
        max_queue: int | None = None,
        options: dict[str, Any] | None = None,
        load_draft: Callable[[Tokenizer], DraftModel] | None = None,
        on_status: Callable[[str], None] | None = None,
        lockstep: Lockstep | None = None,
        counters: UsageCounters | None = None,
    ):
        self.lockstep = lockstep
        self.lifecycle = Lifecycle()
        self._uids = itertools.count()
        self._by_uid: dict[int, Running] = {}
        self._admitted: dict[int, Job] = {}  # rank 0's jobs between their plan and their start
        self._forgotten: list[str] = []  # sessions for the next plan
        self.cache_settings = cache or CacheSettings()
        # `stream_generate` options every request gets unless it gives its own (a server's draft model, say)
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        self._load_draft = load_draft
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: list[Job] = []  # submitted jobs not yet decoding, in the order they came
        self.counters = counters or UsageCounters()
        self._token_times: deque[float] = deque()  # when recent tokens were generated (`tokens_per_second`)
        self.model: nn.Module | None = None
        self.tokenizer: Tokenizer | None = None
        self.load_error: BaseException | None = None
        self._load = load
        self._on_status = on_status or (lambda message: None)
        self._lock = threading.Lock()
        # Jobs, and errands to run on this thread in turn.
        self._inbox: queue.SimpleQueue[Job | Forget | Callable[[], Any]] = queue.SimpleQueue()
        self._queued: deque[Job] = deque()  # jobs waiting for a row
        self._running: dict[TokenSequence, Running] = {}
        self._idle_waiters: list[threading.Event] = []  # set once no job is running (`close`)
        self._decoder: Decoder | None = None
        self.tiers = tiers or CacheTiers(default_ram_bytes())
        self.prefixes: PrefixCache | None = None  # made once the model is loaded
        self.replies = ReplyMemory()  # ... and then kept beside its disk tier
        self._busy_sessions: set[str] = set()
        # A session's last finished cache, for `forget`: weak, so an entry the prefix cache drops is freed.
        self._entry_of: weakref.WeakValueDictionary[str, PromptCache] = weakref.WeakValueDictionary()
        self._thread = threading.Thread(target=self._run, name="qwen-mlx-model", daemon=True)
        self._thread.start()

    @property
    def phase(self) -> Phase:
        return self.lifecycle.phase

    @property
    def loaded(self) -> bool:
        """The model is loaded (or failed to load) and not yet unloaded."""
        return self.lifecycle.is_in(Phase.SERVING, Phase.CLOSING, Phase.DRAINING)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (or failed to load); False if `timeout` ran out first."""
        return self.lifecycle.wait_for(*(p for p in Phase if p is not Phase.LOADING), timeout=timeout)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def idle(self) -> bool:
        """No job decoding, prefilling or waiting (a job counts as waiting from `submit` until it has a row)."""
        return not self._running and not self._waiting

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet decoding."""
        return len(self._waiting)

    def position(self, job: Job) -> int:
        """How many jobs wait for a row before `job` (0 once it has one, or never waited)."""
        with self._lock:
            return self._waiting.index(job) if job in self._waiting else 0

    @property
    def active(self) -> int:
        """Jobs decoding (or prefilling) now."""
        return len(self._running)

    def cache_stats(self) -> CacheStats:
        """The prefix cache's entries, sizes and hits (read from any thread: counters, no MLX)."""
        return self.prefixes.snapshot() if self.prefixes is not None else CacheStats()

    @property
    def generated_tokens(self) -> int:
        return self.counters.generated_tokens

    @property
    def decode_passes(self) -> int:
        return self.counters.decode_passes

    def tokens_per_second(self) -> float:
        """Tokens generated per second over all jobs, in the last `RATE_WINDOW_S` seconds."""
        with self._lock:
            since = time.monotonic() - RATE_WINDOW_S
            while self._token_times and self._token_times[0] < since:
                self._token_times.popleft()
            return len(self._token_times) / RATE_WINDOW_S

    def submit(self, session: str | None, prompt: Prompt, *, notify: Callable[[], object] | None = None,
               **options: Any) -> Job:
        """Queue a reply to `prompt` in `session` (`stream_generate`'s options); read its chunks with `job.get()`,
        or when `notify` says one is there (an event loop's way of waiting). A bad request's error is the job's
        first item."""
        self.wait_loaded()
        if self.lifecycle.is_in(Phase.DRAINING, Phase.UNLOADED):
            raise WorkerBusy("the model was unloaded; send the request again to load it")
        try:
            if self.load_error is not None:
                raise self.load_error
            # Loaded: `wait_loaded` returned, the load did not fail and no unload has dropped the model.
            assert self.model is not None and self.tokenizer is not None
            request = prepare_request(self.model, self.tokenizer, prompt, **{**self.options, **options})
        except QwenMLXError as e:
            job = Job(session, None, notify=notify)
            job.put(e)
            job.done.set()
            return job
        return self.submit_request(session, request, notify=notify)

    def submit_request(self, session: str | None, request: GenerationRequest, *,
                       notify: Callable[[], object] | None = None) -> Job:
        """Queue a request already checked (`prepare_request`); raises `WorkerBusy` when the queue is full."""
        if self.lifecycle.is_in(Phase.DRAINING, Phase.UNLOADED):
            raise WorkerBusy("the model was unloaded; send the request again to load it")
        with self._lock:
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise WorkerBusy(f"the server is busy: {len(self._waiting)} requests are already waiting; retry "
                                 "shortly")
            job = Job(session, request, notify=notify)
            self._waiting.append(job)
        self._inbox.put(job)
        return job

    def forget(self, session: str) -> None:
        """Drop a session's cached turn (its conversation was deleted), in turn on the worker's thread."""
        self._inbox.put(Forget(session))

    def cancel_all(self) -> None:
        """Cancel the running and waiting jobs, and every job submitted from now on (the server is stopping):
        each ends within a token with finish_reason "cancelled"."""
        self.lifecycle.move_from((Phase.LOADING, Phase.SERVING), Phase.CLOSING)
        for running in list(self._running.values()):
            running.job.cancel()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """`cancel_all`, then wait until the thread is idle, for at most `timeout` seconds; False if it did not get
        there in time.

        Call it before the interpreter exits: a thread inside MLX then aborts the process. The thread itself stays
        parked rather than ending, since MLX's thread-local cleanup at thread exit also needs the interpreter.
        """
        if self.lifecycle.is_in(Phase.UNLOADED):
            return True
        self.cancel_all()
        idle = threading.Event()
        self._inbox.put(lambda: self._idle_waiters.append(idle))
        if not idle.wait(timeout):
            log.warning("the model thread did not become idle within %.0f s", timeout)
            return False
        if self.lockstep is not None:
            self._inbox.put(lambda: None)  # wakes rank 0, which tells the others to exit (`_plan`)
            if not self.lifecycle.wait_for(Phase.FINISHED, timeout=timeout):
                log.warning("the other processes did not take the last step within %.0f s", timeout)
                return False
        if self.prefixes is not None and self.prefixes.disk is not None:
            flushed = threading.Event()

            def flush() -> None:  # MLX: on the model's thread
                assert self.prefixes is not None  # seen above; only that thread drops it, after its jobs
                self.prefixes.flush()
                self.replies.save()
                flushed.set()

            self._inbox.put(flush)
            if not flushed.wait(FLUSH_TIMEOUT_S):
                log.warning("writing the prefix cache to disk took longer than %.0f s", FLUSH_TIMEOUT_S)
                return False
        return True

    def follow(self) -> None:
        """On a rank other than 0: let this worker follow rank 0's plans until rank 0 is done."""
        self.lifecycle.wait_for(Phase.FINISHED)

    def unload(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Cancel every job (each ends within a token), then drop the model, its draft model, the session caches
        and the decoder on the thread, so that the memory their arrays hold is freed; False if that did not happen
        within `timeout`. The worker takes no jobs until `reload`.

        The thread is kept, parked, rather than ended: an MLX thread that ends can abort the process at exit (the
        CPU backend's stream threads), and a parked one is ready for the next model (`reload`).
        """
        if self.lifecycle.is_in(Phase.UNLOADED):
            return True
        self.lifecycle.move(Phase.DRAINING)
        for running in list(self._running.values()):
            running.job.cancel()
        self._inbox.put(lambda: None)  # wakes the thread, which ends its loop once the jobs it has are ended
        return self.lifecycle.wait_for(Phase.UNLOADED, timeout=timeout)

    def reload(self, load: Loader, *, options: dict[str, Any] | None = None,
               load_draft: Callable[[Tokenizer], DraftModel] | None = None,
               on_status: Callable[[str], None] | None = None) -> None:
        """Load another model on this unloaded worker's thread, as a new worker would (see `__init__`)."""
        if not self.lifecycle.is_in(Phase.UNLOADED):
            raise RuntimeError("reload() needs an unloaded worker")
        self._load, self._load_draft = load, load_draft
        self._on_status = on_status or self._on_status
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        self.load_error = None
        self._token_times.clear()
        self.lifecycle.move(Phase.LOADING)  # wakes the parked thread

    # --- on the worker's thread ---

    def _run(self) -> None:
        with mx.stream(mx.new_stream(mx.default_device())):
            while True:
                self._serve_model()
                if self.lifecycle.is_in(Phase.FINISHED):
                    break  # lockstep: rank 0 is done
                self._drop_model()
                self.lifecycle.wait_for(Phase.LOADING)  # parked until `reload`
            threading.Event().wait()  # parked: see `close`

    def _serve_model(self) -> None:
        """Load the model, then take and decode jobs until `unload` asks to stop and nothing is left running (or,
        under lockstep, until rank 0 is done)."""
        self._on_status("loading the model")
        try:
            model, tokenizer = self._load()
            self.cache_settings.check_head_size(model.config.head_dim)  # else every request would fail
            self.model, self.tokenizer = model, tokenizer
            if self._load_draft is not None:
                self._on_status("loading the draft model")
                self.options["draft_model"] = self._load_draft(self.tokenizer)
            self._on_status("ready")
        except Exception as e:  # any failure is reported to every request, the thread lives on
            self.load_error = e if isinstance(e, QwenMLXError) else QwenMLXError(f"the model failed to load: {e}")
            log.error("the model failed to load", exc_info=not isinstance(e, QwenMLXError))
            self._on_status(f"failed: {self.load_error}")
            if self.lockstep is not None:
                self._abort(self.load_error)
        decoder = Decoder(self.model, self.tokenizer, timed=self.lockstep is None) \
            if self.model and self.tokenizer else None
        self._decoder = decoder
        if self.model is not None:
            self.prefixes = self._prefix_cache(self.model)
        self.lifecycle.move_from((Phase.LOADING,), Phase.SERVING)
        while not self._drained() and not self.lifecycle.is_in(Phase.FINISHED):
            try:
                if self.lockstep is not None:
                    assert decoder is not None  # a rank whose model failed to load has ended (`_abort`)
                    self._lockstep_turn(self.lockstep, decoder)
                else:
                    self._take_inbox(block=not self._running and not self._queued)
                    self._admit(decoder)
                if self._running:
                    assert decoder is not None  # jobs run only with a model (`_admissions` ends them otherwise)
                    self._step(decoder)
                else:
                    for idle in self._idle_waiters:
                        idle.set()
                    self._idle_waiters.clear()
            except Exception as e:  # a bug here must not end the thread: fail what is running, go on
                if self.lockstep is not None:  # ... unless the ranks may no longer be in step
                    self._abort(e)
                log.exception("the model thread hit an error; failing the running jobs")
                self._fail_all(decoder, QwenMLXError("internal error while generating; see the server log"))

    def _drained(self) -> bool:
        """An unload was asked and every job it cancelled has ended (including those still in the inbox)."""
        return self.lifecycle.is_in(Phase.DRAINING) and not self._running and not self._queued \
            and self._inbox.empty()

    def _drop_model(self) -> None:
        """`unload`'s end: nothing may keep a reference to the model's or the caches' arrays, or their memory stays.
        The prefix cache's entries go to its disk tier first, so the model's next load resumes them."""
        mx.synchronize()
        if self.prefixes is not None and self.prefixes.disk is not None:
            self.prefixes.flush()
            self.replies.save()
        self.model = self.tokenizer = self._decoder = self.prefixes = None
        self.options.pop("draft_model", None)
        self._entry_of.clear()
        gc.collect()  # modules and caches may sit in reference cycles
        mx.clear_cache()
        self.lifecycle.move(Phase.UNLOADED)

    def _abort(self, error: BaseException) -> NoReturn:
        """End this rank's process with one line: the ranks can no longer take the same steps."""
        assert self.lockstep is not None  # only ranks in lockstep abort
        rank = self.lockstep.group.rank()
        if not isinstance(error, QwenMLXError):
            log.error("rank %d failed", rank, exc_info=(type(error), error, error.__traceback__))
        print(f"qwen-mlx: error: [rank {rank}] {error}; stopping", file=sys.stderr, flush=True)
        os._exit(2)

    def _lockstep_turn(self, lockstep: Lockstep, decoder: Decoder) -> None:
        """One turn of the loop as every rank takes it: rank 0's plan, shared, then acted on."""
        plan = None
        if lockstep.leads:
            idle = not self._running and not self._queued
            # Idle, rank 0 still shares an (empty) plan every HEARTBEAT_S: a lost rank is noticed, not waited on.
            self._take_inbox(block=idle, timeout=HEARTBEAT_S if idle else None)
            plan = self._plan()
        plan = lockstep.share(plan)
        for session in plan.forget:
            self._loaded_prefixes().drop(self._entry_of.pop(session, None))
        for uid in plan.cancel:
            if uid in self._by_uid:
                self._by_uid[uid].cancel.set()
        for start in plan.start:
            job = self._job_for(lockstep, start)
            self._start(decoder, job, uid=start.uid)
            if lockstep.leads:
                self._left_queue(job)
        if plan.exit:
            self.lifecycle.move(Phase.FINISHED)

    def _plan(self) -> Plan:
        """Rank 0's decisions of this turn: what to forget, cancel and start, or to stop."""
        # Closing, rank 0 tells the others to exit once nothing runs (`close` waits for that).
        plan = Plan(forget=self._forgotten, exit=self.lifecycle.is_in(Phase.CLOSING) and not self._running)
        self._forgotten = []
        plan.cancel = [r.uid for r in self._running.values()
                       if r.uid is not None and r.job.cancelled.is_set() and not r.cancel.is_set()]
        if plan.exit:
            return plan
        for job in self._admissions():
            uid = next(self._uids)
            assert job.request is not None  # a queued job has its request (only one refused before has none)
            data = encode_request(job.request)
            job.request = replace(job.request, seed=data["seed"])
            self._admitted[uid] = job
            plan.start.append(Start(uid, job.session, data))
        return plan

    def _job_for(self, lockstep: Lockstep, start: Start) -> Job:
        if lockstep.leads:
            return self._admitted.pop(start.uid)
        draft = self.options.get("draft_model")
        return Job(start.session, decode_request(start.request, draft), discard=True)

    def _prefix_cache(self, model: nn.Module) -> PrefixCache:
        if self.lockstep is not None:
            # Every rank's cache must keep and drop the same entries: rank 0's budget for all, in bytes every rank
            # counts alike (a stage's first layer times all the layers), and no disk tier (disks differ).
            plan = Plan(settings={"ram_bytes": self.tiers.ram_bytes}) if self.lockstep.leads else None
            settings = self.lockstep.share(plan).settings
            assert settings is not None  # rank 0 sent them in this plan
            ram_bytes = settings["ram_bytes"]
            layers = model.config.num_hidden_layers
            return PrefixCache(model, self.cache_settings, ram_bytes,
                               entry_bytes=lambda cache: cache.caches[0].nbytes * layers)
        disk = None
        if self.tiers.folder is not None and self.tiers.disk_bytes > 0 and model.fingerprint:
            tag = settings_tag(self.cache_settings)
            if model.config.dynamic_rope_scaling is not None:
                # YaRN on demand: an entry's keys may be rotated with YaRN, which a model without it cannot read.
                tag += f"-yarn{model.config.context_length}"
            try:
                disk = DiskTier(self.tiers.folder / model.fingerprint / tag, model.fingerprint, tag,
                                self.tiers.disk_bytes)
                self.replies = ReplyMemory(disk.folder.parent / "replies.json")
            except OSError as e:
                log.warning("no disk tier for the prefix cache (%s): %s", self.tiers.folder, e)
            except Exception:  # a cache must never keep the model from serving: without it, and the bug logged
                log.exception("no disk tier for the prefix cache (%s)", self.tiers.folder)
        return PrefixCache(model, self.cache_settings, self.tiers.ram_bytes, disk)

    def _take_inbox(self, block: bool, timeout: float | None = None) -> None:
        """Move submitted jobs to the queue and run errands; wait for one when there is nothing else to do."""
        try:
            item = self._inbox.get(block=block, timeout=timeout)
            while True:
                if isinstance(item, Job):
                    self._queued.append(item)
                elif isinstance(item, Forget):
                    if self.lockstep is not None:
                        self._forgotten.append(item.session)
                    elif self.prefixes is not None:
                        self.prefixes.drop(self._entry_of.pop(item.session, None))
                else:
                    item()
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self, decoder: Decoder | None) -> None:
        for job in self._admissions():
            assert decoder is not None  # jobs start only with a model (`_admissions` ends them otherwise)
            self._start(decoder, job)
            self._left_queue(job)

    def _left_queue(self, job: Job) -> None:
        with self._lock:  # only once it has a row: `idle` must not read true between the queue and the row
            self._waiting.remove(job)

    def _admissions(self) -> list[Job]:
        """The queued jobs to start while rows are free (those cancelled meanwhile end here); a job whose
        conversation is still generating (a double send) waits for it, in order, without holding up the others."""
        deferred: list[Job] = []
        starting: list[Job] = []
        while self._queued and len(self._running) + len(starting) < self.max_batch:
            job = self._queued.popleft()
            if job.session is not None and job.session in self._busy_sessions:
                deferred.append(job)
                continue
            if self.load_error is not None:
                self._end(job, self.load_error)
                self._left_queue(job)
            elif job.cancelled.is_set() or self.lifecycle.is_in(Phase.CLOSING, Phase.DRAINING):  # ended while queued
                self._end(job, GenerationChunk("", None, "cancelled"))
                self._left_queue(job)
            else:
                starting.append(job)
                if job.session is not None:
                    self._busy_sessions.add(job.session)
        self._queued.extendleft(reversed(deferred))
        for job in starting:
            self._busy_sessions.discard(job.session)
        return starting

    def _start(self, decoder: Decoder, job: Job, uid: int | None = None) -> None:
        request = job.request
        assert request is not None  # a queued job has its request (only one refused before has none)
        # Under lockstep the decoder sees a cancel only once every rank has it (`_lockstep_turn`).
        cancel = job.cancelled if uid is None else threading.Event()
        if not self._running:
            mx.reset_peak_memory()  # a reply's peak memory counts from when the model last went busy
        prefixes = self._loaded_prefixes()
        cache = prefixes.acquire(request.prompt_ids)

        def on_prefill(done: int, total: int) -> None:
            job.prefill = (done, total)
            if done == total - 1 and not cache.is_trimmable():
                # A rotating cache that wrapped in this prompt cannot be trimmed back to it later: keep the
                # prompt's state as a checkpoint, so regenerating this turn does not rebuild it from nothing.
                prefixes.checkpoint(cache)

        try:
            sequence = decoder.add(request, cache, cancel, on_prefill=on_prefill)
        except Exception as e:
            self._end(job, e if isinstance(e, QwenMLXError) else QwenMLXError(f"generation failed: {e}"))
            return
        if job.session is not None:
            self._busy_sessions.add(job.session)
        reply = ReplyText(decoder.tokenizer, sequence, decoder.model.config.context_length)
        self._running[sequence] = running = Running(job, sequence, reply, cancel, uid)
        if uid is not None:
            self._by_uid[uid] = running
        job.started.set()

    def _step(self, decoder: Decoder) -> None:
        replies = {s: r.reply for s, r in self._running.items()}
        passes = decoder.passes
        for reply, chunk in text_chunks(decoder, replies):
            self.counters.decode_passes += decoder.passes - passes
            passes = decoder.passes
            running = self._running[reply.sequence]
            if chunk.finish_reason == "error":
                error = reply.sequence.error
                assert error is not None  # set with finish "error" (`Decoder.fail`)
                log.log(logging.INFO if isinstance(error, QwenMLXError) else logging.ERROR, "a generation failed",
                        exc_info=(type(error), error, error.__traceback__) if not isinstance(error, QwenMLXError)
                        else None)
                self._stop(running, error=error)
                continue
            if chunk.token is not None:
                self.counters.generated_tokens += 1
                with self._lock:
                    self._token_times.append(time.monotonic())
            running.job.put(chunk)
            if chunk.finish_reason is not None:
                if chunk.stats is not None:
                    self.counters.count_reply(chunk.stats)
                self._stop(running)
        self.counters.decode_passes += decoder.passes - passes

    def _stop(self, running: Running, error: BaseException | None = None) -> None:
        del self._running[running.sequence]
        if running.uid is not None:
            self._by_uid.pop(running.uid, None)
        session = running.job.session
        self._busy_sessions.discard(session)
        if error is None:  # a failed one may hold a half-written step: not kept
            self._loaded_prefixes().release(running.sequence.cache)
            if session is not None:
                self._entry_of[session] = running.sequence.cache
        if not self._running:
            # A cancelled generation leaves its next step computing: wait for it, so that nothing runs on this
            # thread's stream while it is idle or when the process exits (MLX then aborts).
            mx.synchronize()
        if error is not None:
            self._end(running.job, error)
        else:
            running.job.done.set()

    def _loaded_prefixes(self) -> PrefixCache:
        """The prefix cache, which jobs on the thread always have: it is made with the model, and dropped only
        once they have ended."""
        assert self.prefixes is not None
        return self.prefixes

    def _fail_all(self, decoder: Decoder | None, error: QwenMLXError) -> None:
        if decoder is not None:
            decoder.clear()
        for running in list(self._running.values()):
            self._stop(running, error=error)

    def _end(self, job: Job, item: GenerationChunk | BaseException) -> None:
        job.put(item)
        job.done.set()
