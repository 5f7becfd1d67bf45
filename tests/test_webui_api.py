"""`qwen-mlx webui` over HTTP, driven by gradio_client as a program would: streaming, Stop, prefix reuse, sessions.

The server runs as a subprocess on a free 127.0.0.1 port with a tiny random model whose end-of-turn tokens can never
be sampled (so a reply runs until max tokens or Stop), slowed by QWEN_MLX_TOKEN_DELAY so Stop lands mid-reply.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import free_port, start_server, stop_server

TOKEN_DELAY = 0.02  # seconds per model step in the server under test
CONTEXT = 4096  # the test model's context: an unstopped reply would run for over a minute
STATS = re.compile(r"prompt (\d+) tokens \((\d+) from cache\) · reply (\d+) tokens")


def write_test_model(folder: Path, context: int, seed: int = 0) -> Path:
    """A tiny random Qwen2 (byte-level tokenizer, real Qwen chat template) that never ends a reply by itself;
    another `seed`, other weights."""
    import mlx.core as mx
    from hf_models import TINY_VOCAB, write_tiny_tokenizer

    from qwen_mlx.store.synthetic import tiny_config, write_random_qwen2
    from qwen_mlx.text.tokenizer import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_random_qwen2(folder, tiny_config(vocab_size=TINY_VOCAB, max_position_embeddings=context, rope_theta=10000.0),
                       seed)
    write_tiny_tokenizer(folder)
    # Zero embeddings for the end-of-turn ids: with tied embeddings their logit is 0, which is never among the
    # top 20 (generation_config's top_k) of 320 logits of spread ~2.
    path = folder / "model.safetensors"
    weights = mx.load(str(path))
    weights["model.embed_tokens.weight"][mx.array(Tokenizer.from_folder(folder).eos_token_ids)] = 0
    mx.save_safetensors(str(path), weights)
    return folder


def start_webui(model: Path, home: Path, token_delay: float, port: int | None = None,
                extra_args: tuple[str, ...] = ()) -> tuple[Any, str]:
    """`qwen-mlx webui` on `port` (default: a free one); the process and its URL once it answers."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/"
    process = start_server(
        ["webui", "--model", str(model), "--port", str(port), "--max-queue", "8", *extra_args], url,
        home / f"server-{port}.log",
        env={"QWEN_MLX_HOME": str(home), "QWEN_MLX_TOKEN_DELAY": str(token_delay), "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    return process, url


def texts(chat: list[dict[str, Any]]) -> list[str]:
    """The text of each Chatbot message as gradio_client returns them."""
    return ["".join(part.get("text", "") for part in m["content"]) for m in chat]


def footers(outputs: tuple[Any, ...] | list[Any]) -> list[str]:
    """The line under each Chatbot row (statistics, notes), which the page draws outside the message's markdown:
    the endpoints' fourth output."""
    return [row["footer"] for row in json.loads(outputs[3])]


def reply_stats(text: str) -> tuple[int, int, int]:
    """(prompt tokens, prompt tokens computed, reply tokens) from the statistics line under a reply."""
    match = STATS.search(text)
    assert match, f"no statistics under the reply: {text[-300:]!r}"
    prompt, cached, generated = int(match[1]), int(match[2]), int(match[3])
    return prompt, prompt - cached, generated


def unmath(text: str) -> str:
    """A reply's text with the page's math markup undone: `$x$` is sent as `\\(x\\)`, so a streamed reply may
    change there when the closing `$` arrives."""
    return text.replace("\\(", "$").replace("\\)", "$")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("webui")
    model = write_test_model(root / "model", context=CONTEXT)
    process, url = start_webui(model, root / "home", TOKEN_DELAY)
    yield url, root / "home"
    stop_server(process)


def client(url: str) -> Any:
    from gradio_client import Client

    return Client(url, verbose=False)


def test_reply_streams_in_growing_updates_and_ends_with_statistics(server: tuple[str, Path]) -> None:
    job = client(server[0]).submit("Hello there", max_tokens=40, api_name="/send")
    replies = [unmath(texts(update[0])[-1]) for update in job if len(update[0]) == 2]
    result = job.result()
    final = texts(result[0])
    assert final[0] == "Hello there"
    placeholders = ("…", "*Waiting for the model", "*Reading the prompt")
    streamed = [r for r in replies if r and not r.startswith(placeholders)]
    assert len(streamed) >= 3, "the reply arrived in one piece, not streamed"
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:], strict=False)), "updates must only grow"
    prompt, prefilled, generated = reply_stats(footers(result)[1])
    assert generated == 40 and prefilled == prompt
    assert "max tokens reached" in footers(result)[1]
    assert "prompt" not in final[1], "the statistics are not part of the message"


