"""What `qwen-mlx serve` refuses so that no web page can drive or stall it: foreign origins (checked in headless
Chromium with a page served from a second local port), foreign Host headers (DNS rebinding), bodies that are not
JSON or are too large, and JSON that nests too deep; and that no body of any shape gets a 500."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import free_port, start_server, stop_server
from test_webui_browser import CHROMIUM, CHROMIUM_ARGS

MODEL_ID = "tiny-qwen"
USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = tiny_model_dir(MODEL_ID, max_position_embeddings=1024)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(["serve", "--model", str(model), "--port", str(port), "--max-body-mb", "1"],
                           f"{url}/health", tmp_path_factory.mktemp("logs") / "serve.log")
    yield url
    stop_server(process)


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health", timeout=10).json()


def raw_request(url: str, request: bytes) -> bytes:
    """Send bytes as they are (headers httpx would not let us forge) and return the response's first line."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        return s.recv(65536).split(b"\r\n", 1)[0]


# --- requests a web page could make ---


@pytest.mark.parametrize(("headers", "status", "needle"), [
    ({"Content-Type": "text/plain"}, 415, "application/json"),  # what a page's no-cors fetch sends
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ({"Origin": "https://evil.example"}, 403, "--cors"),
    ({"Origin": "null"}, 403, "--cors"),
    ({"Host": "evil.example:80"}, 400, "--allowed-host"),
    ({"Host": "attacker.rebind.example"}, 400, "--allowed-host"),
])
def test_requests_a_web_page_could_make_are_refused(server: str, headers: dict[str, str], status: int,
                                                    needle: str) -> None:
    before = health(server)
    response = httpx.post(f"{server}/v1/chat/completions", timeout=30,
                          content=json.dumps({"model": MODEL_ID, "messages": USER, "max_tokens": 2}),
                          headers={"Content-Type": "application/json", **headers})
    assert response.status_code == status and needle in response.json()["error"]["message"]
    assert health(server)["requests"] == before["requests"]


def error_message(path: str, status: int, body: Any) -> str:
    """The message of an error answered on `path`, checked to be in that API's own shape."""
    if path.startswith("/api/"):  # Ollama's
        assert list(body) == ["error"] and isinstance(body["error"], str)
        return body["error"]
    if path.startswith("/v1/messages"):  # Anthropic's
        kind = {403: "permission_error", 413: "request_too_large"}.get(status, "invalid_request_error")
        assert body["type"] == "error" and body["error"]["type"] == kind and list(body["error"]) == ["type", "message"]
        return body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}  # OpenAI's
    return body["error"]["message"]


def over_a_megabyte() -> Iterator[bytes]:
    yield b'{"model": "' + MODEL_ID.encode() + b'", "messages": "'
    yield b"x" * 1_100_000
    yield b'"}'


@pytest.mark.parametrize("path", ["/api/chat", "/v1/messages", "/v1/chat/completions"])
def test_refusals_are_in_the_shape_of_the_api_asked(server: str, path: str) -> None:
    """The guard's refusals and a wrong method answer as the route's own API answers its errors, so each API's
    clients read them."""
    body = json.dumps({"model": MODEL_ID, "messages": USER, "max_tokens": 2})
    refusals = [(415, "application/json", {"Content-Type": "text/plain"}, body),
                (403, "--cors", {"Origin": "https://evil.example"}, body),
                (400, "--allowed-host", {"Host": "evil.example"}, body),
                (413, "--max-body-mb", {}, over_a_megabyte())]
    for status, needle, headers, content in refusals:
        response = httpx.post(f"{server}{path}", content=content, timeout=30,
                              headers={"Content-Type": "application/json", **headers})
        assert response.status_code == status
        assert needle in error_message(path, status, response.json()), (path, status)
    wrong = httpx.get(f"{server}{path}", timeout=30)
    assert wrong.status_code == 405 and "GET" in error_message(path, 405, wrong.json())


