"""The OpenAI-compatible HTTP server (`qwen-mlx serve`) over one model's worker.

    POST /v1/chat/completions   chat, streamed or not; tools; response_format json_object / json_schema
    POST /v1/completions        raw text completion
    GET  /v1/models             the one model served
    GET  /health                status, queue and token counters (no key needed)

All model work runs on the ModelWorker's thread (MLX streams are thread-local; uvicorn runs handlers elsewhere),
fed by a bounded queue: when it is full, requests get 503 at once. A client that disconnects cancels its
generation within a token. Requests that resend a conversation reuse the cache of its longest common prefix.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate import GenerationChunk
from qwen_mlx.openai_api import APIError, ResponseBuilder, ServedModel, parse_chat_request, parse_completion_request
from qwen_mlx.worker import Job, ModelWorker, WorkerBusy

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DISCONNECT_POLL_S = 0.1  # how often a non-streamed request checks that its client is still there


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def build_app(
    worker: ModelWorker, model_id: str, api_key: str | None = None, aliases: tuple[str, ...] = ()
) -> Starlette:
    """The HTTP app: OpenAI's routes over `worker`, whose model is answered to as `model_id` (or an alias)."""
    counters = {"requests": 0}

    def served_model() -> ServedModel:
        if not worker.loaded.is_set():
            raise APIError(503, "the model is still loading; retry shortly", kind="server_error", code="loading")
        if worker.load_error is not None:
            raise APIError(500, str(worker.load_error), kind="server_error")
        return ServedModel(model_id, worker.model, worker.tokenizer, worker.options)

    def check_key(request: HTTPRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key given "
                                "to --api-key", kind="invalid_request_error", code="invalid_api_key")

    async def health(request: HTTPRequest) -> Response:
        status = "loading" if not worker.loaded.is_set() else "error" if worker.load_error else "ok"
        return JSONResponse({
            "status": status, "model": model_id, "busy": worker.busy, "active": worker.active,
            "waiting": worker.waiting, "max_batch": worker.max_batch, "requests": counters["requests"],
            "generated_tokens": worker.generated_tokens, "decode_passes": worker.decode_passes,
            "tokens_per_second": round(worker.tokens_per_second(), 2),
        }, status_code=200 if status != "error" else 500)

    async def models(request: HTTPRequest) -> Response:
        try:
            check_key(request)
        except APIError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "qwen-mlx"}
        ]})

    async def completions(request: HTTPRequest, chat: bool) -> Response:
        try:
            check_key(request)
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON: {e}") from None
            if isinstance(body, dict) and body.get("model") not in (model_id, *aliases):
                raise APIError(404, f"model {body.get('model')!r} is not served here; this server serves "
                                    f"{model_id!r}", "model", "model_not_found")
            model = served_model()
            # Rendering and tokenizing a long prompt takes a while: not on the event loop's thread.
            parsed = await asyncio.to_thread(parse_chat_request if chat else parse_completion_request, body, model)
            wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            try:
                job = worker.submit_request(None, parsed.generation,
                                            notify=lambda: loop.call_soon_threadsafe(wake.set))
            except WorkerBusy as e:
                raise APIError(503, str(e), kind="server_error", code="server_busy") from None
        except APIError as e:
            return error_response(e)
        counters["requests"] += 1
        reply = ResponseBuilder(parsed, model)
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
        except APIError as e:
            return error_response(e)
        except QwenMLXError as e:
            return error_response(APIError(400, str(e)))
        except Exception as e:  # a bug in one request: answer 500, keep serving
            log.exception("generation failed")
            return error_response(APIError(500, f"generation failed: {e}", kind="server_error"))
        finally:
            job.cancel()
            watcher.cancel()

    async def chat_completions(request: HTTPRequest) -> Response:
        return await completions(request, chat=True)

    async def text_completions(request: HTTPRequest) -> Response:
        return await completions(request, chat=False)

    async def not_found(request: HTTPRequest, exc: Exception) -> Response:
        return error_response(APIError(404, f"no route {request.method} {request.url.path}; see /v1/models, "
                                            "/v1/chat/completions, /v1/completions, /health"))

    async def wrong_method(request: HTTPRequest, exc: Exception) -> Response:
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", text_completions, methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: wrong_method},
    )


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
                payloads, chunk = [APIError(400, str(e)).body()], None
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
