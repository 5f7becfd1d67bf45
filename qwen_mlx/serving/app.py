"""The HTTP server (`qwen-mlx serve`): OpenAI's, Ollama's and Anthropic's APIs on one port, over the local models.

    OpenAI      POST /v1/chat/completions, /v1/completions; GET /v1/models, /v1/models/{id}
    Ollama      POST /api/chat, /api/generate (NDJSON streams), /api/show, /api/pull; GET /api/tags, /api/ps,
                /api/version; DELETE /api/delete
    OpenAI      POST /v1/responses (the Responses API), GET / DELETE /v1/responses/{id}
    Anthropic   POST /v1/messages (server-sent events when streamed), /v1/messages/count_tokens
    GET /health status, loaded models, memory, queue and token counters (no key needed)
    GET /metrics the same numbers and more, in Prometheus' text format

A request's `model` picks the model: any local one (`registry.LocalModels`), loaded on first use, at most
`--max-models` at a time, unloaded after `--keep-alive` idle (`registry.ModelRegistry`). All model work runs on
each model's worker thread (MLX streams are thread-local; uvicorn runs handlers elsewhere), fed by a bounded
queue: when it is full, requests get 503 at once. A client that disconnects cancels its generation within a
token. Every request first passes `guard.RequestGuard` (Host, Origin, content type, body size). Nothing a request
does escapes its handler: every error is a JSON answer in its API's own shape, and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial, wraps
from typing import Any, Protocol, TypeVar

import mlx.core as mx
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwen_mlx.engine.generate import GenerationChunk
from qwen_mlx.engine.registry import LoadedModel, ModelNotFound, ModelRegistry, ModelsBusy, keep_alive_seconds
from qwen_mlx.engine.request import GenerationRequest, check_nesting
from qwen_mlx.engine.worker import Job, WorkerBusy
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.serving import anthropic_api, ollama_api, responses_api
from qwen_mlx.serving.guard import GuardSettings, RequestGuard
from qwen_mlx.serving.metrics import CountAnswers, metrics_text, server_registry, total_cache_stats
from qwen_mlx.serving.openai_api import ResponseBuilder, parse_chat_request, parse_completion_request
from qwen_mlx.serving.protocol import APIError, ServedModel
from qwen_mlx.store.catalog import describe_folder, find_local, home_models, remove, repo_id_for
from qwen_mlx.store.hub import download
from qwen_mlx.store.names import unknown_name
from qwen_mlx.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1  # how often a non-streamed request checks that its client is still there
PULL_REPORT_S = 0.25  # most often a streamed /api/pull reports progress

Handler = Callable[[HTTPRequest], Awaitable[Response]]
ErrorShape = Callable[[APIError], JSONResponse]
Payload_co = TypeVar("Payload_co", covariant=True)


class ParsedRequest(Protocol):
    """What every API's parser makes of a body: its own fields, and the checked generation request."""

    @property
    def generation(self) -> GenerationRequest: ...


ParsedT = TypeVar("ParsedT", bound=ParsedRequest)


class ReplyBuilder(Protocol[Payload_co]):
    """An API's reply from a job's chunks: each chunk's stream payloads (`add`), then the last chunk's and the
    whole reply (`finish`)."""

    def add(self, chunk: GenerationChunk) -> Sequence[Payload_co]: ...

    def finish(self, last: GenerationChunk) -> tuple[Sequence[Payload_co], dict[str, Any]]: ...


@dataclass(frozen=True)
class ServerSettings:
    model_id: str  # the model the server started with (what /health names)
    api_key: str | None = None
    guard: GuardSettings = field(default_factory=lambda: GuardSettings.for_server("127.0.0.1"))
    max_batch: int = 1


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def ollama_error_response(error: APIError) -> JSONResponse:
    return JSONResponse(ollama_api.error_body(error.message), status_code=error.status)


def anthropic_error_response(error: APIError) -> JSONResponse:
    return JSONResponse(anthropic_api.error_body(error.status, error.message), status_code=error.status)


def error_body_for(path: str, error: APIError) -> dict[str, Any]:
    """An error outside the routes' handlers (a refusal of the guard's, no such route or method) in the shape of
    the API `path` belongs to, which is what its clients read: Ollama's under /api/, Anthropic's under
    /v1/messages, else OpenAI's."""
    if path.startswith("/api/"):
        return ollama_api.error_body(error.message)
    if path.startswith("/v1/messages"):
        return anthropic_api.error_body(error.status, error.message)
    return error.body()


