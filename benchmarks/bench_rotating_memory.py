"""Peak memory while generating N×W tokens: qwen-mlx's rotating KV cache (W positions) against its plain cache,
side by side with mlx-lm's RotatingKVCache on the same folder.

    python benchmarks/bench_rotating_memory.py                  # a small random Qwen2 built offline, W = 128
    python benchmarks/bench_rotating_memory.py --model Qwen/Qwen2.5-0.5B-Instruct --window 512 --multiples 1 2 4

The figures are what generating adds to memory: `mx.get_peak_memory()` after `mx.reset_peak_memory()`, less the
memory in use before (the weights of both models). With a rotating cache they stay flat however long generation
runs; with the plain cache they grow with it. Both models run in this one process, one generation at a time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from qwen_mlx.store.synthetic import TINY_QWEN2, write_random_model

# Small enough to decode a few thousand tokens in a minute on a CPU, with four full KV heads so that the cache, not
# the logits, is what grows. The vocabulary is cut to Qwen's first 4,096 ids (the prompt stays below it) so that
# decoding is not all output projection.
SMALL_QWEN2: dict[str, Any] = {
    **TINY_QWEN2,
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
}


def build_random_model(folder: Path) -> Path:
    """A random-weight Qwen2 (float16) with Qwen2.5's real tokenizer, written by qwen-mlx itself, offline."""
    print("Building a small random Qwen2 ...", file=sys.stderr)
    return write_random_model(folder, SMALL_QWEN2)


def added_peak(generate: Any) -> tuple[int, int]:
    """Peak memory `generate()` adds to what was in use before, and the size of the cache it returns."""
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    cache_bytes = generate()
    return mx.get_peak_memory() - before, cache_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or repo id (default: a small random Qwen2)")
    parser.add_argument("--window", "-W", type=int, default=128, help="the rotating cache's size W (default 128)")
    parser.add_argument("--keep", type=int, default=4, help="positions never evicted (default 4)")
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 5, 10],
                        help="generate N×W tokens for each N (default 1 2 5 10)")
    args = parser.parse_args()

    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import RotatingKVCache as MlxLmRotatingKVCache

    import qwen_mlx
    from qwen_mlx.model.cache import CacheSettings, PromptCache

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else build_random_model(Path(tmp))
        model, tokenizer = qwen_mlx.load(folder)
        their_model, _ = mlx_lm.load(str(folder))
    tokenizer.eos_token_ids = []  # every run generates exactly its N×W tokens
    prompt = [(i * 7919) % 4000 for i in range(16)]

    def ours(n: int, max_kv_size: int | None) -> int:
        prompt_cache = PromptCache.new(model, CacheSettings(max_kv_size, args.keep))
        for _ in qwen_mlx.stream_generate(model, tokenizer, prompt, max_tokens=n, temperature=0,
                                          prompt_cache=prompt_cache):
            pass
        return prompt_cache.nbytes

    def theirs(n: int) -> int:
        cache = [MlxLmRotatingKVCache(args.window, keep=args.keep) for _ in their_model.layers]
        for _ in generate_step(mx.array(prompt), their_model, max_tokens=n, prompt_cache=cache,
                               sampler=lambda logprobs: mx.argmax(logprobs, axis=-1)):
            pass
        return sum(c.nbytes for c in cache)

    ours(args.window, args.window)  # warm-up
    W = args.window
    print(f"\nMemory added by generating N×W tokens after a {len(prompt)}-token prompt, W = {W}, keep = {args.keep} "
          f"(MB; weights excluded)\n")
    print(f"| {'N×W tokens':>12} | {'ours, rotating':>14} | {'ours, plain':>11} | {'mlx-lm, rotating':>16} | "
          f"{'ours/mlx-lm':>11} | {'rotating cache, ours / mlx-lm':>29} |")
    print(f"|{'-' * 14}|{'-' * 16}|{'-' * 13}|{'-' * 18}|{'-' * 13}|{'-' * 31}|")
    for multiple in args.multiples:
        n = multiple * W
        rotating, rotating_bytes = added_peak(lambda n=n: ours(n, W))
        plain, _ = added_peak(lambda n=n: ours(n, None))
        mlx_lm_rotating, mlx_lm_bytes = added_peak(lambda n=n: theirs(n))
        cache_mb = f"{rotating_bytes / 1e6:.2f} / {mlx_lm_bytes / 1e6:.2f}"
        print(f"| {f'{multiple}×W = {n}':>12} | {rotating / 1e6:14.2f} | {plain / 1e6:11.2f} | "
              f"{mlx_lm_rotating / 1e6:16.2f} | {rotating / mlx_lm_rotating:11.2f} | {cache_mb:>29} |", flush=True)


if __name__ == "__main__":
    main()
