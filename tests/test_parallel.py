"""One model over two processes: `mlx.launch -n 2 --backend ring` on 127.0.0.1, against one process.

Each launch starts in about a second; the models are tiny and transformers-made, and every subprocess has a
timeout, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from hf_models import save_tiny_qwen2
from mlx.utils import tree_flatten
from parallel_run import MAX_TOKENS, MESSAGES, PROMPT, weight_bytes
from servers import free_port, start_server, stop_launched

from qwen_mlx.engine.generate import generate
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.parallel import Parallel, check_shardable, stage_layers, weight_part
from qwen_mlx.store.conversion import convert
from qwen_mlx.store.load import load
from qwen_mlx.store.synthetic import tiny_config
from qwen_mlx.store.weights import read_tensor

LAUNCH = [str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring"]
TESTS = Path(__file__).parent
# One CPU stream per rank: two ranks share this machine's two cores.
ENV = {**os.environ, "QWEN_MLX_CPU_STREAMS": "1", "PYTHONPATH": str(TESTS)}


def launch(n: int, args: list[str], home: Path, timeout: float = 120, stdin: str | None = None,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAUNCH, "-n", str(n), "--", sys.executable, *args], capture_output=True, text=True,
                          env={**ENV, "QWEN_MLX_HOME": str(home)}, timeout=timeout, input=stdin)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Transformers-made tiny Qwen2s: float32 with its own lm_head and a vocabulary that does not split evenly
    (323 rows), three layers (a pipeline split of 2 + 1), and a 4-bit one (groups of 32) with tied embeddings."""
    root = tmp_path_factory.mktemp("parallel-models")
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    folders = {
        "float32": save_tiny_qwen2(root / "float32", num_hidden_layers=4, vocab_size=323, tie_word_embeddings=False,
                                   **shape),
        "uneven": save_tiny_qwen2(root / "uneven", seed=1, num_hidden_layers=3, **shape),
    }
    tied = save_tiny_qwen2(root / "tied", seed=2, num_hidden_layers=4, tie_word_embeddings=True, **shape)
    convert(tied, root / "4bit", quantize=True, q_group_size=32)
    folders["4bit"] = root / "4bit"
    return folders