def error_response_for(path: str, error: APIError) -> JSONResponse:
    return JSONResponse(error_body_for(path, error), status_code=error.status)


def guard_error_body(path: str, status: int, message: str, code: str) -> dict[str, Any]:
    return error_body_for(path, APIError(status, message, code=code))


def api_error(e: Exception) -> APIError:
    """Any failure of a request as the error to answer: a user mistake 400, an unknown model 404, a full queue 503,
    a bug 500 (logged)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ModelNotFound):
        return APIError(404, str(e), "model", "model_not_found")
    if isinstance(e, ModelsBusy | WorkerBusy):
        return APIError(503, str(e), kind="server_error", code="server_busy")
    if isinstance(e, QwenMLXError):
        return APIError(400, str(e), e.field)
    log.exception("a request failed", exc_info=e)
    return APIError(500, f"internal error ({type(e).__name__}: {e})", kind="server_error")


def answers_errors(handler: Handler, shape: ErrorShape = error_response) -> Handler:
    """Every failure of a request becomes its JSON answer, in its API's shape; none escapes to the server, which
    would cut the connection."""

    @wraps(handler)
    async def guarded(request: HTTPRequest) -> Response:
        try:
            return await handler(request)
        except Exception as e:
            return shape(api_error(e))

    return guarded


def parse_json(raw: bytes) -> Any:
    """The body as JSON, refused by name when it is not JSON or nests deeper than parsers should follow."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to read") from None
    try:
        check_nesting("the request body", body)
    except QwenMLXError as e:
        raise APIError(400, str(e)) from None
    return body


def ndjson(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False) + "\n"


