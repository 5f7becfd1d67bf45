"""The chat page in headless Chromium (Playwright): everything a user does, as they do it.

Uses Debian's /usr/bin/chromium (installed by `.ci/run` with apt), never `playwright install`. The tests save
screenshots for a reviewer in $QWEN_MLX_SCREENSHOTS (default: qwen-mlx-screenshots in the system's temporary
folder, e.g. /tmp/qwen-mlx-screenshots), one PNG per step worth looking at, named after it.

The model is tiny and random (its replies are gibberish that never ends by itself: see write_test_model), so what a
reply says is set by importing a conversation where a test needs known text (math, code, reasoning).
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
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
FAST_DELAY = 0.02  # the feature tests' server: short replies come quickly, long ones can still be stopped
SCREENSHOTS = Path(os.environ.get("QWEN_MLX_SCREENSHOTS") or Path(tempfile.gettempdir()) / "qwen-mlx-screenshots")
STATS = re.compile(r"prompt (\d+) tokens \((\d+) from cache\) · reply (\d+) tokens")
METER = re.compile(r"context (\d+) / (\d+) tokens")
# Marks the browser's clipboard writes, which headless Chromium may refuse to hand back.
CLIPBOARD = """
window.__copied = [];
Object.defineProperty(navigator, "clipboard", {configurable: true, value: {
  writeText: async (text) => { window.__copied.push(text); }, readText: async () => "" }});
