"""`GET /metrics` on `qwen-mlx serve --demo`, read by prometheus_client's own parser: the counters rise with a
request, they are the numbers /health shows, and the page is behind the API key while /health is not."""

from __future__ import annotations

import httpx
import pytest
from conftest import DEMO_KEY
from prometheus_client.parser import text_string_to_metric_families

from qwen_mlx.engine.worker import Histogram, UsageCounters
from qwen_mlx.serving.metrics import api_of, histogram

MODEL = "qwen2-demo"
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}


def scrape(server: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, by name and labels."""
    response = httpx.get(f"{server}/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_counters_rise_with_a_request(demo_server: str) -> None:
    before = scrape(demo_server)
    reply = httpx.post(f"{demo_server}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 5})
    assert reply.status_code == 200
    usage = reply.json()["usage"]
    after = scrape(demo_server)

    def rise(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert rise("qwen_mlx_http_requests_total", api="openai", status="200") == 1
    assert rise("qwen_mlx_generation_requests_total") == 1 and rise("qwen_mlx_replies_total") == 1
    assert rise("qwen_mlx_prompt_tokens_total") == usage["prompt_tokens"]
    assert rise("qwen_mlx_prefilled_tokens_total") == \
        usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert rise("qwen_mlx_generated_tokens_total") == usage["completion_tokens"] == 5
    assert rise("qwen_mlx_time_to_first_token_seconds_count") == 1
    assert rise("qwen_mlx_time_to_first_token_seconds_sum") > 0
    assert rise("qwen_mlx_time_per_output_token_seconds_count") == 1
    assert rise("qwen_mlx_time_to_first_token_seconds_bucket", le="+Inf") == 1
    assert rise("qwen_mlx_http_requests_total", api="server", status="200") >= 1  # the scrape before this one
    assert value(after, "qwen_mlx_models_loaded") == 1
    assert value(after, "qwen_mlx_model_size_bytes", model=MODEL) > 0
    assert value(after, "qwen_mlx_memory_bytes", kind="active") > 0
    assert value(after, "qwen_mlx_requests_running") == 0 and value(after, "qwen_mlx_max_batch") == 8


def test_the_numbers_are_the_ones_health_shows(demo_server: str) -> None:
    httpx.post(f"{demo_server}/v1/messages", headers={"x-api-key": DEMO_KEY}, timeout=120, json={
        "model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]})
    health = httpx.get(f"{demo_server}/health", timeout=30).json()  # /health needs no key
    samples = scrape(demo_server)
    assert value(samples, "qwen_mlx_generated_tokens_total") == health["generated_tokens"]
    assert value(samples, "qwen_mlx_generation_requests_total") == health["requests"]
    assert value(samples, "qwen_mlx_prompt_tokens_total") == health["prompt_tokens"]
    assert value(samples, "qwen_mlx_decode_passes_total") == health["decode_passes"]
    cache = health["prefix_cache"]
    assert value(samples, "qwen_mlx_prefix_cache_hits_total", tier="ram") + \
        value(samples, "qwen_mlx_prefix_cache_hits_total", tier="disk") == cache["hits"]
    assert value(samples, "qwen_mlx_prefix_cache_bytes", tier="ram") == cache["ram_bytes"]
    assert value(samples, "qwen_mlx_prefix_cache_reused_tokens_total") == cache["reused_tokens"]
    assert value(samples, "qwen_mlx_http_requests_total", api="anthropic", status="200") >= 1


def test_metrics_are_behind_the_api_key(demo_server: str) -> None:
    assert httpx.get(f"{demo_server}/metrics", timeout=30).status_code == 401
    before = scrape(demo_server)
    httpx.get(f"{demo_server}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert value(scrape(demo_server), "qwen_mlx_http_requests_total", api="server", status="401") == \
        value(before, "qwen_mlx_http_requests_total", api="server", status="401") + 1


@pytest.mark.parametrize(("path", "api"), [("/v1/responses", "responses"), ("/v1/responses/resp_1", "responses"),
                                           ("/v1/messages/count_tokens", "anthropic"), ("/api/chat", "ollama"),
                                           ("/v1/chat/completions", "openai"), ("/health", "server")])
def test_each_path_counts_for_its_api(path: str, api: str) -> None:
    assert api_of(path) == api


def test_a_histogram_reads_as_cumulative_buckets() -> None:
    latencies = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 7.0):
        latencies.observe(seconds)
    family = histogram("latency_seconds", "test", latencies)
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4} and latencies.count == 4
    assert UsageCounters().time_to_first_token.count == 0  # each server's counters start empty