def test_cancel_stops_the_generation_loop_and_the_next_request_is_served_at_once(server: tuple[str, Path]) -> None:
    c = client(server[0])
    job = c.submit("Talk forever", max_tokens=8192, api_name="/send")  # would run into the context: 80 s
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        outputs = job.outputs()
        if outputs and len(outputs[-1][0]) == 2 and len(texts(outputs[-1][0])[1]) > 10:
            break
        time.sleep(0.05)
    started = time.monotonic()
    job.cancel()  # gradio_client's /cancel: Gradio closes the handler's generator, whose `finally` sets the flag

    # Another session's request: the worker runs one generation at a time, so this reply comes at once only if
    # the cancelled generation's loop stopped.
    other = footers(client(server[0]).predict("Anyone there?", max_tokens=5, api_name="/send"))
    assert time.monotonic() - started < 5
    assert reply_stats(other[1])[2] == 5

    # The stopped reply keeps what was generated, with its statistics.
    outputs = c.predict("And now?", max_tokens=5, api_name="/send")
    lines = footers(outputs)
    assert len(texts(outputs[0])) == 4 and "stopped" in lines[1]
    _, _, generated = reply_stats(lines[1])
    assert generated < (time.monotonic() - started + 2) / TOKEN_DELAY < CONTEXT, "the cancelled reply went on"
    assert reply_stats(lines[3])[2] == 5


def test_follow_up_turn_prefills_only_what_is_new(server: tuple[str, Path]) -> None:
    c = client(server[0])
    first = footers(c.predict("What is the capital of France?", max_tokens=8, api_name="/send"))
    prompt1, prefilled1, _ = reply_stats(first[1])
    assert prefilled1 <= prompt1  # (the system prompt may come from another conversation's cached turn)
    second = footers(c.predict("And of Italy?", max_tokens=8, api_name="/send"))
    prompt2, prefilled2, _ = reply_stats(second[3])
    # The first turn's prompt (at least) came from the conversation's cache, not from a second read.
    assert prompt2 - prefilled2 >= prompt1


def test_two_clients_see_only_their_own_conversation(server: tuple[str, Path]) -> None:
    alice, bob = client(server[0]), client(server[0])
    alice_chat = texts(alice.predict("alice's apple", max_tokens=3, api_name="/send")[0])
    bob_chat = texts(bob.predict("bob's banana", max_tokens=3, api_name="/send")[0])
    assert alice_chat[0] == "alice's apple" and bob_chat[0] == "bob's banana"
    assert len(bob_chat) == 2 and not any("apple" in t for t in bob_chat)
    alice_again = alice.predict(api_name="/new_chat")
    # (chat, message box, list): each entry of the list is labelled with its title over its date
    saved_titles = [label.splitlines()[0] for label, _ in alice_again[2]["choices"]]
    assert "alice's apple" in saved_titles and "bob's banana" not in saved_titles


def test_the_secret_that_signs_owner_ids_never_reaches_the_page(server: tuple[str, Path]) -> None:
    import httpx

    url, home = server
    secret = (home / "webui-secret").read_text().strip()
    config, page = httpx.get(url + "config", timeout=30), httpx.get(url, timeout=30)
    assert config.status_code == page.status_code == 200
    assert "qwen-mlx-owner" in config.text  # the browser storage's settings are there, its key included
    assert secret not in config.text and secret not in page.text


def test_prompt_longer_than_the_context_is_an_error_in_the_chat_and_the_server_goes_on(
    server: tuple[str, Path],
) -> None:
    c = client(server[0])
    chat = texts(c.predict("x" * CONTEXT, max_tokens=5, api_name="/send")[0])  # one byte token per "x"
    assert "Error" in chat[1] and "context" in chat[1]
    lines = footers(c.predict("short", max_tokens=5, api_name="/send"))
    # The failed exchange stays visible but is not sent to the model again.
    assert reply_stats(lines[3])[0] < 100


def test_a_model_that_fails_to_load_is_an_error_in_the_chat_and_the_server_goes_on(tmp_path: Path) -> None:
    broken = tmp_path / "llama"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    process, url = start_webui(broken, tmp_path / "home", token_delay=0)
    try:
        c = client(url)
        for question in ("Hello?", "Still there?"):
            chat = texts(c.predict(question, api_name="/send")[0])
            assert "Error" in chat[-1] and "model_type is 'llama'" in chat[-1]
    finally:
        stop_server(process)