@pytest.fixture(scope="module")
def alone(models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """What one process computes for each model."""
    results = {}
    for name, folder in models.items():
        model, tokenizer = load(folder)
        logits = model(mx.array(PROMPT)).astype(mx.float32)
        tokens = generate(model, tokenizer, MESSAGES, max_tokens=MAX_TOKENS, temperature=0.0).tokens
        results[name] = {"logits": np.array(logits), "tokens": tokens, "weight_bytes": weight_bytes(model)}
    return results


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_two_ranks_compute_the_logits_and_greedy_tokens_of_one_process_in_half_the_memory(
        mode: str, models: dict[str, Path], alone: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    run = launch(2, [str(TESTS / "parallel_run.py"), mode, str(out), *map(str, models.values())], tmp_path)
    assert out.exists(), run.stdout + run.stderr
    results = json.loads(out.read_text())
    for name, folder in models.items():
        got, want = results[str(folder)], alone[name]
        np.testing.assert_allclose(np.array(got["logits"]), want["logits"], atol=1e-4, rtol=0, err_msg=name)
        assert got["tokens"] == want["tokens"], name
        if name != "uneven":  # 2 + 1 layers cannot halve the memory
            assert max(got["weight_bytes"]) <= 0.55 * want["weight_bytes"], name


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_generate_command_split_over_two_processes_prints_what_one_process_prints(
        mode: str, models: dict[str, Path], tmp_path: Path) -> None:
    args = ["-m", "qwen_mlx.cli", "generate", "--model", str(models["4bit"]), "-p", "the cat sat on",
            "--max-tokens", "24", "--temp", "0.9", "--seed", "7", "--stop", "the"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=120)
    two = launch(2, [*args, "--parallel", mode], tmp_path)
    assert one.returncode == 0, one.stderr
    assert two.stdout == one.stdout, two.stderr
    assert f"over 2 processes ({mode} parallel)" in two.stderr


def test_chat_split_over_two_processes_reuses_each_turn(models: dict[str, Path], tmp_path: Path) -> None:
    # mlx.launch passes typed lines on to rank 0 but never an end of input: the chat ends with /exit.
    args = ["-m", "qwen_mlx.cli", "chat", "--model", str(models["4bit"]), "--max-tokens", "8", "--temp", "0", "-v"]
    typed = "hello\nand again\n/exit\n"
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=120, input=typed)
    two = launch(2, [*args, "--parallel", "pipeline"], tmp_path, stdin=typed)
    assert two.stdout == one.stdout, two.stderr
    second_turn = [line for line in two.stderr.splitlines() if line.startswith("prompt:")][1]
    assert "0 reused" not in second_turn


def chat(port: int, content: str, model: str = "4bit", **fields: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 16, **fields}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_server_split_over_two_processes_batches_constrains_and_ends_with_a_lost_rank(
        models: dict[str, Path], tmp_path: Path) -> None:
    folder = models["4bit"]
    model, tokenizer = load(folder)
    port = free_port()
    server = start_server(["serve", "--model", str(folder), "--port", str(port), "--parallel", "tensor"],
                          f"http://127.0.0.1:{port}/health", tmp_path / "serve.log", env=ENV,
                          launcher=[*LAUNCH, "-n", "2", "--"])
    try:
        # Three at once decode in one batch on both ranks; greedy replies are those of one process alone.
        prompts = ["the cat", "a dog and", "hello there"]
        replies: dict[str, str] = {}
        threads = [threading.Thread(target=lambda p=p: replies.__setitem__(
            p, chat(port, p, temperature=0)["choices"][0]["message"]["content"])) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        for p in prompts:
            want = generate(model, tokenizer, [{"role": "user", "content": p}], max_tokens=16, temperature=0.0)
            assert replies[p] == want.text, p
        seeded = chat(port, "the cat", temperature=0.9, seed=3)["choices"][0]["message"]["content"]
        want = generate(model, tokenizer, [{"role": "user", "content": "the cat"}], max_tokens=16, temperature=0.9,
                        seed=3)
        assert seeded == want.text
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        constrained = chat(port, "a number", max_tokens=64, response_format={
            "type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
        if constrained["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(constrained["choices"][0]["message"]["content"])["n"], int)
        else:
            assert constrained["choices"][0]["message"]["content"].startswith('{"n": ')

        # A follower killed outright: everything stops by itself, with one line that names what happened. Either
        # rank 0 notices at its next step (or heartbeat) and says so, or mlx.launch sees the exit first, says so
        # and stops rank 0 (SIGTERM: a clean shutdown).
        followers = [p for p in child_pids(server.pid) if rank_of(p) == "1"]
        os.kill(followers[0], signal.SIGKILL)
        server.wait(timeout=30)
    finally:
        stop_launched(server)
    log = (tmp_path / "serve.log").read_text()
    assert ("qwen-mlx: error: [rank 0] another process of the group stopped" in log
            or "Node with rank 1 exited with code -9" in log), log
    assert "Traceback" not in log, log


def test_ctrl_c_stops_every_rank_of_a_split_server(models: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    server = start_server(["serve", "--model", str(models["float32"]), "--port", str(port), "--parallel",
                           "pipeline"], f"http://127.0.0.1:{port}/health", tmp_path / "serve.log", env=ENV,
                          launcher=[*LAUNCH, "-n", "2", "--"])
    ranks = child_pids(server.pid)
    assert chat(port, "hi", "float32", temperature=0)["choices"][0]["finish_reason"] in ("stop", "length")
    stop_launched(server)
    log = (tmp_path / "serve.log").read_text()
    assert not running(ranks, within=30), log
    assert "error" not in log.lower(), log


def running(pids: list[int], within: float) -> list[int]:
    """Those of `pids` still running (zombies aside) after up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for pid in pids:
            try:
                # The state follows the command name in parentheses; Z: exited, not yet reaped.
                if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
                    alive.append(pid)
            except OSError:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def child_pids(launcher: int) -> list[int]:
    """The ranks a launcher started: the processes of its session running qwen_mlx.cli."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == launcher and b"qwen_mlx.cli" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"MLX_RANK=")), None)


def test_heads_that_do_not_split_over_the_processes_are_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    run = launch(3, ["-m", "qwen_mlx.cli", "generate", "--model", str(models["float32"]), "-p", "hi",
                     "--parallel", "tensor"], tmp_path)
    # Every rank finds it; the first to say so ends them all (which one is a race).
    assert re.search(r"qwen-mlx: error: \[rank \d\] cannot split 4 attention heads and 2 KV heads evenly over 3 "
                     "processes", run.stderr), run.stderr
    assert "Traceback" not in run.stderr


def test_parallel_alone_asks_for_mlx_launch(models: dict[str, Path]) -> None:
    run = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "generate", "--model", str(models["float32"]), "-p",
                          "hi", "--parallel", "tensor"], capture_output=True, text=True, env=ENV, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("qwen-mlx: error: --parallel tensor needs several processes: start the command "
                                 "with mlx.launch")


class FakeGroup:
    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_pipeline_stages_are_contiguous_and_cover_every_layer() -> None:
    for layers, size in [(28, 2), (28, 3), (80, 4), (3, 2), (4, 4)]:
        stages = [stage_layers(layers, Parallel("pipeline", FakeGroup(r, size))) for r in range(size)]
        assert [i for stage in stages for i in stage] == list(range(layers))
        assert max(map(len, stages)) - min(map(len, stages)) <= 1


def test_shard_checks_name_what_does_not_divide() -> None:
    qwen7b = ModelConfig.from_dict(tiny_config(num_attention_heads=28, num_key_value_heads=4, hidden_size=28 * 8))
    check_shardable(qwen7b, Parallel("tensor", FakeGroup(0, 4)))
    with pytest.raises(QwenMLXError, match="cannot split 28 attention heads and 4 KV heads evenly over 8 "):
        check_shardable(qwen7b, Parallel("tensor", FakeGroup(0, 8)))
    check_shardable(qwen7b, Parallel("pipeline", FakeGroup(0, 2)))
    with pytest.raises(QwenMLXError, match="cannot split 2 layers into 3 pipeline stages"):
        check_shardable(qwen7b, Parallel("pipeline", FakeGroup(0, 3)))
    config = ModelConfig.from_dict(tiny_config())
    with pytest.raises(QwenMLXError, match="o_proj.scales: 3 columns do not split evenly over 2"):
        weight_part("model.layers.0.self_attn.o_proj.scales", (64, 3), config, Parallel("tensor", FakeGroup(1, 2)))


def test_a_rank_reads_its_slice_of_a_stored_tensor(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {"bf16": mx.random.normal((5, 6)).astype(mx.bfloat16), "u32": mx.arange(24, dtype=mx.uint32)
               .reshape(4, 6), "f32": mx.random.normal((3, 8))}
    mx.save_safetensors(str(path), tensors)
    assert mx.array_equal(read_tensor(path, "bf16"), tensors["bf16"])
    assert read_tensor(path, "bf16").dtype == mx.bfloat16
    assert mx.array_equal(read_tensor(path, "u32", -1, 2, 4), tensors["u32"][:, 2:4])
    padded = read_tensor(path, "bf16", 0, 3, 5, 3)
    assert mx.array_equal(padded[:2], tensors["bf16"][3:5]) and not padded[2].any()
    assert mx.array_equal(read_tensor(path, "f32", 0, 1, 2), tensors["f32"][1:2])


def test_a_sharded_rank_keeps_only_its_parameters(models: dict[str, Path]) -> None:
    # The plan for rank 1 of 2, checked against the stored shapes: a local model of exactly those shapes.
    config = ModelConfig.from_file(models["4bit"] / "config.json")
    parallel = Parallel("tensor", FakeGroup(1, 2))
    model, _ = load(models["4bit"])
    for name, array in tree_flatten(model.parameters()):
        part = weight_part(name, tuple(array.shape), config, parallel)
        if "self_attn.q_proj" in name or "embed_tokens" in name:
            assert part.axis == 0 and part.length * 2 >= array.shape[0]
        if "mlp.down_proj" in name:
            assert part.axis == -1 and part.stop - part.start == array.shape[-1] // 2
        if "norm" in name:
            assert part.axis is None