def sse_event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Endpoints:
    """The routes of all three APIs over one model registry."""

    def __init__(self, registry: ModelRegistry, settings: ServerSettings):
        self.registry = registry
        self.settings = settings
        self.stored = responses_api.ResponseStore()  # the Responses API's, for previous_response_id and GET
        self.metrics = server_registry(registry, settings.max_batch)

    def routes(self) -> list[Route]:
        ollama, anthropic = ollama_error_response, anthropic_error_response
        return [
            Route("/health", self.health),
            Route("/metrics", answers_errors(self.prometheus)),
            Route("/v1/models", answers_errors(self.models)),
            Route("/v1/models/{model_id:path}", answers_errors(self.model)),
            Route("/v1/chat/completions", answers_errors(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", answers_errors(self.text_completions), methods=["POST"]),
            Route("/v1/responses", answers_errors(self.responses), methods=["POST"]),
            Route("/v1/responses/{response_id}", answers_errors(self.stored_response), methods=["GET", "DELETE"]),
            Route("/v1/messages", answers_errors(self.messages, anthropic), methods=["POST"]),
            Route("/v1/messages/count_tokens", answers_errors(self.count_tokens, anthropic), methods=["POST"]),
            Route("/api/chat", answers_errors(self.ollama_chat, ollama), methods=["POST"]),
            Route("/api/generate", answers_errors(self.ollama_generate, ollama), methods=["POST"]),
            Route("/api/tags", answers_errors(self.tags, ollama)),
            Route("/api/show", answers_errors(self.show, ollama), methods=["POST"]),
            Route("/api/ps", answers_errors(self.ps, ollama)),
            Route("/api/pull", answers_errors(self.pull, ollama), methods=["POST"]),
            Route("/api/delete", answers_errors(self.delete, ollama), methods=["DELETE"]),
            Route("/api/version", answers_errors(self.version, ollama)),
        ]

    # --- shared ---

    def check_key(self, request: HTTPRequest) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 7235); the key is compared in constant time. Anthropic's clients
        # send theirs as x-api-key.
        bearer = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())
        if not bearer and not hmac.compare_digest(request.headers.get("x-api-key", "").encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"
                                " with the key given to --api-key", kind="invalid_request_error",
                           code="invalid_api_key")

    async def body(self, request: HTTPRequest) -> Any:
        self.check_key(request)
        # Parsing a large request takes a while: not on the event loop's thread.
        return await asyncio.to_thread(parse_json, await request.body())

    async def acquire(self, name: Any) -> LoadedModel:
        """The model a request names, loaded (waiting for its load, off the event loop)."""
        if not isinstance(name, str) or not name.strip():
            raise APIError(400, "model is required: name one of GET /v1/models", "model")
        try:
            return await asyncio.to_thread(self.registry.acquire, name)
        except (ModelNotFound, ModelsBusy):
            raise
        except QwenMLXError as e:  # the model failed to load: the server's trouble, not the request's
            raise APIError(500, str(e), kind="server_error") from None

    @staticmethod
    def served(entry: LoadedModel) -> ServedModel:
        worker = entry.worker
        assert worker.model is not None and worker.tokenizer is not None  # `acquire` gives a model loaded well
        return ServedModel(entry.name, worker.model, worker.tokenizer, worker.options, worker.replies)

    async def start(self, body: Any, parse: Callable[[Any, ServedModel], ParsedT],
                    keep_alive: float | None | str = "default") -> tuple[LoadedModel, ParsedT, Job, asyncio.Event]:
        """Acquire the body's model, check the request against it, submit its job; the model is released once the
        job is with the worker (whose queue then keeps the model loaded)."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        entry = await self.acquire(body.get("model"))
        try:
            parsed = await asyncio.to_thread(parse, body, self.served(entry))
            wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            job = entry.worker.submit_request(None, parsed.generation,
                                              notify=lambda: loop.call_soon_threadsafe(wake.set))
        finally:
            self.registry.release(entry, keep_alive)
        self.registry.counters.requests += 1
        return entry, parsed, job, wake

    # --- monitoring and listings ---

    async def health(self, request: HTTPRequest) -> Response:
        loaded = self.registry.loaded()
        workers = [e.worker for e in loaded if e.worker.loaded]
        now = time.monotonic()
        return JSONResponse({
            "status": "ok", "model": self.settings.model_id, "busy": any(w.busy for w in workers),
            "active": sum(w.active for w in workers), "waiting": sum(w.waiting for w in workers),
            "max_batch": self.settings.max_batch, "requests": self.registry.counters.requests,
            "prompt_tokens": self.registry.counters.prompt_tokens,
            "generated_tokens": self.registry.counters.generated_tokens,
            "decode_passes": self.registry.counters.decode_passes,
            "tokens_per_second": round(sum(w.tokens_per_second() for w in workers), 2),
            "prefix_cache": asdict(total_cache_stats(workers)),
            "max_models": self.registry.max_models,
            "models": [{"name": e.name, "state": "ready" if e.loaded_at is not None else "loading",
                        "size_bytes": e.size, "load_seconds": round(e.load_seconds, 3),
                        "expires_in": e.expires_in(now), "active": e.worker.active, "waiting": e.worker.waiting}
                       for e in loaded],
            # MLX's allocator is per process: every model's weights and caches, and the buffers kept for reuse.
            "memory": {"active_bytes": mx.get_active_memory(), "cache_bytes": mx.get_cache_memory(),
                       "peak_bytes": mx.get_peak_memory()},
        })

    async def prometheus(self, request: HTTPRequest) -> Response:
        self.check_key(request)
        text, content_type = await asyncio.to_thread(metrics_text, self.metrics)
        return Response(text, media_type=content_type)

    async def models(self, request: HTTPRequest) -> Response:
        self.check_key(request)
        listing = await asyncio.to_thread(self.registry.models.listing)
        return JSONResponse({"object": "list", "data": [model_card(m.name, m.modified) for m in listing]})

    async def model(self, request: HTTPRequest) -> Response:
        self.check_key(request)
        source = await asyncio.to_thread(self.registry.models.resolve, request.path_params["model_id"])
        model = await asyncio.to_thread(describe_folder, source.name, source.folder)
        return JSONResponse(model_card(source.name, model.modified))

    # --- OpenAI ---

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self.completions(request, chat=True)

    async def text_completions(self, request: HTTPRequest) -> Response:
        return await self.completions(request, chat=False)

    async def completions(self, request: HTTPRequest, chat: bool) -> Response:
        body = await self.body(request)
        entry, parsed, job, wake = await self.start(body, parse_chat_request if chat else parse_completion_request)
        reply = ResponseBuilder(parsed, self.served(entry))
        if parsed.stream:
            return StreamingResponse(stream(job, wake, reply), media_type="text/event-stream", headers=STREAM_HEADERS)
        return JSONResponse(await whole_reply(request, job, wake, reply))

    # --- OpenAI's Responses API ---

    async def responses(self, request: HTTPRequest) -> Response:
        body = await self.body(request)
        entry, parsed, job, wake = await self.start(body, partial(responses_api.parse_request, store=self.stored))
        reply = responses_api.ResponsesReply(parsed, self.served(entry), self.stored)
        if parsed.stream:
            return StreamingResponse(named_events(job, wake, reply, reply.start(), reply.error_event),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        return JSONResponse(await whole_reply(request, job, wake, reply))

    async def stored_response(self, request: HTTPRequest) -> Response:
        self.check_key(request)
        response_id = request.path_params["response_id"]
        if request.method == "DELETE":
            return JSONResponse(self.stored.delete(response_id))
        return JSONResponse(self.stored.get(response_id).response)

    # --- Anthropic ---

    async def messages(self, request: HTTPRequest) -> Response:
        body = await self.body(request)
        if isinstance(body, dict) and body.get("max_tokens") is None:
            raise APIError(400, "max_tokens: Field required", "max_tokens")  # before any model is loaded for it
        entry, parsed, job, wake = await self.start(body, anthropic_api.parse_messages)
        reply = anthropic_api.AnthropicReply(parsed, self.served(entry))
        if parsed.stream:
            return StreamingResponse(named_events(job, wake, reply, reply.start(len(parsed.generation.prompt_ids)),
                                                  anthropic_error_event),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        return JSONResponse(await whole_reply(request, job, wake, reply))

    async def count_tokens(self, request: HTTPRequest) -> Response:
        """Anthropic's token count: the messages checked as for a reply, and their prompt measured; nothing
        generated (the model is loaded to read its tokenizer and chat template)."""
        body = await self.body(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        entry = await self.acquire(body.get("model"))
        try:
            count = await asyncio.to_thread(anthropic_api.count_tokens, body, self.served(entry))
        finally:
            self.registry.release(entry)
        return JSONResponse({"input_tokens": count})

    # --- Ollama ---

    async def ollama_chat(self, request: HTTPRequest) -> Response:
        return await self.ollama_reply(request, chat=True)

    async def ollama_generate(self, request: HTTPRequest) -> Response:
        return await self.ollama_reply(request, chat=False)

    async def ollama_reply(self, request: HTTPRequest, chat: bool) -> Response:
        body = await self.body(request)
        name = ollama_api.model_name(body)
        keep_alive: float | None | str = "default"
        if body.get("keep_alive") is not None:
            keep_alive = keep_alive_seconds(body["keep_alive"])
        if ollama_api.is_load_request(body, chat):
            return await self.load_or_unload(name, keep_alive)
        began = time.time()
        entry, parsed, job, wake = await self.start(body, ollama_api.parse_chat if chat else ollama_api.parse_generate,
                                                    keep_alive)
        # Ollama's load_duration: the model's load when this request is what loaded it, else 0.
        loaded_now = entry.loaded_at is not None and entry.loaded_at >= began
        load_seconds = entry.load_seconds if loaded_now else 0.0
        reply = ollama_api.OllamaReply(parsed, self.served(entry), load_seconds=load_seconds)
        if parsed.stream:
            return StreamingResponse(ollama_lines(job, wake, reply), media_type="application/x-ndjson")
        return JSONResponse(await whole_reply(request, job, wake, reply))

    async def load_or_unload(self, name: str, keep_alive: float | None | str) -> Response:
        """Ollama's empty request: load the model (and set its keep-alive), or with keep_alive 0 unload it."""
        if keep_alive == 0:
            unloaded = await asyncio.to_thread(self.registry.unload, name)
            if not unloaded:
                await asyncio.to_thread(self.registry.models.resolve, name)  # 404 for a model that does not exist
            return JSONResponse(ollama_api.load_reply(name, True, 0.0))
        began = time.monotonic()
        entry = await self.acquire(name)
        self.registry.release(entry, keep_alive)
        return JSONResponse(ollama_api.load_reply(name, False, time.monotonic() - began))

    async def tags(self, request: HTTPRequest) -> Response:
        self.check_key(request)
        listing = await asyncio.to_thread(self.registry.models.listing)
        return JSONResponse({"models": [ollama_api.tag(m) for m in listing]})

    async def show(self, request: HTTPRequest) -> Response:
        body = await self.body(request)
        name = ollama_api.model_name({"model": body.get("name"), **body} if isinstance(body, dict) else body)
        source = await asyncio.to_thread(self.registry.models.resolve, name)
        entry = self.registry.find_loaded(source.name)
        tokenizer = entry.worker.tokenizer if entry is not None else None

        def describe() -> dict[str, Any]:
            model = describe_folder(source.name, source.folder)
            template = (tokenizer or Tokenizer.from_folder(source.folder)).chat_template or ""
            return ollama_api.show(model, template, SamplingParams.from_generation_config(source.folder))

        return JSONResponse(await asyncio.to_thread(describe))

    async def ps(self, request: HTTPRequest) -> Response:
        self.check_key(request)
        now = time.monotonic()
        loaded = [e for e in self.registry.loaded() if e.loaded_at is not None]

        def describe() -> list[dict[str, Any]]:
            return [ollama_api.process(describe_folder(e.name, e.source.folder), e.size, e.expires_in(now),
                                       e.worker.model.config.context_length) for e in loaded if e.worker.model]

        return JSONResponse({"models": await asyncio.to_thread(describe)})

    async def version(self, request: HTTPRequest) -> Response:
        return JSONResponse({"version": ollama_api.OLLAMA_VERSION})

    async def pull(self, request: HTTPRequest) -> Response:
        body = await self.body(request)
        name = ollama_api.model_name({"model": body.get("name"), **body} if isinstance(body, dict) else body)
        stream = ollama_api.stream_wanted(body)
        if await asyncio.to_thread(find_local, name) is not None and repo_id_for(name) is None:
            lines = [{"status": "success"}]  # a folder under $QWEN_MLX_HOME/models: nothing to fetch
            return StreamingResponse(iter(ndjson(p) for p in lines), media_type="application/x-ndjson") if stream \
                else JSONResponse(lines[-1])
        repo_id = repo_id_for(name)
        if repo_id is None:
            raise APIError(400, str(unknown_name(name, [m.name for m in home_models()])), "model")
        if not stream:
            await asyncio.to_thread(download, repo_id, name, progress=lambda done, total: None)
            return JSONResponse({"status": "success"})
        return StreamingResponse(pull_progress(repo_id, name), media_type="application/x-ndjson")

    async def delete(self, request: HTTPRequest) -> Response:
        body = await self.body(request)
        name = ollama_api.model_name({"model": body.get("name"), **body} if isinstance(body, dict) else body)
        model = await asyncio.to_thread(find_local, name)
        if model is None:
            pinned = next((s for s in self.registry.models.pinned if s.answers_to(name)), None)
            if pinned is not None:
                raise APIError(400, f"{name!r} is the folder {pinned.folder} given to --model; qwen-mlx deletes only "
                                    "models in the Hugging Face cache or $QWEN_MLX_HOME/models", "model")
            raise APIError(404, f"model '{name}' not found", "model")
        source = self.registry.models.source_of(model)
        if self.registry.find_loaded(source.name) is not None:
            await asyncio.to_thread(self.registry.unload, source.name, if_idle=True)
            if self.registry.find_loaded(source.name) is not None:
                raise APIError(409, f"model '{name}' is busy answering requests; delete it once they are done")
        await asyncio.to_thread(remove, model)
        return Response(status_code=200)


