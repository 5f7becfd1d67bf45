"""A stand-in for the Hugging Face hub on 127.0.0.1: the four calls `snapshot_download` makes (repo info, the file
tree, each file's metadata by HEAD, the file itself by GET, ranges included), serving model folders from disk.
Point huggingface_hub at it with HF_ENDPOINT. It records every request, and can cut a file's download short to
play a connection that drops (and refuse the ranged request that resumes it, to play one that stays down)."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


@dataclass
class FakeHub:
    repos: dict[str, Path]  # repo id -> the folder whose files it serves
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range header)
    cut_file: str | None = None  # while set: a whole-file GET of this file stops after `cut_at` bytes
    cut_at: int = 0
    refuse_ranges: bool = False  # ranged GETs (a resumed download) get a 500

    def files(self, repo_id: str) -> dict[str, Path]:
        root = self.repos[repo_id]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self.answer(body=False)

        def answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if path.startswith("/api/models/"):
                self.api(path.removeprefix("/api/models/"))
            elif "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                self.file(repo_id, rest.partition("/")[2], body)
            else:
                self.send(404, b"{}")

        def api(self, rest: str) -> None:
            for marker in ("/revision/", "/tree/"):
                repo_id, found, _ = rest.partition(marker)
                if found:
                    break
            if repo_id not in hub.repos:
                self.send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                return
            files = hub.files(repo_id)
            if marker == "/revision/":
                info = {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                        "siblings": [{"rfilename": name} for name in files]}
            else:
                info = [{"type": "file", "path": name, "size": p.stat().st_size,
                         "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for name, p in files.items()]
            self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

        def file(self, repo_id: str, name: str, body: bool) -> None:
            path = hub.files(repo_id).get(name) if repo_id in hub.repos else None
            if path is None:
                self.send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                return
            data = path.read_bytes()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag(path)}"', "Accept-Ranges": "bytes"}
            ranged = self.headers.get("Range")
            cut = body and hub.cut_file == name and not ranged
            if ranged and body and hub.refuse_ranges:
                self.send(500, b"", headers)
                return
            status, start = 200, 0
            if ranged and body:
                start = int(ranged.removeprefix("bytes=").split("-")[0])
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send(status, data[start:] if body else b"", headers, length=len(data) - start,
                      cut_at=hub.cut_at if cut else None)

        def send(self, status: int, data: bytes, headers: dict[str, str] | None = None, length: int | None = None,
                 cut_at: int | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            if cut_at is not None:  # the connection drops mid-file
                self.wfile.write(data[:cut_at])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler


def serve_hub(hub: FakeHub) -> tuple[ThreadingHTTPServer, str]:
    """Start the fake hub on a free 127.0.0.1 port; returns the server (call `shutdown()`) and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
