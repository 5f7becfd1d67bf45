"""The chat page in headless Chromium (Playwright): stream, Stop, regenerate, reload, restart.

Uses Debian's /usr/bin/chromium (installed by `.ci/run` with apt), never `playwright install`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import stop_server
from test_webui_api import start_webui, write_test_model

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]
TOKEN_DELAY = 0.05  # 20 tokens/s: slow enough to watch a reply grow and to stop it halfway


def words(text: str) -> list[str]:
    """Text as rendered, whitespace aside (a streamed message and a reloaded one break lines differently)."""
    return text.split()


@pytest.fixture(scope="module")
def model_and_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("webui-browser")
    return write_test_model(root / "model", context=4096), root / "home"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_stream_stop_regenerate_and_find_the_conversation_after_reload_and_restart(
    model_and_home: tuple[Path, Path], browser: Any, tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    model, home = model_and_home
    process, url = start_webui(model, home, TOKEN_DELAY)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)
        reply = page.locator("#chatbot .message.bot").last

        message = page.locator("#message textarea")
        message.fill("Hello there")
        message.press("Enter")
        expect(page.locator("#chatbot .message.user").first).to_contain_text("Hello there")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#chatbot .message.bot')].pop()?.innerText.length > 20"
        )
        before = reply.inner_text()
        time.sleep(0.5)
        assert len(reply.inner_text()) > len(before), "the reply does not stream"

        page.locator("#message .stop-button").click()
        expect(reply).to_contain_text("stopped", timeout=5000)
        stopped = reply.inner_text()
        time.sleep(1.0)
        assert reply.inner_text() == stopped, "the reply went on after Stop"

        max_tokens = page.locator("#max-tokens input[type=number]")
        max_tokens.fill("12")
        max_tokens.press("Enter")
        page.locator("#chatbot button[aria-label='Retry']").click()
        expect(reply).to_contain_text("reply 12 tokens", timeout=15000)
        regenerated = reply.inner_text()
        assert regenerated != stopped

        page.reload()
        expect(page.locator("#chatbot .message.user").first).to_contain_text("Hello there")
        expect(reply).to_contain_text("reply 12 tokens")
        assert words(reply.inner_text()) == words(regenerated)
        expect(page.locator("#conversations")).to_contain_text("Hello there")

        # The conversation lives on the server, and the browser's id for it survives a restart (same address:
        # a browser keeps its storage per origin).
        stop_server(process)
        process, url = start_webui(model, home, TOKEN_DELAY, port=int(url.rstrip("/").rsplit(":", 1)[1]))
        page.goto(url)
        expect(reply).to_contain_text("reply 12 tokens")
        assert words(reply.inner_text()) == words(regenerated)
        page.screenshot(path=str(tmp_path / "webui.png"), full_page=True)
        assert (tmp_path / "webui.png").stat().st_size > 10_000
    finally:
        stop_server(process)


def test_two_users_see_their_replies_stream_at_the_same_time(model_and_home: tuple[Path, Path], browser: Any,
                                                             tmp_path: Path) -> None:
    from playwright.sync_api import expect

    model, home = model_and_home
    process, url = start_webui(model, tmp_path / "home", TOKEN_DELAY)
    try:
        # Two browser contexts: two users, each with their own storage and conversation.
        pages = [browser.new_context(viewport={"width": 1200, "height": 800}).new_page() for _ in range(2)]
        for i, page in enumerate(pages):
            page.goto(url)
            message = page.locator("#message textarea")
            message.fill(f"Hello from user {i}")
            message.press("Enter")
        replies = [page.locator("#chatbot .message.bot").last for page in pages]
        for page in pages:
            page.wait_for_function(
                "() => [...document.querySelectorAll('#chatbot .message.bot')].pop()?.innerText.length > 20")
        before = [r.inner_text() for r in replies]
        time.sleep(1.0)
        after = [r.inner_text() for r in replies]
        for b, a in zip(before, after, strict=True):
            assert len(a) > len(b), "a reply stood still while the other streamed"
        assert not any("stopped" in a or "max tokens" in a for a in after)
        for page in pages:
            page.locator("#message .stop-button").click()
        for reply in replies:
            expect(reply).to_contain_text("stopped", timeout=5000)
        pages[0].screenshot(path=str(tmp_path / "two-users.png"))
    finally:
        stop_server(process)