def test_the_servers_own_names_are_accepted(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        response = httpx.post(f"{server}/v1/chat/completions", headers={"Host": host}, timeout=60,
                              json={"model": MODEL_ID, "messages": USER, "max_tokens": 1})
        assert response.status_code == 200, host


def test_a_body_over_the_limit_is_refused_before_it_is_read_and_health_answers(server: str) -> None:
    declared = raw_request(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{")
    assert b" 413 " in declared  # answered from the header alone, the 50 MB never sent
    started = time.monotonic()
    statuses: list[int] = []

    def big_chunked_body() -> None:
        def chunks() -> Iterator[bytes]:
            yield b'{"model": "' + MODEL_ID.encode() + b'", "messages": ['
            for _ in range(200):
                yield b'{"role": "user", "content": "' + b"x" * 10_000 + b'"},'
            yield b"]}"

        response = httpx.post(f"{server}/v1/chat/completions", content=chunks(), timeout=60,
                              headers={"Content-Type": "application/json"})
        statuses.append(response.status_code)

    thread = threading.Thread(target=big_chunked_body)
    thread.start()
    assert health(server)["status"] == "ok"  # answered meanwhile
    thread.join(60)
    assert statuses == [413] and time.monotonic() - started < 20


DEEP_SCHEMA = '{"type": "object", "properties": {"a": ' * 2000 + "{}" + "}}" * 2000
DEEP_PARAMETERS = '{"items": ' * 3000 + "{}" + "}" * 3000


@pytest.mark.parametrize(("body", "needle"), [
    pytest.param("[" * 100_000 + "]" * 100_000, "nested", id="100k-deep-json"),
    pytest.param(f'{{"model": "{MODEL_ID}", "messages": {json.dumps(USER)}, "response_format": {{"type": '
                 f'"json_schema", "json_schema": {{"name": "deep", "schema": {DEEP_SCHEMA}}}}}}}', "nested",
                 id="2000-deep-schema"),
    pytest.param(f'{{"model": "{MODEL_ID}", "messages": {json.dumps(USER)}, "tools": [{{"type": "function", '
                 f'"function": {{"name": "f", "parameters": {DEEP_PARAMETERS}}}}}]}}', "nested",
                 id="3000-deep-tool-parameters"),
    pytest.param('{"model": "' + MODEL_ID + '", "prompt": "\\ud800"}', "UTF-8", id="lone-surrogate"),
])
def test_pathological_json_is_a_400_naming_the_problem(server: str, body: str, needle: str) -> None:
    path = "/v1/completions" if '"prompt"' in body else "/v1/chat/completions"
    response = httpx.post(f"{server}{path}", content=body, timeout=60, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and needle in response.json()["error"]["message"]
    assert health(server)["status"] == "ok"


SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(
    max_size=20)
JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4) | st.dictionaries(
    st.text(max_size=10), children, max_size=4), max_leaves=20)
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
          "tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "n", "prediction",
          "stream_options", "parallel_tool_calls", "max_completion_tokens"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       body=st.one_of(JSON, st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6),
                      st.fixed_dictionaries({"model": st.just(MODEL_ID), "messages": JSON}),
                      st.fixed_dictionaries({"model": st.just(MODEL_ID), "prompt": JSON, "max_tokens": JSON})))
def test_no_body_gets_a_500(server: str, path: str, body: Any) -> None:
    if isinstance(body, dict) and "max_tokens" not in body:
        body["max_tokens"] = 2  # a body that happens to be valid answers quickly
    response = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert response.status_code < 500, (body, response.text)
    assert response.headers["content-type"].startswith(("application/json", "text/event-stream"))


def test_health_answers_after_the_fuzzing(server: str) -> None:
    assert health(server)["status"] == "ok"


# --- a page on another origin, in a real browser ---


PAGE = """<!doctype html><title>elsewhere</title><script>
async function attack(target) {
  const body = JSON.stringify({model: "MODEL", messages: [{role: "user", content: "hi"}], max_tokens: 50});
  const results = [];
  try {  // a "simple" request: no preflight, the page cannot read the answer, but the server would act on it
    await fetch(target + "/v1/chat/completions", {method: "POST", mode: "no-cors", body});
    results.push("no-cors sent");
  } catch (e) { results.push("no-cors failed"); }
  try {  // JSON: the browser asks first (preflight)
    const r = await fetch(target + "/v1/chat/completions",
                          {method: "POST", headers: {"Content-Type": "application/json"}, body});
    results.push("json " + r.status);
  } catch (e) { results.push("json blocked"); }
  try {  // a body to stall it with
    await fetch(target + "/v1/chat/completions", {method: "POST", mode: "no-cors", body: "x".repeat(30000000)});
    results.push("big sent");
  } catch (e) { results.push("big failed"); }
  return results;
}
</script>"""


@pytest.fixture
def page_elsewhere() -> Iterator[str]:
    """A page served from a second local port: another origin than the API's."""
    page = PAGE.replace("MODEL", MODEL_ID).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.mark.browser
def test_a_page_on_another_origin_can_neither_drive_nor_stall_the_server(server: str, page_elsewhere: str) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    before = health(server)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(page_elsewhere)
            started = time.monotonic()
            results = page.evaluate("target => attack(target)", server)
            assert time.monotonic() - started < 30
        finally:
            browser.close()
    assert "json 200" not in results
    after = health(server)
    assert after["requests"] == before["requests"] and after["generated_tokens"] == before["generated_tokens"]
    assert after["status"] == "ok"