"""
# The reply is over: its line has statistics, and the message box shows Send again.
IDLE = """([text, before]) => {
  const rows = [...document.querySelectorAll("#chatbot .message-row")];
  const last = rows[rows.length - 1];
  if (!last || !last.querySelector(".message.bot") || document.querySelector("#message .stop-button")) return false;
  if (text !== null && ![...document.querySelectorAll("#chatbot .message.user")].some(u => u.innerText.includes(text)))
    return false;
  const footer = last.querySelector(".qm-footer")?.innerText || "";
  return /reply \\d+ tokens/.test(footer) && footer !== before;
}"""


def words(text: str) -> list[str]:
    """Text as rendered, whitespace aside (a streamed message and a reloaded one break lines differently)."""
    return text.split()


def shot(page: Any, name: str, full_page: bool = False) -> Path:
    """A screenshot for the reviewer (see the module's docstring)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 5_000
    return path


class Console:
    """What the page writes to the browser's console: errors (and uncaught exceptions), and warnings."""

    def __init__(self, page: Any):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _message(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)
        elif message.type == "warning":
            self.warnings.append(message.text)


def open_chat(browser: Any, url: str, width: int = 1400, height: int = 900, context: Any = None,
              **options: Any) -> tuple[Any, Console]:
    """A page on the chat in a new browser (its own storage: a new user) or in `context` (another tab)."""
    context = context or browser.new_context(viewport={"width": width, "height": height}, **options)
    context.add_init_script(CLIPBOARD)
    page = context.new_page()
    console = Console(page)
    page.goto(url)
    page.locator("#message textarea").wait_for()
    page.wait_for_function("() => document.querySelector('#context-meter')?.innerText.includes('context')")
    return page, console


def last_footer(page: Any) -> str:
    footer = page.locator("#chatbot .message-row").last.locator(".qm-footer")
    return footer.inner_text() if footer.count() else ""


def wait_reply(page: Any, text: str | None = None, before: str | None = None, timeout: float = 30_000) -> str:
    """Wait for the reply (to the question `text`, or a new one when its line was `before`) to end; its line."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(IDLE, arg=[text, before], timeout=timeout)
    except PlaywrightTimeout:
        shot(page, f"timeout-{time.strftime('%H%M%S')}")  # for whoever reads the failure
        status = page.locator("#status").inner_text()
        max_tokens = page.locator("#max-tokens input[type=number]").input_value()
        raise AssertionError(f"no reply ended in {timeout / 1000:.0f} s: status {status!r}, last line "
                             f"{last_footer(page)!r}, max tokens {max_tokens}") from None
    return last_footer(page)


def send(page: Any, text: str) -> str:
    """Type a question, press Enter, and wait for the reply to end; the line under it."""
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")
    return wait_reply(page, text)


def reload(page: Any) -> None:
    """Reload the page; once more if the page itself was reloading (Gradio does, when its server comes back)."""
    from playwright.sync_api import Error

    try:
        page.reload()
    except Error as e:
        if "ERR_ABORTED" not in str(e):
            raise
        page.wait_for_load_state()
        page.reload()


def new_chat(page: Any) -> None:
    """Click "New chat" and wait for the empty chat (a question sent before would go to the old one)."""
    from playwright.sync_api import expect

    page.locator("#new-chat").click()
    expect(page.locator("#chatbot .message-row")).to_have_count(0)
    expect(page.locator("#title input, #title textarea").first).to_have_attribute("placeholder", "New chat")


def set_number(page: Any, elem_id: str, value: float) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def reply_stats(line: str) -> tuple[int, int, int]:
    """(prompt tokens, prompt tokens from the cache, reply tokens) from a reply's line."""
    match = STATS.search(line)
    assert match, f"no statistics in {line!r}"
    return int(match[1]), int(match[2]), int(match[3])


def meter(page: Any) -> tuple[int, int]:
    match = METER.search(page.locator("#context-meter").inner_text())
    assert match, page.locator("#context-meter").inner_text()
    return int(match[1]), int(match[2])


def choose_file(page: Any, button: str, *paths: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.locator(button).click()
    chooser.value.set_files([str(p) for p in paths])


def copy_last_reply(page: Any) -> str:
    """What the last reply's Copy button puts on the clipboard: its text as the server sent it."""
    page.evaluate("""() => [...document.querySelectorAll('#chatbot .message-row')].pop()
                     .nextElementSibling.querySelector('button[aria-label="Copy message"]').click()""")
    return page.evaluate("() => window.__copied[window.__copied.length - 1]")


def focused_id(page: Any) -> str | None:
    return page.evaluate("() => document.activeElement?.closest('[id]')?.id")


def prompt_length(model: Path, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> int:
    """The prompt's tokens as the model's own chat template counts them (what the stats line must say)."""
    from qwen_mlx.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(model)
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True))


@pytest.fixture(scope="module")
def model_and_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("webui-browser")
    return write_test_model(root / "model", context=4096), root / "home"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=10_000)  # what a page shows within 10 s, even on a busy test machine
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def chat(model_and_home: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server the feature tests share (each test is a new browser, so a new user): its URL and home."""
    model, _ = model_and_home
    home = tmp_path_factory.mktemp("webui-features")
    process, url = start_webui(model, home, FAST_DELAY)
    yield url, home
    stop_server(process)


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
        shot(page, "restart-reopens-the-conversation", full_page=True)
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
        shot(pages[0], "two-users")
    finally:
        stop_server(process)


def write_conversation(path: Path, messages: list[dict[str, Any]], title: str = "") -> Path:
    """A conversation file to import, as another tool (or this page's own export) would write it."""
    path.write_text(json.dumps({"title": title, "messages": messages}), encoding="utf-8")
    return path


def test_prices_stay_prices_stats_stay_out_of_code_and_reasoning_folds_away(
    chat: tuple[str, Path], model_and_home: tuple[Path, Path], browser: Any, tmp_path: Path,
) -> None:
    """Issue 18, broken 1, 2 and 6: single-dollar math, the statistics of a reply cut off inside a code fence,
    and <think>…</think>, in a conversation imported with known text."""
    from playwright.sync_api import expect

    model, _ = model_and_home
    question = ("It costs $5 and the other costs $10; a laptop is $1,599 … a phone $499. "
                "Math: $x^2$, \\(a_1 + b\\) and $$E = mc^2$$")
    answer = "Here is code:\n```python\nprint('$5 and $10')\nx = 1"  # stopped inside the fence
    reply = f"<think>\nThe user asks about $5 prices.\n</think>\n{answer}"
    stats = {"prompt_tokens": 35, "prefilled_tokens": 35, "generation_tokens": 20, "time_to_first_token": 0.1,
             "generation_tps": 30.0, "context_tokens": 55, "context_length": 4096, "finish_reason": "cancelled"}
    page, console = open_chat(browser, chat[0])
    choose_file(page, "#import-json", write_conversation(tmp_path / "prices.json", [
        {"role": "user", "content": question}, {"role": "assistant", "content": reply, "stats": stats}]))
    user = page.locator("#chatbot .message.user").first
    expect(user).to_contain_text("It costs $5 and the other costs $10; a laptop is $1,599 … a phone $499.")
    assert user.locator(".katex").count() == 3  # x^2, a_1 + b, E = mc^2: nothing of the prices
    assert not [w for w in console.warnings + console.errors if "tex" in w.lower()], "KaTeX complained"

    # The statistics are under the message, not in its markdown: not in the code block, not in what Copy copies.
    bot = page.locator("#chatbot .message.bot").last
    expect(bot.locator(".qm-footer")).to_contain_text("prompt 35 tokens (0 from cache) · reply 20 tokens")
    expect(bot.locator(".qm-footer")).to_contain_text("stopped")
    assert bot.locator("pre").inner_text().strip() == "print('$5 and $10')\nx = 1"
    assert bot.locator(".message-content .qm-footer").count() == 0
    assert copy_last_reply(page) == answer
    page.locator("#chatbot button[aria-label='Copy conversation']").click()
    copied = page.evaluate("() => window.__copied")
    assert "$5 prices" in copied[1] and "prompt 35 tokens" not in copied[1] and "stopped" not in copied[1]

    # The reasoning is a collapsed "Thinking" block above the answer, and it opens on a click.
    thought = page.locator("#chatbot .message-row").nth(1)
    expect(thought).to_contain_text("Thinking")
    expect(thought.get_by_text("The user asks about")).to_be_hidden()
    shot(page, "math-prices-code-fence-thinking-closed")
    thought.get_by_text("Thinking").click()
    expect(thought.get_by_text("The user asks about")).to_be_visible()
    shot(page, "thinking-open")

    # ... and it is not sent back: the next prompt holds the answer only, as the model's template expects.
    set_number(page, "max-tokens", 3)
    line = send(page, "And now?")
    expected = prompt_length(model, [
        {"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
        {"role": "user", "content": question}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "And now?"}])
    assert reply_stats(line)[0] == expected
    assert not console.errors


def test_the_context_meter_fills_a_full_context_says_so_and_the_policy_lets_the_chat_go_on(
    browser: Any, tmp_path: Path,
) -> None:
    """Issue 18, broken 3: a 512-token context, filled by replies that never end by themselves."""
    from playwright.sync_api import expect

    model = write_test_model(tmp_path / "model", context=512)
    process, url = start_webui(model, tmp_path / "home", token_delay=0.005)
    try:
        page, console = open_chat(browser, url)
        used, size = meter(page)
        assert size == 512 and 0 < used < 200
        page.locator("#message textarea").press_sequentially("Fill the context, please")
        expect(page.locator("#context-meter")).not_to_contain_text(f"context {used} /")  # the draft counts
        expect(page.locator("#context-policy input[value='drop-oldest']")).to_be_checked()

        # While the reply grows the meter turns amber, then red: recorded by the page as it happens (a quarter of
        # a second each, which a busy machine's polling could miss).
        page.evaluate("""() => { window.__levels = new Set();
            new MutationObserver(() => { const m = document.querySelector('#context-meter .context-meter');
                if (m) window.__levels.add(m.className.split(' ').pop()); })
            .observe(document.querySelector('#context-meter'), {subtree: true, childList: true, attributes: true});
        }""")
        page.locator("#message textarea").press("Enter")
        line = wait_reply(page, "Fill the context, please")
        assert {"warn", "full"} <= set(page.evaluate("() => [...window.__levels]"))
        shot(page, "context-full")
        assert line.endswith("context full") and "max tokens" not in line
        expect(page.locator("#context-meter")).to_contain_text("oldest messages are left out")

        # The next question is answered: the oldest turn is left out of its prompt, and its line says so.
        line = send(page, "And now?")
        assert "2 oldest messages left out of the prompt" in line
        assert "Error" not in page.locator("#chatbot").inner_text()

        # With "stop" the conversation ends with a message saying what to do.
        page.locator("#context-policy input[value='stop']").check()
        page.locator("#message textarea").fill("One more?")
        page.locator("#message textarea").press("Enter")
        expect(page.locator("#chatbot .message.bot").last).to_contain_text("start a new chat", timeout=10_000)
        shot(page, "context-policy-stop")
        assert not console.errors
    finally:
        stop_server(process)


def test_a_long_prompt_shows_its_progress_stops_cleanly_and_a_queued_reply_says_who_is_ahead(
    model_and_home: tuple[Path, Path], browser: Any, tmp_path: Path,
) -> None:
    """Issue 18, broken 4 and the queue: one row (--max-batch 1) and slow model steps, so that a 3,000-token
    prompt takes over a second to read (512 tokens a step) and a second user has to wait."""
    from playwright.sync_api import expect

    model, _ = model_and_home
    process, url = start_webui(model, tmp_path / "home", token_delay=0.2, extra_args=("--max-batch", "1"))
    try:
        page, console = open_chat(browser, url, width=1200, height=800)
        box = page.locator("#message textarea")
        long_question = "x" * 3000
        box.fill(long_question)
        box.press("Enter")
        # The question shows at once; then how far the prompt's reading has come, in the reply and above the box.
        expect(page.locator("#chatbot .message.user")).to_contain_text("xxxx")
        expect(page.locator("#chatbot .message.bot").last).to_contain_text(
            re.compile(r"Reading the prompt: \d+ / 30\d\d tokens"), timeout=10_000)
        expect(page.locator("#status")).to_contain_text("Reading the prompt")
        shot(page, "prompt-progress")
        page.keyboard.press("Escape")
        expect(page.locator("#status")).to_contain_text("Stopped while reading the prompt", timeout=10_000)
        # No empty reply, no statistics of a reply that never was: the question is back in the box to resend.
        assert page.locator("#chatbot .message-row").count() == 0
        assert box.input_value() == long_question
        expect(page.locator("#message .submit-button")).to_be_visible()

        # A second user, while the only row is busy: their question shows at once, with how many are ahead.
        set_number(page, "max-tokens", 4000)
        box.fill("A long answer, please")
        box.press("Enter")
        expect(page.locator("#status")).to_contain_text("Writing the reply", timeout=10_000)
        other, other_console = open_chat(browser, url, width=1200, height=800)
        other.locator("#message textarea").fill("Me too")
        other.locator("#message textarea").press("Enter")
        expect(other.locator("#chatbot .message.user")).to_contain_text("Me too", timeout=2_000)
        expect(other.locator("#chatbot .message.bot")).to_contain_text("Waiting for the model: 1 ahead of you")
        expect(other.locator("#status")).to_contain_text("Waiting for the model")
        assert other.evaluate("() => document.body.innerText.split('ahead of you').length - 1") == 1
        shot(other, "waiting-for-the-model")
        page.keyboard.press("Escape")
        expect(other.locator("#status")).to_contain_text("Writing the reply", timeout=10_000)
        other.keyboard.press("Escape")
        wait_reply(other, "Me too")
        assert not console.errors and not other_console.errors
    finally:
        stop_server(process)


def test_send_becomes_stop_while_a_reply_streams_and_enter_then_says_why_it_waits(
    chat: tuple[str, Path], browser: Any,
) -> None:
    """Issue 18, broken 5, and the state a user must see: Stop only while generating, an indicator, Esc."""
    from playwright.sync_api import expect

    page, console = open_chat(browser, chat[0])
    box = page.locator("#message textarea")
    assert page.locator("#message .stop-button").count() == 0, "Stop shows while nothing is generated"
    page.wait_for_function("() => document.activeElement?.closest('#message')")  # focused on load
    box.fill("Talk for a while")
    box.press("Enter")
    expect(page.locator("#message .stop-button")).to_be_visible()
    expect(page.locator("#message .submit-button")).to_have_count(0)
    expect(page.locator("#status .busy")).to_contain_text("Writing the reply")
    shot(page, "generating")

    box.fill("Next question")
    box.press("Enter")
    expect(page.locator("#status")).to_contain_text("A reply is still being written")
    assert box.input_value() == "Next question" and page.locator("#chatbot .message.user").count() == 1

    page.keyboard.press("Escape")
    expect(page.locator("#chatbot .message.bot").last.locator(".qm-footer")).to_contain_text("stopped")
    expect(page.locator("#message .submit-button")).to_be_visible()
    expect(page.locator("#status .busy")).to_have_count(0)
    assert box.input_value() == "Next question" and focused_id(page) == "message"
    set_number(page, "max-tokens", 5)
    box.press("Enter")
    assert "reply 5 tokens" in wait_reply(page, "Next question")
    assert not console.errors


def test_edits_and_regenerations_are_alternatives_with_arrows(chat: tuple[str, Path], browser: Any) -> None:
    """Issue 18, clumsy: an edited question or a regenerated reply is kept as ‹ k/n ›; Enter submits an edit and
    Esc cancels it; the focus comes back to the message box."""
    from playwright.sync_api import expect

    page, console = open_chat(browser, chat[0])
    set_number(page, "max-tokens", 6)
    first_line = send(page, "Question one")
    first_reply = page.locator("#chatbot .message.bot").last.locator(".message-content").inner_text()

    page.locator("#chatbot button[aria-label='Retry']").click()
    second_line = wait_reply(page, before=first_line)
    bot = page.locator("#chatbot .message.bot").last
    expect(bot.locator(".qm-position")).to_have_text("2/2")
    page.wait_for_function("() => document.activeElement?.closest('#message')")
    bot.locator(".qm-prev").click()
    expect(bot.locator(".qm-position")).to_have_text("1/2")
    assert bot.locator(".message-content").inner_text() == first_reply
    bot.locator(".qm-next").click()
    expect(bot.locator(".qm-position")).to_have_text("2/2")

    # Esc leaves an edit without a trace; Enter submits it as a new alternative, answered anew.
    user = page.locator("#chatbot .message-row").first
    page.locator("#chatbot button[aria-label='Edit']").first.click()
    edit = page.locator("#chatbot .edit-textarea")
    edit.fill("Question one, edited")
    edit.press("Escape")
    expect(edit).to_have_count(0)
    expect(user).to_contain_text("Question one")
    assert "edited" not in user.inner_text() and user.locator(".qm-branch").count() == 0
    page.locator("#chatbot button[aria-label='Edit']").first.click()
    page.locator("#chatbot .edit-textarea").fill("Question one, edited")
    page.locator("#chatbot .edit-textarea").press("Enter")
    wait_reply(page, "Question one, edited", before=second_line)
    expect(user.locator(".qm-position")).to_have_text("2/2")
    page.wait_for_function("() => document.activeElement?.closest('#message')")
    shot(page, "alternatives")

    # The first question comes back with its own two replies, after a reload too.
    page.reload()
    user = page.locator("#chatbot .message-row").first
    user.locator(".qm-prev").click()
    expect(user).to_contain_text("Question one")
    expect(user.locator(".qm-position")).to_have_text("1/2")
    expect(page.locator("#chatbot .message.bot").last.locator(".qm-position")).to_have_text("2/2")
    assert not console.errors


def test_the_conversation_list_renames_searches_deletes_with_undo_exports_imports_and_follows_other_tabs(
    chat: tuple[str, Path], browser: Any, tmp_path: Path,
) -> None:
    """Issue 18, clumsy: conversations."""
    from playwright.sync_api import expect

    page, console = open_chat(browser, chat[0])
    listing = page.locator("#conversations")
    set_number(page, "max-tokens", 4)
    send(page, "Alpha conversation")
    new_chat(page)
    send(page, "Beta conversation about bananas")
    expect(listing).to_contain_text(re.compile(r"Beta conversation about bananas\s+today \d\d:\d\d"))
    expect(listing).to_contain_text("Alpha conversation")
    assert page.locator("#chatbot button[aria-label='Clear']").is_hidden()  # the trash icon over the messages
    assert "Settings" not in page.locator("footer").inner_text()  # Gradio's developer settings

    title = page.locator("#title input, #title textarea").first
    title.fill("Renamed beta")
    title.press("Enter")
    expect(listing).to_contain_text("Renamed beta")
    page.locator("#search input, #search textarea").first.press_sequentially("alpha")
    expect(listing).not_to_contain_text("Renamed beta")
    expect(listing).to_contain_text("Alpha conversation")
    page.locator("#search input, #search textarea").first.fill("")
    page.locator("#search input, #search textarea").first.press("Backspace")
    expect(listing).to_contain_text("Renamed beta")

    # A reload reopens the conversation that was open, not the one last updated.
    listing.get_by_text("Alpha conversation").click()
    expect(page.locator("#chatbot .message.user").first).to_have_text("Alpha conversation")
    page.reload()
    expect(page.locator("#chatbot .message.user").first).to_have_text("Alpha conversation")

    # Another tab opens on it too; what each tab adds is kept (neither saves over the other's turn).
    other, other_console = open_chat(browser, chat[0], context=page.context)
    expect(other.locator("#chatbot .message.user").first).to_have_text("Alpha conversation")
    send(other, "Alpha, from the other tab")
    send(page, "Alpha, from this tab")
    assert page.locator("#chatbot .message.user").all_inner_texts() == [
        "Alpha conversation", "Alpha, from the other tab", "Alpha, from this tab"]
    # Another tab's new conversation shows up in this tab's list.
    new_chat(other)
    send(other, "Gamma from another tab")
    expect(listing).to_contain_text("Gamma from another tab", timeout=10_000)

    # Export, as Markdown and as JSON.
    with page.expect_download() as download:
        page.locator("#export-md").click()
    markdown = Path(download.value.path()).read_text(encoding="utf-8")
    assert markdown.startswith("# Alpha conversation") and "## User\n\nAlpha conversation" in markdown
    assert "## Assistant" in markdown and "reply 4 tokens" in markdown
    with page.expect_download() as download:
        page.locator("#export-json").click()
    exported = tmp_path / "alpha.json"
    exported.write_bytes(Path(download.value.path()).read_bytes())
    assert json.loads(exported.read_text())["nodes"][0]["content"] == "Alpha conversation"

    # Delete, then Undo.
    page.locator("#delete").click()
    expect(listing).not_to_contain_text("Alpha conversation")
    expect(page.locator("#undo-delete")).to_contain_text("Undo deleting “Alpha conversation”")
    shot(page, "deleted-with-undo")
    page.locator("#undo-delete").click()
    expect(listing).to_contain_text("Alpha conversation")
    expect(page.locator("#chatbot .message.user").first).to_have_text("Alpha conversation")

    # Import: the export comes back as a new conversation; a file of another kind gets a one-line reason.
    choose_file(page, "#import-json", exported)
    expect(page.locator("#status")).to_contain_text("Imported alpha.json")
    expect(listing.get_by_text("Alpha conversation")).to_have_count(2)
    (tmp_path / "notes.json").write_text('{"notes": []}')
    choose_file(page, "#import-json", tmp_path / "notes.json")
    expect(page.locator("#status")).to_contain_text("notes.json could not be imported: no 'nodes' or 'messages'")
    shot(page, "conversation-list", full_page=True)
    assert not console.errors and not other_console.errors


def test_settings_belong_to_the_conversation_an_empty_system_prompt_sends_none_and_sampling_persists(
    chat: tuple[str, Path], model_and_home: tuple[Path, Path], browser: Any,
) -> None:
    """Issue 18, clumsy: settings."""
    from playwright.sync_api import expect

    model, _ = model_and_home
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    page, console = open_chat(browser, chat[0])
    system = page.locator("#system-prompt textarea")
    assert system.input_value() == default
    set_number(page, "max-tokens", 3)
    system.fill("You are terse.")
    line = send(page, "Hello terse")
    assert reply_stats(line)[0] == prompt_length(model, [{"role": "system", "content": "You are terse."},
                                                         {"role": "user", "content": "Hello terse"}])

    # An emptied system prompt sends no system message, not Qwen's default.
    new_chat(page)
    expect(system).to_have_value(default)
    system.fill("")
    line = send(page, "Hello nobody")
    with_default = prompt_length(model, [{"role": "user", "content": "Hello nobody"}])
    # Qwen's template writes its default system message when none is given: the prompt must be that much shorter.
    default_block = prompt_length(model, [{"role": "system", "content": default}], add_generation_prompt=False)
    assert reply_stats(line)[0] == with_default - default_block

    # Each conversation keeps its own; the presets fill it in.
    page.locator("#conversations").get_by_text("Hello terse").click()
    expect(system).to_have_value("You are terse.")
    page.locator("#preset input").click()
    page.get_by_role("option", name="Programmer").click()
    expect(system).to_have_value(re.compile("^You are an expert programmer"))

    # Sampling and the context policy are this browser's, across reloads.
    for change in (lambda: set_number(page, "temperature", 0.35),
                   lambda: page.locator("#context-policy input[value='stop']").check()):
        stored = page.evaluate("() => localStorage.getItem('qwen-mlx-settings')")
        change()
        page.wait_for_function("stored => localStorage.getItem('qwen-mlx-settings') !== stored", arg=stored)
    page.reload()
    expect(page.locator("#temperature input[type=number]")).to_have_value("0.35")
    expect(page.locator("#max-tokens input[type=number]")).to_have_value("3")
    expect(page.locator("#context-policy input[value='stop']")).to_be_checked()
    expect(system).to_have_value(re.compile("^You are an expert programmer"))
    shot(page, "settings")
    assert not console.errors


def test_attached_text_files_go_into_the_prompt_and_the_meter_and_others_are_refused(
    chat: tuple[str, Path], browser: Any, tmp_path: Path,
) -> None:
    """Issue 18, clumsy: attachments (text only, size limits, a clear reason otherwise)."""
    from playwright.sync_api import expect

    page, console = open_chat(browser, chat[0])
    code = "def add(a, b):\n    ```not a fence```\n    return a + b\n" * 8
    (tmp_path / "add.py").write_text(code)
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (tmp_path / "huge.log").write_text("line\n" * 120_000)
    before, _ = meter(page)
    choose_file(page, "#attach", tmp_path / "add.py")
    expect(page.locator("#attachments")).to_contain_text("add.py")
    page.wait_for_function(f"() => !document.querySelector('#context-meter').innerText.includes('context {before} ')")
    assert meter(page)[0] >= before + len(code)  # one byte-level token per character, and the file's name
    choose_file(page, "#attach", tmp_path / "photo.png", tmp_path / "huge.log")
    expect(page.locator("#status")).to_contain_text("photo.png is not a text file")
    expect(page.locator("#status")).to_contain_text("huge.log is 586 kB; attachments are limited to 512 kB each")
    assert "photo.png" not in page.locator("#attachments").inner_text()
    shot(page, "attachments")

    set_number(page, "max-tokens", 3)
    line = send(page, "What does it do?")
    assert reply_stats(line)[0] >= len(code)
    expect(page.locator("#chatbot .message.user").last.locator(".qm-footer")).to_have_text(
        "attached: add.py (24 lines)")
    expect(page.locator("#composer-extras")).to_be_hidden()  # sent: the next message starts without it
    page.reload()
    expect(page.locator("#chatbot .message.user").last.locator(".qm-footer")).to_have_text(
        "attached: add.py (24 lines)")
    assert not console.errors


def test_on_a_phone_the_list_is_behind_a_button_the_page_stays_put_and_stop_is_small(
    chat: tuple[str, Path], browser: Any,
) -> None:
    """Issue 18, clumsy: mobile (390×844)."""
    from playwright.sync_api import expect

    page, console = open_chat(browser, chat[0], width=390, height=844, is_mobile=True, has_touch=True)
    time.sleep(0.5)  # page.js's start-up has run
    assert page.evaluate("() => window.scrollY") == 0
    assert focused_id(page) != "message"  # focusing it would scroll to it and open the keyboard
    sidebar = page.locator("#sidebar")
    assert "open" not in (sidebar.get_attribute("class") or "")
    assert page.locator("#new-chat").bounding_box()["x"] < 0  # off the screen
    shot(page, "phone")
    page.locator("#sidebar .toggle-button").click()
    expect(sidebar).to_have_class(re.compile(r"\bopen\b"))
    shot(page, "phone-list")
    new_chat(page)
    expect(sidebar).not_to_have_class(re.compile(r"\bopen\b"))

    page.locator("#message textarea").fill("Hello from a phone")
    page.locator("#message textarea").press("Enter")
    stop = page.locator("#message .stop-button")
    expect(stop).to_be_visible()
    assert stop.bounding_box()["width"] < 60, "Stop is a full-width bar"
    shot(page, "phone-generating")
    stop.click()
    expect(page.locator("#chatbot .message.bot").last.locator(".qm-footer")).to_contain_text("stopped")
    assert not console.errors


def test_a_malformed_conversation_file_is_skipped_not_an_error_for_the_whole_history(
    chat: tuple[str, Path], browser: Any,
) -> None:
    """Issue 14: one file of the wrong shape used to put "Error" over the chat and the list until deleted."""
    from playwright.sync_api import expect

    url, home = chat
    page, console = open_chat(browser, url)
    set_number(page, "max-tokens", 3)
    send(page, "A good conversation")
    saved = [p for p in (home / "conversations").glob("*/*.json") if "A good conversation" in p.read_text()]
    (folder,) = {p.parent for p in saved}
    bad = {"a" * 32: json.dumps({"messages": "not a list", "updated": 1}),
           "b" * 32: json.dumps([{"role": "user"}]),
           "c" * 32: json.dumps({"nodes": [{"role": "user", "content": 5, "parent": -1}], "updated": 1})}
    for name, text in bad.items():
        (folder / f"{name}.json").write_text(text)
    page.reload()
    expect(page.locator("#conversations")).to_contain_text("A good conversation")
    expect(page.locator("#chatbot .message.user").first).to_have_text("A good conversation")
    new_chat(page)
    page.locator("#conversations").get_by_text("A good conversation").click()
    expect(page.locator("#chatbot .message.user").first).to_have_text("A good conversation")
    assert "Error" not in page.locator("body").inner_text()
    log = "\n".join(p.read_text() for p in home.glob("server-*.log"))
    for name in bad:
        assert log.count(f"{name}.json") == 1, "each file is named in the log, once"
    assert not console.errors


def test_a_twenty_turn_session_with_a_kill_9_runs_without_console_errors(
    model_and_home: tuple[Path, Path], browser: Any, tmp_path: Path,
) -> None:
    """Issue 18's script: send, stop, regenerate, branch, edit, attach, reload, restart and export, twenty turns,
    and nothing in the browser's console but the restart's reconnect. The restart is a kill -9 in the middle of a
    reply (issue 14): the text streamed so far is kept."""
    from playwright.sync_api import expect

    model, _ = model_and_home
    home = tmp_path / "home"
    process, url = start_webui(model, home, FAST_DELAY)
    try:
        page, console = open_chat(browser, url)
        box = page.locator("#message textarea")
        bot = page.locator("#chatbot .message.bot").last
        set_number(page, "max-tokens", 5)
        turns = 0

        def turn(text: str) -> str:
            nonlocal turns
            turns += 1
            return send(page, text)

        for i in range(1, 4):  # 1-3
            assert "reply 5 tokens" in turn(f"Turn {i}")
        set_number(page, "max-tokens", 2000)
        box.fill("Turn 4: a long one, stopped")  # 4
        box.press("Enter")
        turns += 1
        expect(page.locator("#status")).to_contain_text("Writing the reply")
        page.keyboard.press("Escape")
        expect(bot.locator(".qm-footer")).to_contain_text("stopped")
        set_number(page, "max-tokens", 5)
        line = bot.locator(".qm-footer").inner_text()
        page.locator("#chatbot button[aria-label='Retry']").click()  # 5: regenerate
        turns += 1
        line = wait_reply(page, before=line)
        expect(bot.locator(".qm-position")).to_have_text("2/2")
        bot.locator(".qm-prev").click()  # the branch
        expect(bot.locator(".qm-position")).to_have_text("1/2")
        bot.locator(".qm-next").click()
        expect(bot.locator(".qm-position")).to_have_text("2/2")
        page.locator("#chatbot button[aria-label='Edit']").last.click()  # 6: edit the last question
        page.locator("#chatbot .edit-textarea").fill("Turn 6: edited")
        page.locator("#chatbot .edit-textarea").press("Enter")
        turns += 1
        line = wait_reply(page, "Turn 6: edited", before=line)
        (tmp_path / "notes.txt").write_text("a note\nto read\n")
        choose_file(page, "#attach", tmp_path / "notes.txt")  # 7: attach
        expect(page.locator("#attachments")).to_contain_text("notes.txt")
        turn("Turn 7: with a file")
        expect(page.locator("#chatbot .message.user").last.locator(".qm-footer")).to_contain_text("notes.txt")
        turn("Turn 8")
        page.reload()  # reload
        expect(page.locator("#chatbot .message.user").last).to_contain_text("Turn 8")
        turn("Turn 9")
        new_chat(page)
        turn("Turn 10: a second conversation")
        page.locator("#conversations").get_by_text(re.compile(r"^Turn 1\s")).click()
        expect(page.locator("#chatbot .message.user").first).to_have_text("Turn 1")
        turn("Turn 11")
        with page.expect_download() as download:  # export
            page.locator("#export-md").click()
        assert "Turn 11" in Path(download.value.path()).read_text()
        with page.expect_download() as download:
            page.locator("#export-json").click()
        assert "Turn 6: edited" in Path(download.value.path()).read_text()
        assert not console.errors, console.errors

        # 12: the restart, and a hard one: kill -9 while a reply streams (issue 14). The reply is saved every
        # second, so it comes back with what was streamed until a second before, marked as interrupted.
        set_number(page, "max-tokens", 2000)
        box.fill("Turn 12: killed mid-reply")
        box.press("Enter")
        turns += 1
        page.wait_for_function("() => [...document.querySelectorAll('#chatbot .message.bot')].pop()"
                               "?.querySelector('.message-content')?.innerText.length > 40")
        seen = copy_last_reply(page)
        time.sleep(1.5)  # a save after `seen` was streamed
        process.send_signal(signal.SIGKILL)  # the page's reconnect attempts are the only errors allowed
        process.wait(timeout=10)
        process, url = start_webui(model, home, FAST_DELAY, port=int(url.rstrip("/").rsplit(":", 1)[1]))
        reload(page)
        expect(page.locator("#chatbot .message.user").last).to_have_text("Turn 12: killed mid-reply")
        expect(bot.locator(".qm-footer")).to_have_text("interrupted: the server stopped while writing this reply")
        kept = copy_last_reply(page)
        assert len(kept) >= len(seen) > 40 and kept.startswith(seen)
        console.errors.clear()
        expect(page.locator("#max-tokens input[type=number]")).to_have_value("2000")  # the settings survive it
        set_number(page, "max-tokens", 5)
        for i in range(13, 16):  # 13-15
            turn(f"Turn {i} after the restart")
        line = bot.locator(".qm-footer").inner_text()
        page.locator("#chatbot button[aria-label='Retry']").click()  # 16
        turns += 1
        line = wait_reply(page, before=line)
        page.locator("#chatbot button[aria-label='Edit']").nth(2).click()  # 17: edit an earlier question
        page.locator("#chatbot .edit-textarea").fill("Turn 17: an earlier question, edited")
        page.locator("#chatbot .edit-textarea").press("Enter")
        turns += 1
        wait_reply(page, "Turn 17: an earlier question, edited", before=line)
        page.locator("#chatbot button[aria-label='Undo']").click()  # undo
        expect(box).to_have_value("Turn 17: an earlier question, edited")
        box.fill("")
        for i in range(18, 21):  # 18-20
            turn(f"Turn {i}")
        assert turns == 20
        shot(page, "twenty-turns", full_page=True)
        assert not console.errors, console.errors
    finally:
        stop_server(process)
