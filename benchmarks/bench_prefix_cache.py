"""The prefix cache's tiers against recomputing, through `qwen-mlx serve` (and `mlx_lm.server`, whose in-memory LRU
prompt cache shares prefixes too), side by side in one run: the time to the first token of

- a follow-up turn after the server restarted, with 1K and 4K tokens of history: read back from disk vs recomputed;
- the first turn of a second conversation that shares a 2K-token system prompt with the first: shared vs not;
- a regenerate once a rotating cache (--max-kv-size 512) has wrapped: from the turn's checkpoint vs rebuilt.

    python benchmarks/bench_prefix_cache.py                       # a random Qwen2.5-0.5B-shaped 4-bit model
    python benchmarks/bench_prefix_cache.py --shape small         # a narrower random model: minutes, not an hour
    python benchmarks/bench_prefix_cache.py --model mlx-community/Qwen2.5-7B-Instruct-4bit      # on a Mac

Each measurement runs on a server of its own (a fresh process; a restart is a stop, SIGTERM, and a start with the
same $QWEN_MLX_HOME), greedy, one token, so the time is the prompt's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from servers import free_port, start_server, stop_server  # noqa: E402

SMALL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 4,
         "num_key_value_heads": 2}
WORDS = ("river mill bridge town lantern harvest market bell orchard stone ferry chapel meadow forge tower well "
         "granary quay weir cart loom kiln").split()


def text_of(tokens: int, tokenizer: Any, seed: int) -> str:
    """Prose-like text of about `tokens` tokens (different seeds give different text)."""
    words, n = [], 0
    while n < tokens:
        words += [WORDS[(seed * 7 + len(words) * 13) % len(WORDS)], str((seed + len(words)) % 97)]
        n = len(tokenizer.encode(" ".join(words))) if len(words) % 50 == 0 else n
    return " ".join(words)


class Server:
    """`qwen-mlx serve` or `mlx_lm.server` on a free port; `first_token(messages)` times one reply's first token."""

    def __init__(self, side: str, folder: Path, home: Path, log: Path, *extra: str):
        self.side, self.folder = side, folder
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        if side == "qwen-mlx":
            self.process = start_server(["serve", "--model", str(folder), "--port", str(port), *extra],
                                        f"{self.url}/health", log, env={"QWEN_MLX_HOME": str(home)}, timeout=600)
            self.model = folder.name
        else:
            import subprocess

            with open(log, "wb") as out:
                self.process = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(folder),
                                                 "--port", str(port), "--log-level", "WARNING"], stdout=out,
                                                stderr=subprocess.STDOUT)
            self._wait()
            self.model = str(folder)

    def _wait(self) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/v1/models", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit(f"{self.side} did not start")

    def first_token(self, messages: list[dict[str, str]]) -> tuple[float, str]:
        body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0}
        started = time.perf_counter()
        reply = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=7200).json()
        return time.perf_counter() - started, reply["choices"][0]["message"]["content"] or ""

    def stop(self) -> None:
        stop_server(self.process)


def restart_case(folder: Path, tmp: Path, history: list[dict[str, str]]) -> dict[str, float]:
    home = tmp / f"home-{len(history[0]['content'])}"
    first = Server("qwen-mlx", folder, home, tmp / "a.log")
    _, reply = first.first_token(history)
    first.stop()
    follow_up = [*history, {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    restarted = Server("qwen-mlx", folder, home, tmp / "b.log")
    hit, _ = restarted.first_token(follow_up)
    restarted.stop()
    cold = Server("qwen-mlx", folder, tmp / "cold", tmp / "c.log", "--cache-disk-gb", "0")
    recompute, _ = cold.first_token(follow_up)
    cold.stop()
    return {"cached": hit, "recomputed": recompute}


def shared_case(side: str, folder: Path, tmp: Path, system: str) -> dict[str, float]:
    conversations = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
                     for q in ("What is the first rule?", "Who keeps the keys?")]
    server = Server(side, folder, tmp / f"shared-{side}", tmp / f"{side}-shared.log")
    server.first_token(conversations[0])
    shared, _ = server.first_token(conversations[1])
    server.stop()
    server = Server(side, folder, tmp / f"alone-{side}", tmp / f"{side}-alone.log")
    alone, _ = server.first_token(conversations[1])
    server.stop()
    return {"cached": shared, "recomputed": alone}


def rotating_case(folder: Path, tmp: Path, prompt: str) -> dict[str, float]:
    messages = [{"role": "user", "content": prompt}]
    server = Server("qwen-mlx", folder, tmp / "rotating", tmp / "rotating.log", "--max-kv-size", "512")
    server.first_token(messages)
    checkpoint, _ = server.first_token(messages)  # a regenerate
    server.stop()
    server = Server("qwen-mlx", folder, tmp / "rotating-cold", tmp / "rotating-cold.log", "--max-kv-size", "512")
    rebuilt, _ = server.first_token(messages)
    server.stop()
    return {"cached": checkpoint, "recomputed": rebuilt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an MLX model folder (default: a random 4-bit one of --shape)")
    parser.add_argument("--shape", default="qwen2.5-0.5b", help="qwen2.5-0.5b (default), small, or a config.json")
    parser.add_argument("--histories", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--system", type=int, default=2048, help="tokens of the shared system prompt")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "prefix_cache.json")
    args = parser.parse_args()

    import mlx.core as mx

    from qwen_mlx.store.synthetic import random_shape, write_random_quantized_model
    from qwen_mlx.text.tokenizer import Tokenizer

    began = time.perf_counter()
    rows: list[tuple[str, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.model:
            folder = Path(args.model)
        else:
            shape = {**random_shape("qwen2.5-0.5b"), **SMALL} if args.shape == "small" else random_shape(args.shape)
            dtype = "float32" if mx.default_device().type == mx.DeviceType.cpu else "bfloat16"
            folder = write_random_quantized_model(tmp / f"random-{args.shape}", shape, 4, 64, dtype)
        tokenizer = Tokenizer.from_folder(folder)
        for n in args.histories:
            print(f"restart, {n} tokens of history ...", file=sys.stderr, flush=True)
            history = [{"role": "system", "content": text_of(n, tokenizer, n)}, {"role": "user", "content": "Go on."}]
            rows.append((f"follow-up after a restart, {n}-token history", "qwen-mlx", restart_case(folder, tmp,
                                                                                                   history)))
        system = text_of(args.system, tokenizer, 1)
        for side in ("qwen-mlx", *(() if args.skip_mlx_lm else ("mlx-lm",))):
            print(f"shared {args.system}-token system prompt, {side} ...", file=sys.stderr, flush=True)
            rows.append((f"second conversation, shared {args.system}-token system prompt", side,
                         shared_case(side, folder, tmp, system)))
        print("rotating cache regenerate ...", file=sys.stderr, flush=True)
        rows.append(("regenerate after a 512-position rotating cache wrapped", "qwen-mlx",
                     rotating_case(folder, tmp, text_of(700, tokenizer, 3))))
    lines = [f"{args.model or 'random ' + args.shape + ', 4-bit'}; {mx.default_device()}; "
             f"{(time.perf_counter() - began) / 60:.1f} min", "",
             "| case | server | from the cache (s) | recomputed (s) | speed-up |", "|---|---|---|---|---|"]
    for case, side, r in rows:
        lines.append(f"| {case} | {side} | {r['cached']:.2f} | {r['recomputed']:.2f} | "
                     f"{r['recomputed'] / r['cached']:.1f}x |")
    print("\n" + "\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "table": lines}, indent=2))


if __name__ == "__main__":
    main()