def model_card(name: str, modified: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(modified), "owned_by": "qwen-mlx"}


def build_app(registry: ModelRegistry, settings: ServerSettings) -> Starlette:
    """The HTTP app: the three APIs over `registry`, behind the request guard (and CORS for the origins allowed)."""

    async def not_found(request: HTTPRequest, exc: Exception) -> Response:
        path = request.url.path
        if path.startswith("/api/"):
            return ollama_error_response(APIError(404, f"qwen-mlx has no route {request.method} {path}; its Ollama "
                                                       "API has /api/chat, /api/generate, /api/tags, /api/show, "
                                                       "/api/ps, /api/pull, /api/delete, /api/version"))
        return error_response_for(path, APIError(404, f"no route {request.method} {path}; see /v1/models, "
                                                      "/v1/chat/completions, /v1/completions, /v1/responses, "
                                                      "/v1/messages, /api/tags, /health, /metrics"))

    async def wrong_method(request: HTTPRequest, exc: Exception) -> Response:
        return error_response_for(request.url.path,
                                  APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    app = Starlette(routes=Endpoints(registry, settings).routes(),
                    exception_handlers={404: not_found, 405: wrong_method})
    if settings.guard.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=sorted(settings.guard.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type", "x-api-key", "anthropic-version"])
    app.add_middleware(RequestGuard, settings=settings.guard, error_body=guard_error_body)
    app.add_middleware(CountAnswers, counters=registry.counters)  # added last: runs first, so it sees every answer
    return app


async def job_chunks(job: Job, wake: asyncio.Event) -> AsyncIterator[GenerationChunk]:
    """The job's chunks up to its last; a job the server cancelled (it is stopping) is an error."""
    while True:
        chunk = await next_chunk(job, wake)
        if chunk.finish_reason == "cancelled":  # only the server shutting down cancels a connected client's job
            raise APIError(503, "the server is shutting down", kind="server_error")
        yield chunk
        if chunk.finish_reason is not None:
            return


async def whole_reply(request: HTTPRequest, job: Job, wake: asyncio.Event,
                      reply: ReplyBuilder[object]) -> dict[str, Any]:
    """A non-streamed reply (`reply`: an API's builder, with `add` and `finish`), cancelled if the client goes."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    try:
        async for chunk in job_chunks(job, wake):
            if chunk.finish_reason is not None:
                return reply.finish(chunk)[1]
            reply.add(chunk)
        raise APIError(500, "the reply ended without a last chunk", kind="server_error")
    finally:
        job.cancel()
        watcher.cancel()


async def ollama_lines(job: Job, wake: asyncio.Event, reply: ollama_api.OllamaReply) -> AsyncIterator[str]:
    """NDJSON: one object per line; an error mid-stream is a last `{"error": ...}` line, as Ollama sends it."""
    try:
        async for chunk in job_chunks(job, wake):
            for payload in reply.finish(chunk)[0] if chunk.finish_reason is not None else reply.add(chunk):
                yield ndjson(payload)
    except Exception as e:
        yield ndjson(ollama_api.error_body(api_error(e).message))
    finally:
        job.cancel()


def anthropic_error_event(error: APIError) -> tuple[str, dict[str, Any]]:
    return "error", anthropic_api.error_body(error.status, error.message)


async def named_events(job: Job, wake: asyncio.Event, reply: ReplyBuilder[tuple[str, dict[str, Any]]],
                       opening: list[tuple[str, dict[str, Any]]],
                       error_event: Callable[[APIError], tuple[str, dict[str, Any]]]) -> AsyncIterator[str]:
    """Server-sent events with names, as Anthropic's and OpenAI's Responses API send them (`reply`: the API's
    builder; `opening`: its first events); an error mid-stream is the API's own error event."""
    try:
        for name, payload in opening:
            yield sse_event(name, payload)
        async for chunk in job_chunks(job, wake):
            for name, payload in reply.finish(chunk)[0] if chunk.finish_reason is not None else reply.add(chunk):
                yield sse_event(name, payload)
    except Exception as e:
        yield sse_event(*error_event(api_error(e)))
    finally:
        job.cancel()


async def pull_progress(repo_id: str, name: str) -> AsyncIterator[str]:
    """/api/pull's stream: the download runs on a thread; its progress comes back through a queue."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PULL_REPORT_S or done >= total:
            last[0] = now
            loop.call_soon_threadsafe(updates.put_nowait, (done, total))

    yield ndjson({"status": "pulling manifest"})
    # The download goes on if the client leaves: it ends in the cache, complete, or resumes next time.
    task = asyncio.ensure_future(asyncio.to_thread(download, repo_id, name, progress=progress))
    try:
        while not task.done() or not updates.empty():
            try:
                done, total = await asyncio.wait_for(updates.get(), timeout=PULL_REPORT_S)
            except asyncio.TimeoutError:
                continue
            yield ndjson({"status": f"pulling {repo_id}", "digest": repo_id, "total": total, "completed": done})
        task.result()
        yield ndjson({"status": "success"})
    except Exception as e:
        yield ndjson(ollama_api.error_body(api_error(e).message))
async def next_chunk(job: Job, wake: asyncio.Event) -> GenerationChunk:
    """The job's next chunk, awaited without holding a thread: the worker's `notify` sets `wake`."""
    while True:
        wake.clear()
        chunk = job.get(timeout=0)
        if chunk is not None:
            return chunk
        await wake.wait()


async def stream(job: Job, wake: asyncio.Event, reply: ResponseBuilder) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per chunk payload, `data: [DONE]` at the end (an error mid-stream is
    a last payload in OpenAI's shape). When the client goes, Starlette cancels this generator, and `finally`
    cancels the job."""
    try:
        try:
            async for chunk in job_chunks(job, wake):
                payloads = reply.finish(chunk)[0] if chunk.finish_reason is not None else reply.add(chunk)
                for payload in payloads:
                    yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
        except Exception as e:  # what ended the reply, as its last payload (a bug is logged by api_error)
            yield f"data: {json.dumps(api_error(e).body(), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


async def cancel_on_disconnect(request: HTTPRequest, job: Job) -> None:
    while not job.done.is_set():
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)
