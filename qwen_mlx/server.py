"""The OpenAI-compatible HTTP server (`qwen-mlx serve`) over one model's worker.

    POST /v1/chat/completions   chat, streamed or not; tools; response_format json_object / json_schema
    POST /v1/completions        raw text completion
    GET  /v1/models             the model served; GET /v1/models/{id} one model
    GET  /health                status, rows, queue and token counters (no key needed)

All model work runs on the ModelWorker's thread (MLX streams are thread-local; uvicorn runs handlers elsewhere),
fed by a bounded queue: when it is full, requests get 503 at once. A client that disconnects cancels its
generation within a token. Requests that resend a conversation reuse the cache of its longest common prefix.
Every request first passes `guard.RequestGuard` (Host, Origin, content type, body size). Nothing a request does
escapes its handler: every error is an OpenAI-shaped JSON answer, and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import wraps
from typing import Any

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate import GenerationChunk
from qwen_mlx.guard import GuardSettings, RequestGuard
from qwen_mlx.openai_api import APIError, ResponseBuilder, ServedModel, parse_chat_request, parse_completion_request
from qwen_mlx.request import check_nesting
from qwen_mlx.worker import Job, ModelWorker, WorkerBusy

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1  # how often a non-streamed request checks that its client is still there

Handler = Callable[[HTTPRequest], Awaitable[Response]]


@dataclass(frozen=True)
class ServerSettings:
    model_id: str  # the name clients call the model by (also accepted: `aliases`)
    aliases: tuple[str, ...] = ()
    api_key: str | None = None
    guard: GuardSettings = field(default_factory=lambda: GuardSettings.for_server("127.0.0.1"))


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def answers_errors(handler: Handler) -> Handler:
    """Every failure of a request becomes its JSON answer: a user mistake 400, a bug 500 (logged); none escapes
    to the server, which would cut the connection."""

    @wraps(handler)
    async def guarded(request: HTTPRequest) -> Response:
        try:
            return await handler(request)
        except APIError as e:
            return error_response(e)
        except QwenMLXError as e:
            return error_response(APIError(400, str(e), e.field))
        except Exception as e:
            log.exception("a request failed")
            return error_response(APIError(500, f"internal error ({type(e).__name__}: {e})", kind="server_error"))

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


class Endpoints:
    """OpenAI's routes over one worker."""

    def __init__(self, worker: ModelWorker, settings: ServerSettings):
        self.worker = worker
        self.settings = settings
        self.requests = 0

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health),
            Route("/v1/models", answers_errors(self.models)),
            Route("/v1/models/{model_id:path}", answers_errors(self.model)),
            Route("/v1/chat/completions", answers_errors(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", answers_errors(self.text_completions), methods=["POST"]),
        ]

    def served_model(self) -> ServedModel:
        worker = self.worker
        if not worker.loaded.is_set():
            raise APIError(503, "the model is still loading; retry shortly", kind="server_error", code="loading")
        if worker.load_error is not None:
            raise APIError(500, str(worker.load_error), kind="server_error")
        return ServedModel(self.settings.model_id, worker.model, worker.tokenizer, worker.options, worker.replies)

    def check_key(self, request: HTTPRequest) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # The scheme is case-insensitive (RFC 7235); the key is compared in constant time.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key given "
                                "to --api-key", kind="invalid_request_error", code="invalid_api_key")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_id, "object": "model", "created": 0, "owned_by": "qwen-mlx"}

    async def health(self, request: HTTPRequest) -> Response:
        worker = self.worker
        status = "loading" if not worker.loaded.is_set() else "error" if worker.load_error else "ok"
        return JSONResponse({
            "status": status, "model": self.settings.model_id, "busy": worker.busy, "active": worker.active,
            "waiting": worker.waiting, "max_batch": worker.max_batch, "requests": self.requests,
            "generated_tokens": worker.generated_tokens, "decode_passes": worker.decode_passes,
            "tokens_per_second": round(worker.tokens_per_second(), 2), "prefix_cache": asdict(worker.cache_stats()),
        }, status_code=200 if status != "error" else 500)

    async def models(self, request: HTTPRequest) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: HTTPRequest) -> Response:
        self.check_key(request)
        name = request.path_params["model_id"]
        if name not in (self.settings.model_id, *self.settings.aliases):
            raise APIError(404, f"model {name!r} is not served here; this server serves "
                                f"{self.settings.model_id!r}", "model", "model_not_found")
        return JSONResponse(self.model_card())

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self.completions(request, chat=True)

    async def text_completions(self, request: HTTPRequest) -> Response:
        return await self.completions(request, chat=False)

    async def completions(self, request: HTTPRequest, chat: bool) -> Response:
        self.check_key(request)
        # Parsing, rendering and tokenizing a large request take a while: not on the event loop's thread.
        body = await asyncio.to_thread(parse_json, await request.body())
        if isinstance(body, dict) and body.get("model") not in (self.settings.model_id, *self.settings.aliases):
            raise APIError(404, f"model {body.get('model')!r} is not served here; this server serves "
                                f"{self.settings.model_id!r}", "model", "model_not_found")
        served = self.served_model()
        parsed = await asyncio.to_thread(parse_chat_request if chat else parse_completion_request, body, served)
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            job = self.worker.submit_request(None, parsed.generation,
                                             notify=lambda: loop.call_soon_threadsafe(wake.set))
        except WorkerBusy as e:
            raise APIError(503, str(e), kind="server_error", code="server_busy") from None
        self.requests += 1
        reply = ResponseBuilder(parsed, served)
        if parsed.stream:
            return StreamingResponse(stream(job, wake, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            while True:
                chunk = await next_chunk(job, wake)
                if chunk.finish_reason is not None:
                    return JSONResponse(check_finished(chunk, reply)[1])
                reply.add(chunk)
        finally:
            job.cancel()
            watcher.cancel()


def build_app(worker: ModelWorker, settings: ServerSettings) -> Starlette:
    """The HTTP app: OpenAI's routes over `worker`, behind the request guard (and CORS for the origins allowed)."""

    async def not_found(request: HTTPRequest, exc: Exception) -> Response:
        return error_response(APIError(404, f"no route {request.method} {request.url.path}; see /v1/models, "
                                            "/v1/chat/completions, /v1/completions, /health"))

    async def wrong_method(request: HTTPRequest, exc: Exception) -> Response:
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    app = Starlette(routes=Endpoints(worker, settings).routes(),
                    exception_handlers={404: not_found, 405: wrong_method})
    if settings.guard.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=sorted(settings.guard.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"])
    app.add_middleware(RequestGuard, settings=settings.guard)  # added last: it runs first
    return app


async def next_chunk(job: Job, wake: asyncio.Event) -> GenerationChunk:
    """The job's next chunk, awaited without holding a thread: the worker's `notify` sets `wake`."""
    while True:
        wake.clear()
        chunk = job.get(timeout=0)
        if chunk is not None:
            return chunk
        await wake.wait()


def check_finished(chunk: GenerationChunk, reply: ResponseBuilder) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if chunk.finish_reason == "cancelled":  # only the server shutting down cancels a connected client's job
        raise APIError(503, "the server is shutting down", kind="server_error")
    return reply.finish(chunk)


async def stream(job: Job, wake: asyncio.Event, reply: ResponseBuilder) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per chunk payload, `data: [DONE]` at the end. When the client goes,
    Starlette cancels this generator, and `finally` cancels the job."""
    try:
        while True:
            try:
                chunk = await next_chunk(job, wake)
                payloads = check_finished(chunk, reply)[0] if chunk.finish_reason is not None else reply.add(chunk)
            except APIError as e:
                payloads, chunk = [e.body()], None
            except QwenMLXError as e:
                payloads, chunk = [APIError(400, str(e), e.field).body()], None
            except Exception as e:
                log.exception("generation failed")
                payloads, chunk = [APIError(500, f"generation failed: {e}", kind="server_error").body()], None
            for payload in payloads:
                yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
            if chunk is None or chunk.finish_reason is not None:
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancel()


async def cancel_on_disconnect(request: HTTPRequest, job: Job) -> None:
    while not job.done.is_set():
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)
