"""Long-context speed and memory: prefill and decode tokens/s at 1K, 4K and 16K tokens of context, qwen-mlx beside
mlx-lm on the same random model, and for qwen-mlx the peak memory of each cache kind beside the memory plan's
estimate (`qwen_mlx.store.memory`).

    python benchmarks/bench_long_context.py            # the narrow shape below: minutes on a 2-core Linux machine
    python benchmarks/bench_long_context.py --shape qwen2.5-0.5b --contexts 1024,4096   # a real shape

The default shape is narrow so that a 16K prefill runs here (MLX's CPU build) in minutes: 4 layers, hidden 256,
4 query heads over 2 KV heads of 64, intermediate 1024, Qwen2.5's vocabulary of 151,936, weights at 4 bits with
float32 scales on the CPU (there mlx-lm computes in the scales' dtype, and its half-precision quantized matmuls are
8-40x slower: float32 keeps the comparison about the long context), bfloat16 on a Mac. Peak memory of each cache
kind is measured at --memory-context (4096). Each measurement runs in its own process (a clean
`mx.get_peak_memory()`, nothing shared between the two sides). Greedy decoding; prefill tokens/s is the prompt
over the time to the first token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NARROW = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256,
          "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
CACHES = {"default": {}, "kv8": {"kv_bits": 8}, "kv4": {"kv_bits": 4}, "rotating-1024": {"max_kv_size": 1024}}
DECODE_TOKENS = 32


def prompt_ids(length: int) -> list[int]:
    import numpy as np

    return np.random.RandomState(length).randint(0, 150000, length).tolist()


def ours(folder: str, context: int, cache: str) -> dict[str, Any]:
    import mlx.core as mx

    import qwen_mlx
    from qwen_mlx.model.cache import CacheSettings
    from qwen_mlx.store.memory import plan_for_model

    model, tokenizer = qwen_mlx.load(folder)
    tokenizer.eos_token_ids = []  # every run decodes DECODE_TOKENS
    options = CACHES[cache]
    qwen_mlx.generate(model, tokenizer, prompt_ids(16), max_tokens=2, temperature=0, **options)  # warm up
    stats = qwen_mlx.generate(model, tokenizer, prompt_ids(context - DECODE_TOKENS), max_tokens=DECODE_TOKENS,
                              temperature=0, repetition_penalty=1.0, **options).stats
    estimate = plan_for_model(model).total(context, CacheSettings(**options))
    return {"prefill_tps": stats.prompt_tps, "decode_tps": stats.generation_tps, "peak": mx.get_peak_memory(),
            "estimate": estimate}


def theirs(folder: str, context: int, cache: str) -> dict[str, Any]:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(folder)
    sampler = make_sampler(temp=0.0)
    for _ in mlx_lm.stream_generate(model, tokenizer, prompt_ids(16), max_tokens=2, sampler=sampler):
        pass
    responses = mlx_lm.stream_generate(model, tokenizer, prompt_ids(context - DECODE_TOKENS),
                                       max_tokens=DECODE_TOKENS, sampler=sampler, **CACHES[cache])
    last = list(responses)[-1]
    return {"prefill_tps": last.prompt_tps, "decode_tps": last.generation_tps, "peak": last.peak_memory * 1e9}


def measure(side: str, folder: Path, context: int, cache: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--worker", side, str(folder), str(context), cache],
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(folder: Path, shape: str, dtype: str) -> Path:
    from qwen_mlx.store.synthetic import random_shape, write_random_quantized_model

    config = NARROW if shape == "narrow" else random_shape(shape)
    return write_random_quantized_model(folder, config, 4, 64, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="narrow", help="narrow (default), or a qwen_mlx.store.synthetic shape")
    parser.add_argument("--contexts", default="1024,4096,16384")
    parser.add_argument("--memory-context", type=int, default=4096, help="context of the peak-memory table")
    parser.add_argument("--dtype", help="scales' dtype (default: float32 on the CPU, bfloat16 on Metal)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, folder, context, cache = args.worker
        print(json.dumps((ours if side == "qwen-mlx" else theirs)(folder, int(context), cache)))
        return
    import mlx.core as mx
    import mlx_lm

    started = time.perf_counter()
    contexts = [int(c) for c in args.contexts.split(",")]
    dtype = args.dtype or ("float32" if mx.default_device().type == mx.DeviceType.cpu else "bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / "model", args.shape, dtype)
        print(f"shape {args.shape} at 4 bits ({dtype} scales); mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
              f"{mx.default_device()}")
        print("| context | qwen-mlx prefill tok/s | mlx-lm prefill tok/s | qwen-mlx decode tok/s | "
              "mlx-lm decode tok/s |\n|---|---|---|---|---|")
        for context in contexts:
            a, b = measure("qwen-mlx", folder, context, "default"), measure("mlx-lm", folder, context, "default")
            print(f"| {context} | {a['prefill_tps']:.0f} | {b['prefill_tps']:.0f} | {a['decode_tps']:.1f} | "
                  f"{b['decode_tps']:.1f} |", flush=True)
        print("\n| context | cache | qwen-mlx peak MB | plan's estimate MB | mlx-lm peak MB |\n|---|---|---|---|---|")
        for context in [args.memory_context]:
            for cache in CACHES:
                a, b = measure("qwen-mlx", folder, context, cache), measure("mlx-lm", folder, context, cache)
                print(f"| {context} | {cache} | {a['peak'] / 1e6:.0f} | {a['estimate'] / 1e6:.0f} "
                      f"({a['estimate'] / a['peak'] - 1:+.0%}) | {b['peak'] / 1e6:.0f} |", flush=True)
    print(f"\n{(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
