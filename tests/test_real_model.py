"""The real Qwen2.5-Coder-0.5B-Instruct (its GGUF, downloaded by the `real_gguf_05b` fixture), imported as a user
imports it: what a user relies on, checked on real text rather than random weights.

- the float import is the model transformers' own GGUF loader builds: logits within 1e-4, greedy replies identical;
- the default import (the file's own quantization) answers real questions right; so does the float import, through
  the library and through `serve` with the official openai client (a tool call, then an answer that uses the
  tool's result);
- speculation with the original as OpenAI's prediction gives the plain greedy reply at under half a forward pass
  per token; four real prompts batched give their solo replies.

The tier runs as a user does: the CPU build chooses float32 weights where they fit (QWEN_MLX_CPU_WEIGHTS=auto;
the rest of the suite pins the stored quantized path), so prefill goes through OpenBLAS.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import qwen_mlx

pytestmark = pytest.mark.real

GREEDY: dict[str, Any] = {"temperature": 0}
PROMPTS = [
    [{"role": "user", "content": "What is a Python list comprehension? One sentence."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three sorting algorithms."}],
    [{"role": "user", "content": "Translate 'good morning' into French and German."}],
]


@pytest.fixture(scope="module", autouse=True)
def cpu_weights_as_a_user_gets_them() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QWEN_MLX_CPU_WEIGHTS", "auto")
        yield


@pytest.fixture(scope="module")
def imported(real_gguf_05b: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The GGUF imported twice: as stored (its own quantization) and as float32."""
    root = tmp_path_factory.mktemp("real-05b")
    qwen_mlx.convert(real_gguf_05b, root / "q")
    qwen_mlx.convert(real_gguf_05b, root / "f32", dtype="float32")
    return {"quantized": root / "q", "float32": root / "f32"}


@pytest.fixture(scope="module")
def quantized(imported: dict[str, Path]) -> Iterator[tuple[Any, Any]]:
    yield qwen_mlx.load(imported["quantized"])
    gc.collect()  # the 2.5 GB of float32 weights go now, not in the middle of a later test's measurements


@pytest.fixture(scope="module")
def full(imported: dict[str, Path]) -> Iterator[tuple[Any, Any]]:
    yield qwen_mlx.load(imported["float32"])
    gc.collect()


def test_float_import_is_the_model_transformers_loads_from_the_gguf(real_gguf_05b: Path,
                                                                     full: tuple[Any, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(real_gguf_05b.parent, gguf_file=real_gguf_05b.name,
                                                     torch_dtype=torch.float32)
    model, tokenizer = full
    ids = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=True)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(model(qwen_mlx_array(ids)))[0]
    assert np.abs(ours - expected).max() < 1e-4
    for messages in PROMPTS:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_ids, pad_token_id=tokenizer.eos_token_ids[0])
        theirs = [t for t in out[0, len(ids):].tolist() if t not in tokenizer.eos_token_ids]
        assert qwen_mlx.generate(model, tokenizer, ids, max_tokens=32, **GREEDY).tokens == theirs


def qwen_mlx_array(ids: list[int]) -> Any:
    import mlx.core as mx

    return mx.array([ids])


def test_the_capital_of_france(quantized: tuple[Any, Any]) -> None:
    reply = qwen_mlx.generate(*quantized, [{"role": "user", "content": "What is the capital of France? Answer in "
                                                                       "one word."}], max_tokens=8, **GREEDY)
    assert "Paris" in reply.text


def test_a_generated_is_prime_runs_and_is_right(full: tuple[Any, Any]) -> None:
    reply = qwen_mlx.generate(*full, [{"role": "system", "content": "Reply with code only, no explanation."},
                                      {"role": "user", "content": "Write a Python function is_prime(n) that returns "
                                                                  "True if n is prime."}],
                              max_tokens=120, stop=["\n```"], **GREEDY)
    code = re.search(r"```(?:python)?\n(.*)", reply.text, re.S)
    namespace: dict[str, Any] = {}
    exec(code.group(1) if code else reply.text, namespace)  # the model's own code, run as a user would
    assert [n for n in range(30) if namespace["is_prime"](n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]


def test_a_json_schema_extraction_returns_the_right_values(quantized: tuple[Any, Any]) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}, "city": {"type": "string",
                                                                                    "maxLength": 20}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    text = "Maria Santos is 34 years old and lives in Berlin."
    reply = qwen_mlx.generate(*quantized, [{"role": "user", "content": f"Extract the person from: {text}"}],
                              json_schema=schema, max_tokens=60, **GREEDY)
    value = json.loads(reply.text)
    assert value["age"] == 34 and "Maria" in value["name"] and value["city"] == "Berlin"


EDIT = '''import socket


class Server:
    def __init__(self, host="127.0.0.1", port=8080):
        self.host = host
        self.port = port

    def address(self):
        return f"{self.host}:{self.port}"

    def open(self):
        sock = socket.socket()
        sock.bind((self.host, self.port))
        return sock
'''


def test_speculation_on_a_code_edit_is_the_greedy_reply_at_under_half_a_pass_per_token(
        full: tuple[Any, Any]) -> None:
    messages = [{"role": "user", "content": "Change the default port from 8080 to 9090 in this code. Reply with the "
                                            f"whole code only, no explanation.\n\n```python\n{EDIT}```"}]
    plain = qwen_mlx.generate(*full, messages, max_tokens=150, **GREEDY)
    predicted = qwen_mlx.generate(*full, messages, max_tokens=150, prediction=f"```python\n{EDIT}```", **GREEDY)
    assert "port=9090" in plain.text
    assert predicted.tokens == plain.tokens
    stats = predicted.stats
    assert stats.decode_passes / stats.generation_tokens <= 0.5


def test_four_real_prompts_batched_give_their_solo_replies(full: tuple[Any, Any]) -> None:
    prompts = [*PROMPTS, [{"role": "user", "content": "What does HTTP stand for?"}]]
    solo = [qwen_mlx.generate(*full, p, max_tokens=16, **GREEDY).tokens for p in prompts]
    batched = qwen_mlx.batch_generate(*full, prompts, max_tokens=16, **GREEDY)
    assert [r.tokens for r in batched] == solo


@pytest.fixture(scope="module")
def server(imported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from servers import free_port, start_server, stop_server

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(["serve", "--model", str(imported["float32"]), "--port", str(port)], f"{url}/health",
                           tmp_path_factory.mktemp("real-serve") / "serve.log", timeout=180)
    yield url
    stop_server(process)


def test_through_serve_the_model_calls_the_tool_and_answers_with_its_result(server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=300)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(model="f32", messages=messages, tools=tools, temperature=0, max_tokens=60)
    [call] = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 31, "sky": "sunny"}'}]
    final = client.chat.completions.create(model="f32", messages=messages, tools=tools, temperature=0,
                                           max_tokens=60)
    answer = final.choices[0].message.content or ""
    assert "31" in answer and final.choices[0].message.tool_calls is None
