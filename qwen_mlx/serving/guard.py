"""What a local HTTP server refuses before any handler runs, so that a web page on another site can neither drive
the model nor stall the server: a foreign `Host` (DNS rebinding), a foreign `Origin` (unless allowed with
`--cors`), a body that is not JSON (a page's no-cors `fetch` can only send text/plain), and a body over the size
limit (refused before it is read in full).

`RequestGuard` is plain ASGI middleware; Starlette's `CORSMiddleware` inside it answers the preflights and adds
the headers for the origins `--cors` allows. Its refusals take the shape of the API the path belongs to
(`error_body`, given by the app), so each API's clients can read them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ErrorBody = Callable[[str, int, str, str], dict[str, Any]]  # (path, status, message, code) -> the JSON answered

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
ALL_INTERFACES = frozenset({"0.0.0.0", "::", ""})
DEFAULT_MAX_BODY_MB = 4.0
BODY_METHODS = ("POST", "DELETE")  # requests whose JSON body is read (Ollama's DELETE /api/delete has one)


@dataclass(frozen=True)
class GuardSettings:
    allowed_hosts: frozenset[str] | None  # host names a request's Host may carry; None: any (all interfaces)
    cors_origins: frozenset[str]  # origins allowed to call from a web page ("*": any)
    max_body_bytes: int

    @classmethod
    def for_server(cls, host: str, extra_hosts: list[str] | None = None, cors: list[str] | None = None,
                   max_body_mb: float = DEFAULT_MAX_BODY_MB) -> GuardSettings:
        """A server listening on `host`: requests must name it (or a loopback name, or one of `extra_hosts`),
        unless it listens on every interface and no `extra_hosts` narrow that down."""
        names = {h.strip().lower().strip("[]") for h in extra_hosts or [] if h.strip()}
        if host in ALL_INTERFACES and not names:
            allowed = None
        else:
            allowed = frozenset(LOOPBACK_NAMES | names | ({host.lower()} - ALL_INTERFACES))
        return cls(allowed, frozenset(o.rstrip("/") for o in cors or []), int(max_body_mb * 1e6))


def openai_error_body(path: str, status: int, message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


class RequestGuard:
    """ASGI middleware applying `GuardSettings` to every HTTP request (errors shaped by `error_body`)."""

    def __init__(self, app: ASGIApp, settings: GuardSettings, error_body: ErrorBody = openai_error_body):
        self.app = app
        self.settings = settings
        self.error_body = error_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(scope["method"], scope["path"], headers)
        if refusal is None and scope["method"] in BODY_METHODS:
            body = await read_body(receive, self.settings.max_body_bytes)
            if body is None:
                refusal = 413, (f"the request body is over the server's {self.settings.max_body_bytes} byte limit;"
                                " raise it with --max-body-mb"), "request_too_large"
            else:
                receive = replay(body, receive)
        if refusal is not None:
            status, message, code = refusal
            await respond(send, status, self.error_body(scope["path"], status, message, code))
            return
        await self.app(scope, receive, send)

    def refusal(self, method: str, path: str, headers: Headers) -> tuple[int, str, str] | None:
        host = headers.get("host", "")
        name = host_name(host)
        allowed = self.settings.allowed_hosts
        if allowed is not None and name not in allowed:
            return 400, (f"the Host header {host!r} does not name this server; add --allowed-host {name} if it "
                         "should"), "invalid_host"
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return 403, (f"requests from web pages at {origin} are refused; allow that site with --cors "
                         f"{origin}"), "origin_not_allowed"
        if method in BODY_METHODS:
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return 415, f"the request body must be application/json, not {kind or 'untyped'}", \
                    "unsupported_media_type"
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
                return 413, (f"the request body ({length} bytes) is over the server's {self.settings.max_body_bytes}"
                             " byte limit; raise it with --max-body-mb"), "request_too_large"
        return None

    def origin_allowed(self, origin: str, host: str) -> bool:
        cors = self.settings.cors_origins
        if "*" in cors or origin.rstrip("/") in cors:
            return True
        return urlsplit(origin).netloc.lower() == host.lower()  # the server's own pages


def host_name(host: str) -> str:
    """The name in a Host header, without its port: "127.0.0.1:8080" → "127.0.0.1", "[::1]:80" → "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it grows past `limit` bytes (a body without a length is read this way)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then the client's own messages (its disconnect)."""
    sent = False

    async def replayed() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def respond(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
