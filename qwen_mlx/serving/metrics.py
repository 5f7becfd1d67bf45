"""`GET /metrics`: the server's numbers in Prometheus' text format.

Nothing is counted twice: at each scrape a collector reads the numbers `/health` reads (the registry's
`UsageCounters`, each loaded model's queue and prefix cache, MLX's allocator), into a `CollectorRegistry` of the
server's own, never prometheus_client's global one (two servers in one process, the tests, keep apart).
`CountAnswers` adds the one number only the HTTP layer sees: the answers by API and status.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields

import mlx.core as mx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen_mlx.engine.prefix_cache import CacheStats
from qwen_mlx.engine.registry import ModelRegistry
from qwen_mlx.engine.worker import Histogram, ModelWorker, UsageCounters

PREFIX = "qwen_mlx"


def api_of(path: str) -> str:
    """The API a path belongs to, the `api` label of the answers counted."""
    if path.startswith("/v1/responses"):
        return "responses"
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith("/v1/"):
        return "openai"
    return "server"  # /health, /metrics, unknown paths


class CountAnswers:
    """ASGI middleware: every answer's status, by API, into the server's counters (outermost, so the guard's
    refusals count too). A stream counts once, by the status it started with."""

    def __init__(self, app: ASGIApp, counters: UsageCounters):
        self.app, self.counters = app, counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counters.count_http(api_of(scope["path"]), message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def metrics_text(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def server_registry(models: ModelRegistry, max_batch: int) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(models, max_batch))
    return registry


class ServerCollector(Collector):
    """Reads the server's numbers at each scrape."""

    def __init__(self, models: ModelRegistry, max_batch: int):
        self.models, self.max_batch = models, max_batch

    def collect(self) -> Iterator[Metric]:
        counters = self.models.counters
        loaded = self.models.loaded()
        workers = [e.worker for e in loaded if e.worker.loaded]
        yield from usage_metrics(counters)
        yield from queue_metrics(workers, self.max_batch)
        yield from cache_metrics(total_cache_stats(workers))
        models = GaugeMetricFamily(f"{PREFIX}_models_loaded", "Models loaded (or loading)")
        models.add_metric([], len(loaded))
        yield models
        size = GaugeMetricFamily(f"{PREFIX}_model_size_bytes", "Bytes of each loaded model's weights in memory",
                                 labels=["model"])
        for entry in loaded:
            size.add_metric([entry.name], entry.size)
        yield size
        # MLX's allocator is per process: every model's weights and caches, and the buffers kept for reuse.
        memory = GaugeMetricFamily(f"{PREFIX}_memory_bytes", "MLX memory in use (active), kept for reuse (cache), "
                                   "and the peak since the models last went busy", labels=["kind"])
        for kind, value in (("active", mx.get_active_memory()), ("cache", mx.get_cache_memory()),
                            ("peak", mx.get_peak_memory())):
            memory.add_metric([kind], value)
        yield memory


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def usage_metrics(counters: UsageCounters) -> Iterator[Metric]:
    answers = CounterMetricFamily(f"{PREFIX}_http_requests", "HTTP requests answered, by API and status",
                                  labels=["api", "status"])
    with counters.lock:
        for (api, status), count in sorted(counters.http_requests.items()):
            answers.add_metric([api, str(status)], count)
    yield answers
    yield counter("generation_requests", "Generation requests submitted to a model", counters.requests)
    yield counter("replies", "Replies finished (stopped, cut at their token limit, or cancelled)", counters.replies)
    yield counter("prompt_tokens", "Prompt tokens of finished replies, cached ones included", counters.prompt_tokens)
    yield counter("prefilled_tokens", "Prompt tokens computed (not read from the prefix cache)",
                  counters.prefilled_tokens)
    yield counter("generated_tokens", "Tokens generated", counters.generated_tokens)
    yield counter("decode_passes", "Forward passes that produced tokens (one per step for every row in the batch)",
                  counters.decode_passes)
    yield counter("draft_tokens", "Speculative decoding: tokens drafted and verified", counters.draft_tokens)
    yield counter("accepted_draft_tokens", "Speculative decoding: drafted tokens the model accepted",
                  counters.accepted_draft_tokens)
    yield histogram("time_to_first_token_seconds", "Seconds from a reply's start (its prefill) to its first token",
                    counters.time_to_first_token)
    yield histogram("time_per_output_token_seconds", "Seconds per token after the first, one observation per reply",
                    counters.time_per_output_token)


def histogram(name: str, documentation: str, observed: Histogram) -> HistogramMetricFamily:
    buckets, total = [], 0
    for bound, count in zip([*map(str, observed.bounds), "+Inf"], observed.counts, strict=True):
        total += count
        buckets.append((bound, total))  # Prometheus' buckets are cumulative
    return HistogramMetricFamily(f"{PREFIX}_{name}", documentation, buckets=buckets, sum_value=observed.total)


def queue_metrics(workers: list[ModelWorker], max_batch: int) -> Iterator[Metric]:
    for name, documentation, value in (
        ("requests_waiting", "Requests queued for a free row", sum(w.waiting for w in workers)),
        ("requests_running", "Rows decoding or prefilling now", sum(w.active for w in workers)),
        ("max_batch", "Rows each model decodes together at most (--max-batch)", max_batch),
        ("tokens_per_second", "Tokens generated per second over the last 10 s, all models",
         sum(w.tokens_per_second() for w in workers)),
    ):
        gauge = GaugeMetricFamily(f"{PREFIX}_{name}", documentation)
        gauge.add_metric([], value)
        yield gauge


def cache_metrics(stats: CacheStats) -> Iterator[Metric]:
    hits = CounterMetricFamily(f"{PREFIX}_prefix_cache_hits", "Requests that started from a cached prefix, by the "
                               "tier it came from (counted since each model loaded)", labels=["tier"])
    hits.add_metric(["ram"], stats.hits - stats.disk_hits)
    hits.add_metric(["disk"], stats.disk_hits)
    yield hits
    yield counter("prefix_cache_misses", "Requests that found no cached prefix", stats.misses)
    yield counter("prefix_cache_reused_tokens", "Prompt tokens read from the prefix cache instead of computed",
                  stats.reused_tokens)
    for name, documentation, ram, disk in (
        ("prefix_cache_bytes", "Bytes the prefix cache holds, by tier", stats.ram_bytes, stats.disk_bytes),
        ("prefix_cache_entries", "Entries in the prefix cache, by tier", stats.ram_entries, stats.disk_entries),
    ):
        gauge = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=["tier"])
        gauge.add_metric(["ram"], ram)
        gauge.add_metric(["disk"], disk)
        yield gauge


def total_cache_stats(workers: list[ModelWorker]) -> CacheStats:
    """The prefix caches of every loaded model, counted together."""
    total = CacheStats()
    for worker in workers:
        for f in fields(CacheStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(worker.cache_stats(), f.name))
    return total
