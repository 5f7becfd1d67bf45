"""Prefill and decode speed and peak memory: qwen-mlx against mlx-lm, side by side on the same 4-bit folder.

    python benchmarks/bench_generate.py                       # a random Qwen2.5-0.5B-shaped 4-bit model, built offline
    python benchmarks/bench_generate.py --model mlx-community/Qwen2.5-7B-Instruct-4bit --prompt-tokens 512

Each side runs in its own fresh process (so one side's arrays never count in the other's peak memory), the two
alternating for `--repeats` rounds; the table reports medians and the ratio qwen-mlx / mlx-lm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import qwen_mlx
from qwen_mlx.demo import DEMO_CONFIG, write_random_model

# Qwen2.5-0.5B's shapes (its config.json), the smallest real Qwen2.5.
QWEN25_05B = {
    **DEMO_CONFIG,
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}

RUN_OURS = """
import json, sys, mlx.core as mx, qwen_mlx
folder, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model, tokenizer = qwen_mlx.load(folder)
tokenizer.eos_token_ids = []  # both sides generate exactly n tokens
for chunk in qwen_mlx.stream_generate(model, tokenizer, ids, max_tokens=n, temperature=0):
    if chunk.stats:
        s = chunk.stats
print(json.dumps({"prompt_tps": s.prompt_tps, "generation_tps": s.generation_tps, "tokens": s.generation_tokens,
                  "peak_gb": mx.get_peak_memory() / 1e9}))
"""

RUN_MLX_LM = """
import json, sys, mlx.core as mx, mlx_lm
folder, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model, tokenizer = mlx_lm.load(folder)
tokenizer._eos_token_ids = set()  # both sides generate exactly n tokens
for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=n):
    pass
print(json.dumps({"prompt_tps": r.prompt_tps, "generation_tps": r.generation_tps, "tokens": r.generation_tokens,
                  "peak_gb": mx.get_peak_memory() / 1e9}))
"""


def build_random_model(workdir: Path) -> Path:
    source = workdir / "float16"
    source.mkdir()
    print("Building a random Qwen2.5-0.5B-shaped model and converting it to 4 bits ...", file=sys.stderr)
    write_random_model(source, QWEN25_05B)
    qwen_mlx.convert(source, workdir / "4bit", quantize=True)
    return workdir / "4bit"


def run(script: str, folder: Path, ids: list[int], n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", script, str(folder), json.dumps(ids), str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a 4-bit MLX folder or repo id (default: a random 0.5B-shaped one)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--generation-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else build_random_model(Path(tmp))
        ids = [(i * 7919) % 150000 for i in range(args.prompt_tokens)]
        results: dict[str, list[dict[str, float]]] = {"qwen-mlx": [], "mlx-lm": []}
        for r in range(args.repeats):
            for name, script in (("qwen-mlx", RUN_OURS), ("mlx-lm", RUN_MLX_LM)):
                results[name].append(run(script, folder, ids, args.generation_tokens))
                print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr)

    def median(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    print(f"\n{args.prompt_tokens}-token prompt, {args.generation_tokens} generated tokens, "
          f"median of {args.repeats} runs each\n")
    print(f"| {'':22} | {'qwen-mlx':>9} | {'mlx-lm':>9} | {'ratio':>6} |")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 11}|{'-' * 8}|")
    for key, label in (("prompt_tps", "prefill tokens/s"), ("generation_tps", "decode tokens/s"),
                       ("peak_gb", "peak memory (GB)")):
        ours, theirs = median("qwen-mlx", key), median("mlx-lm", key)
        print(f"| {label:22} | {ours:9.2f} | {theirs:9.2f} | {ours / theirs:6.2f} |")


if __name__ == "__main__":
    main()
