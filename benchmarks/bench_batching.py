"""Concurrent streaming clients of `qwen-mlx serve` against the same clients of `mlx_lm.server` (which batches by
default, `--decode-concurrency 32`), on one random-weight Qwen2.5-0.5B-shaped 4-bit model: aggregate tokens/s and
each stream's time to first token, for 1, 2, 4 and 8 clients.

    python benchmarks/bench_batching.py             # about 5 minutes on a 2-core Linux machine
    python benchmarks/bench_batching.py --quick     # 1, 2 and 4 clients, 16 tokens each

    # On a Mac, the flagship:
    python benchmarks/bench_batching.py --model mlx-community/Qwen2.5-7B-Instruct-4bit --clients 1 4 8 16

Every client sends its own short chat message at once and streams a greedy reply of --tokens tokens. Aggregate
tokens/s is all clients' tokens over the time from the requests to the last token; forward passes per token is
what qwen-mlx's worker reports (one batched pass serves every row). On MLX's CPU build a step over n rows costs
about n single steps (its matmuls are compute-bound), so here batching shows in passes and in streams running side
by side rather than in tokens/s; on Apple silicon a step over 8 rows costs little more than one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from servers import free_port, stop_server  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three rivers in Europe.", "How do bees make honey?",
             "Why is the sea salty?", "What makes a good bread?", "How far away is the moon?",
             "Who built the first clock?", "What is a prime number?", "Why do leaves fall?",
             "How do birds navigate?", "What is rust?", "Why is ice slippery?", "How does a lock work?",
             "What is a comet?", "Why do we dream?", "How do magnets work?"]


def start(command: list[str], url: str, log: Path, timeout: float = 300) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[:3]} exited: {log.read_text()[-2000:]}")
        try:
            httpx.get(url, timeout=2)
            return process
        except httpx.HTTPError:
            time.sleep(0.5)
    stop_server(process)
    raise SystemExit(f"{command[:3]} did not start: {log.read_text()[-2000:]}")


def stream(url: str, model: str, question: str, tokens: int, started: float) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    first, count = None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1800) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("usage"):
                count = payload["usage"]["completion_tokens"]
            if payload.get("choices") and payload["choices"][0]["delta"].get("content") and first is None:
                first = time.monotonic() - started
    return {"ttft": first, "tokens": count, "done": time.monotonic() - started}


def level(url: str, model: str, clients: int, tokens: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = [{}] * clients
    started = time.monotonic()

    def client(i: int) -> None:
        results[i] = stream(url, model, QUESTIONS[i % len(QUESTIONS)], tokens, started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(r["tokens"] for r in results)
    return {"clients": clients, "tokens": total, "aggregate_tps": total / max(r["done"] for r in results),
            "ttft_median": statistics.median(r["ttft"] for r in results),
            "ttft_max": max(r["ttft"] for r in results),
            "all_started_before_any_finished": max(r["ttft"] for r in results) < min(r["done"] for r in results)}


def measure(side: str, folder: Path, levels: list[int], tokens: int, log_dir: Path) -> list[dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if side == "qwen-mlx":
        command = [sys.executable, "-m", "qwen_mlx.cli", "serve", "--model", str(folder), "--port", str(port),
                   "--max-batch", str(max(levels)), "--max-queue", str(max(levels))]
        model, ready = folder.name, f"{url}/health"
    else:
        command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--port", str(port),
                   "--decode-concurrency", str(max(levels)), "--log-level", "WARNING"]
        model, ready = str(folder), f"{url}/v1/models"
    process = start(command, ready, log_dir / f"{side}.log")
    try:
        stream(url, model, "warm up", 2, time.monotonic())
        rows = []
        for n in levels:
            print(f"{side}: {n} client(s) ...", file=sys.stderr, flush=True)
            before = httpx.get(f"{url}/health").json() if side == "qwen-mlx" else None
            row = level(url, model, n, tokens)
            if before is not None:
                after = httpx.get(f"{url}/health").json()
                generated = after["generated_tokens"] - before["generated_tokens"]
                row["passes_per_token"] = (after["decode_passes"] - before["decode_passes"]) / generated
            rows.append(row)
        return rows
    finally:
        stop_server(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an MLX model folder (default: a random 0.5B-shaped 4-bit one)")
    parser.add_argument("--clients", type=int, nargs="+", help="concurrent clients per level (default 1 2 4 8)")
    parser.add_argument("--tokens", type=int, help="tokens per reply (default 32)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "batching.json")
    args = parser.parse_args()
    levels = args.clients or ([1, 2, 4] if args.quick else [1, 2, 4, 8])
    tokens = args.tokens or (16 if args.quick else 32)

    import mlx.core as mx

    from qwen_mlx.store.synthetic import random_shape, write_random_quantized_model

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = Path(args.model)
        else:
            dtype = "float32" if mx.default_device().type == mx.DeviceType.cpu else "bfloat16"
            print("Building a random Qwen2.5-0.5B-shaped 4-bit model ...", file=sys.stderr, flush=True)
            folder = write_random_quantized_model(Path(tmp) / "qwen2.5-0.5b-random", random_shape("qwen2.5-0.5b"),
                                                  4, 64, dtype)
        sides = {side: measure(side, folder, levels, tokens, Path(tmp)) for side in ("qwen-mlx", "mlx-lm")}
    ours, theirs = sides["qwen-mlx"], sides["mlx-lm"]
    lines = [f"{tokens} tokens per client, greedy; {mx.default_device()}; "
             f"{(time.perf_counter() - began) / 60:.1f} min", "",
             "| clients | qwen-mlx tokens/s | mlx_lm.server tokens/s | ratio | qwen-mlx vs its 1 client | "
             "qwen-mlx passes / token | first token, median / last (s): qwen-mlx | mlx_lm.server | "
             "all streaming at once: qwen-mlx |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a, b in zip(ours, theirs, strict=True):
        lines.append(f"| {a['clients']} | {a['aggregate_tps']:.2f} | {b['aggregate_tps']:.2f} | "
                     f"{a['aggregate_tps'] / b['aggregate_tps']:.2f} | "
                     f"{a['aggregate_tps'] / ours[0]['aggregate_tps']:.2f} | {a['passes_per_token']:.2f} | "
                     f"{a['ttft_median']:.1f} / {a['ttft_max']:.1f} | {b['ttft_median']:.1f} / {b['ttft_max']:.1f} | "
                     f"{'yes' if a['all_started_before_any_finished'] else 'no'} |")
    print("\n" + "\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"levels": levels, "tokens": tokens, "sides": sides, "table": lines}, indent=2))


if __name__ == "__main__":
    main()
