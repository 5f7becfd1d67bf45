"""qwen-mlx against llama.cpp on the CPU, side by side on one GGUF file (issue 28).

    python benchmarks/bench_cpu.py --gguf ~/.cache/qwen-mlx-tests/qwen2.5-coder-0.5b-instruct.gguf \
        --llama-bench /path/to/llama-bench [-p 128 512 2048] [-g 32] [-t 2]

The GGUF is imported once (`qwen_mlx.convert`, the file's own quantization). Then, alternating, each prompt length
runs as `qwen-mlx bench --model FOLDER -p N -g G -n 1` and as `llama-bench -m GGUF -p N -n G -t T -o json`, each in
a process of its own, and the table gives prefill and decode tokens/s of both, their ratio, and qwen-mlx's peak
memory. llama-bench builds from the `llama-cpp-python` sdist, which vendors llama.cpp (cmake, the targets
llama-bench only); qwen-mlx runs with the CPU weights it chooses itself (QWEN_MLX_CPU_WEIGHTS=auto unless set).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TRIAL = re.compile(r"prompt_tps=([\d.]+), generation_tps=([\d.]+), time_to_first_token=[\d.]+, peak_memory=([\d.]+)")


def qwen_mlx_run(folder: Path, prompt: int, generate: int) -> tuple[float, float, float]:
    """(prefill tokens/s, decode tokens/s, peak GB) of one `qwen-mlx bench` trial in its own process."""
    out = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "bench", "--model", str(folder), "-p", str(prompt),
                          "-g", str(generate), "-n", "1"], capture_output=True, text=True, check=True)
    found = TRIAL.findall(out.stdout)
    if not found:
        raise SystemExit(f"qwen-mlx bench printed no trial:\n{out.stdout}\n{out.stderr}")
    prefill, decode, peak = found[-1]
    return float(prefill), float(decode), float(peak)


def llama_cpp_run(llama_bench: str, gguf: Path, prompt: int, generate: int, threads: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) from llama-bench's JSON: one test for the prompt, one for generation."""
    out = subprocess.run([llama_bench, "-m", str(gguf), "-p", str(prompt), "-n", str(generate), "-t", str(threads),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    tests = json.loads(out.stdout)
    prefill = next(t["avg_ts"] for t in tests if t["n_prompt"] == prompt and t["n_gen"] == 0)
    decode = next(t["avg_ts"] for t in tests if t["n_gen"] == generate and t["n_prompt"] == 0)
    return float(prefill), float(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--llama-bench", required=True, help="llama.cpp's llama-bench binary")
    parser.add_argument("-p", "--prompt-tokens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("-g", "--generation-tokens", type=int, default=32)
    parser.add_argument("-t", "--threads", type=int, default=2)
    args = parser.parse_args()

    import qwen_mlx

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        print(qwen_mlx.convert(args.gguf, folder), file=sys.stderr)
        rows = []
        for prompt in args.prompt_tokens:
            ours = qwen_mlx_run(folder, prompt, args.generation_tokens)
            theirs = llama_cpp_run(args.llama_bench, args.gguf, prompt, args.generation_tokens, args.threads)
            rows.append((prompt, ours, theirs))
            print(f"p={prompt}: qwen-mlx {ours}, llama.cpp {theirs}", file=sys.stderr, flush=True)
    print("| prompt | prefill tok/s qwen-mlx / llama.cpp | ratio | decode tok/s qwen-mlx / llama.cpp | ratio | "
          "qwen-mlx peak GB |\n|---|---|---|---|---|---|")
    for prompt, (prefill, decode, peak), (their_prefill, their_decode) in rows:
        print(f"| {prompt} | {prefill:.1f} / {their_prefill:.1f} | {prefill / their_prefill:.2f} | {decode:.2f} / "
              f"{their_decode:.2f} | {decode / their_decode:.2f} | {peak:.3f} |")


if __name__ == "__main__":
    main()
