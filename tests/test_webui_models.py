"""Picking a model in the chat page (headless Chromium): the local models and the aliases not downloaded yet, one
model per conversation, a download and a load shown as they go, the pick remembered after a reload."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub, serve_hub
from servers import free_port, start_server, stop_server
from test_webui_api import write_test_model
from test_webui_browser import (  # noqa: F401 (browser: the fixture)
    browser,
    last_footer,
    new_chat,
    open_chat,
    reload,
    send,
    set_number,
    wait_reply,
)

pytestmark = pytest.mark.browser

ALIAS, REPO = "qwen2.5:0.5b", "mlx-community/Qwen2.5-0.5B-Instruct-4bit"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, FakeHub]]:
    """A chat page started with one model, a second one under $QWEN_MLX_HOME/models, and a fake hub holding a
    third as the 0.5B alias's repo: the URL, the home and the hub."""
    root = tmp_path_factory.mktemp("webui-models")
    home = root / "home"
    default = write_test_model(root / "default-model", context=1024)
    write_test_model(home / "models" / "other-model", context=1024, seed=1)
    hub = FakeHub({REPO: write_test_model(root / "hub-model", context=1024, seed=2)})
    hub_server, hub_url = serve_hub(hub)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {"QWEN_MLX_HOME": str(home), "HF_HOME": str(root / "hf"), "HF_ENDPOINT": hub_url,
           "HF_HUB_DISABLE_TELEMETRY": "1", "QWEN_MLX_TOKEN_DELAY": "0.01", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = start_server(["webui", "--model", str(default), "--port", str(port)], url, home / "server.log",
                           env=env)
    yield url, home, hub
    stop_server(process)
    hub_server.shutdown()


def pick(page: Any, label: str) -> None:
    """Choose `label` in the model picker and wait until the page says the model is ready."""
    from playwright.sync_api import expect

    page.locator("#model-picker input").click()
    page.get_by_role("option", name=label, exact=True).click()
    name = label.removesuffix(" (download)")
    expect(page.locator("#status")).to_contain_text(f"{name} is ready", timeout=60_000)


def last_reply(page: Any) -> str:
    return page.locator("#chatbot .message.bot").last.inner_text()


def saved(home: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in (home / "conversations").rglob("*.json")]


def loads(home: Path, name: str) -> int:
    return (home / "server.log").read_text().count(f"{name}: loading the model")


def test_each_conversation_talks_to_the_model_it_picked_and_remembers_it(served: tuple[str, Path, FakeHub],
                                                                         browser: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, home, hub = served
    page, console = open_chat(browser, url)
    for elem_id, value in (("temperature", 0), ("max-tokens", 12)):
        set_number(page, elem_id, value)
        expect(page.locator(f"#{elem_id} input[type=number]")).to_have_value(str(value))
    picker = page.locator("#model-picker input")
    expect(picker).to_have_value("default-model")
    picker.click()
    expect(page.get_by_role("option").first).to_be_visible()
    offered = [text.removeprefix("✓").strip() for text in page.get_by_role("option").all_inner_texts()]
    assert offered[:2] == ["default-model", "other-model"] and f"{ALIAS} (download)" in offered
    page.keyboard.press("Escape")

    send(page, "Where is the mill?")
    first = last_reply(page)

    # The same question to the other local model: loaded on the pick (--max-models 1: the first one goes), and
    # another model's reply.
    new_chat(page)
    pick(page, "other-model")
    assert loads(home, "other-model") == 1
    send(page, "Where is the mill?")
    assert last_reply(page) != first

    # A reload reopens that conversation with its model; opening the first one shows its own, which answers.
    reload(page)
    page.locator("#message textarea").wait_for()
    expect(picker).to_have_value("other-model")
    page.locator("#conversations label").filter(has_text="Where is the mill?").last.click()
    expect(picker).to_have_value("default-model")
    before = last_footer(page)
    page.locator("#message textarea").fill("And the river?")
    page.locator("#message textarea").press("Enter")
    wait_reply(page, "And the river?", before)
    assert loads(home, "default-model") == 2  # loaded again for it
    assert sorted(c.get("model") or "" for c in saved(home)) == ["", "other-model"]

    # An alias not on this machine: downloaded from the hub, then loaded, then it answers.
    new_chat(page)
    pick(page, f"{ALIAS} (download)")
    assert any(method == "GET" and "/resolve/" in path for method, path, _ in hub.requests)
    send(page, "Where is the mill?")
    assert last_reply(page) and loads(home, ALIAS) + loads(home, REPO) == 1
    assert not console.errors, console.errors
