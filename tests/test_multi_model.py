"""One `qwen-mlx serve` for every local model: two tiny models under $QWEN_MLX_HOME/models, each request answered by
the model it names, `--max-models 1` unloading the other with its memory returned (MLX's active memory, as the
server's /health reports it), a keep-alive unloading an idle model, and models pulled from (a fake) hub and
deleted through Ollama's API, as the official `ollama` client drives it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from fake_hub import FakeHub, serve_hub
from servers import free_port, start_server, stop_server

import qwen_mlx

REPO = "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
ALIAS = "qwen2.5:0.5b"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def folders(tiny_model_dir: Callable[..., Path]) -> dict[str, Path]:
    # Different shapes, so different weights and different replies; b is about half a's size.
    return {"tiny-a": tiny_model_dir("mm-a", max_position_embeddings=512),
            "tiny-b": tiny_model_dir("mm-b", max_position_embeddings=256, hidden_size=32, num_attention_heads=2,
                                     num_key_value_heads=1)}


@pytest.fixture(scope="module")
def hub(folders: dict[str, Path]) -> Iterator[FakeHub]:
    fake = FakeHub({REPO: folders["tiny-b"]})
    server, fake.url = serve_hub(fake)  # type: ignore[attr-defined]
    yield fake
    server.shutdown()


@pytest.fixture(scope="module")
def server(folders: dict[str, Path], hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("multi")
    (root / "home" / "models").mkdir(parents=True)
    for name, folder in folders.items():
        (root / "home" / "models" / name).symlink_to(folder, target_is_directory=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Each step sleeps 20 ms, so that a long reply keeps its model busy for seconds (a few tokens cost nothing).
    env = {"QWEN_MLX_HOME": str(root / "home"), "HF_HOME": str(root / "hf"), "HF_ENDPOINT": hub.url,  # type: ignore
           "HF_HUB_DISABLE_TELEMETRY": "1", "QWEN_MLX_TOKEN_DELAY": "0.02"}
    process = start_server(["serve", "--model", "tiny-a", "--port", str(port), "--max-models", "1",
                            "--keep-alive", "-1"], f"{url}/health", root / "serve.log", env=env)
    yield url
    stop_server(process)


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health", timeout=10).json()


def loaded(url: str) -> list[str]:
    return [m["name"] for m in health(url)["models"]]


def library_reply(folder: Path, max_tokens: int) -> str:
    model, tokenizer = qwen_mlx.load(folder)
    return qwen_mlx.generate(model, tokenizer, PROMPT, max_tokens=max_tokens, temperature=0).text


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_every_local_model_is_listed(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-a", "tiny-b"]
    assert [m.model for m in ollama.Client(host=server).list().models] == ["tiny-a", "tiny-b"]


def test_each_request_gets_its_models_reply_and_the_other_model_is_unloaded(server: str,
                                                                           folders: dict[str, Path]) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)
    replies = {}
    memory = {}
    for name in ("tiny-a", "tiny-b"):
        replies[name] = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert replies[name].model == name
        assert loaded(server) == [name]  # --max-models 1: the other one is out
        state = health(server)
        memory[name] = (state["memory"]["active_bytes"], state["models"][0]["size_bytes"])
    for name, folder in folders.items():
        assert replies[name].choices[0].text == library_reply(folder, 8)
    assert replies["tiny-a"].choices[0].text != replies["tiny-b"].choices[0].text
    (with_a, size_a), (with_b, size_b) = memory["tiny-a"], memory["tiny-b"]
    assert with_a >= size_a > size_b > 0
    # Had a stayed in memory, b's request would leave a + b there; only b (and its small caches) are.
    assert with_b < size_a < size_a + size_b
    assert with_b >= size_b


def test_a_request_keep_alive_unloads_the_model_once_idle(server: str) -> None:
    client = ollama.Client(host=server)
    reply = client.generate(model="tiny-a", prompt=PROMPT, options={"num_predict": 3, "temperature": 0},
                            keep_alive="1s")
    assert reply.done and reply.eval_count == 3
    [running] = client.ps().models
    assert running.model == "tiny-a" and running.size > 0 and running.expires_at is not None
    wait_for(lambda: loaded(server) == [])
    assert client.ps().models == []
    state = health(server)
    assert state["memory"]["active_bytes"] < running.size // 4  # nothing loaded, nearly nothing held
    # Asked for again, it loads again.
    assert client.generate(model="tiny-a", prompt=PROMPT, options={"num_predict": 2}).done


def test_pull_then_chat_then_delete_through_the_ollama_api(server: str, hub: FakeHub,
                                                          folders: dict[str, Path]) -> None:
    client = ollama.Client(host=server)
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model=ALIAS, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "qwen-mlx pull" in missing.value.error
    progress = list(client.pull(ALIAS, stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    total = sum(f.stat().st_size for f in folders["tiny-b"].iterdir())
    counted = [p for p in progress if p.total]
    assert counted and counted[-1].completed == counted[-1].total == total
    assert ALIAS not in [m.model for m in client.list().models] and REPO in [m.model for m in client.list().models]

    reply = client.chat(model=ALIAS, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
    assert reply.model == ALIAS and reply.done and reply.eval_count == 3
    assert loaded(server) == [REPO]

    assert client.delete(ALIAS).status == "success"
    assert REPO not in [m.model for m in client.list().models] and loaded(server) == []
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete(ALIAS)
    assert gone.value.status_code == 404


def test_a_refused_delete_changes_nothing(server: str) -> None:
    """A delete refused because the model is answering (409) neither removes it nor unloads it afterwards."""
    client = ollama.Client(host=server, timeout=120)
    reply = client.generate(model="tiny-a", prompt=PROMPT, stream=True, options={"num_predict": 150})
    next(reply)  # it is generating (150 steps of 20 ms at least)
    with pytest.raises(ollama.ResponseError) as busy:
        client.delete("tiny-a")
    assert busy.value.status_code == 409
    assert [part for part in reply][-1].done
    time.sleep(1)  # the keep-alive is checked every 0.25 s: this server's is "for ever"
    assert loaded(server) == ["tiny-a"] and "tiny-a" in [m.model for m in client.list().models]
