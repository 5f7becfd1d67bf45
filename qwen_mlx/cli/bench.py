"""`qwen-mlx bench`: prompt and generation speed, time to first token and peak memory, as mlx_lm.benchmark reports
them, on a model folder or on a random-weight model of a real Qwen2.5 shape built offline.

    qwen-mlx bench --model mlx-community/Qwen2.5-7B-Instruct-4bit -p 512 -g 128
    qwen-mlx bench --random qwen2.5-0.5b --q-bits 4 -p 128 -g 32 -n 1

The figures mean what mlx_lm.benchmark's do: prompt_tps is prompt tokens over the time to the first generated
token, generation_tps is generated tokens per second after it, peak_memory is MLX's peak (GB) while generating,
the resident weights included. Greedy decoding, end-of-sequence ignored, so every trial generates exactly -g tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from qwen_mlx.blas import in_use
from qwen_mlx.cli.flags import add_context_argument
from qwen_mlx.engine.benchmark import average, bench, format_trial
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import CacheSettings
from qwen_mlx.store.load import DEFAULT_MODEL, load
from qwen_mlx.store.quantize import check_quantization
from qwen_mlx.store.synthetic import DTYPES, SHAPES, random_shape, write_random_quantized_model


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="measure prompt and generation speed and peak memory (as mlx_lm.benchmark)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", "-m", help=f"local model folder or Hugging Face repo id (default: {DEFAULT_MODEL})")
    source.add_argument(
        "--random", metavar="SHAPE",
        help=f"build a random-weight model offline: {', '.join(SHAPES)}, or a config.json path for another shape",
    )
    parser.add_argument("--prompt-tokens", "-p", type=int, default=512, help="prompt length (default 512)")
    parser.add_argument("--generation-tokens", "-g", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--num-trials", "-n", type=int, default=3, help="timed trials, averaged (default 3)")
    parser.add_argument("--max-kv-size", type=int, help="a rotating KV cache of this many positions")
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per forward pass (512)")
    add_context_argument(parser)
    group = parser.add_argument_group("random model (--random)")
    group.add_argument("--q-bits", type=int, default=4, help="bits per weight: 2, 3, 4, 6 or 8 (default 4)")
    group.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default 64)")
    group.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                       help="dtype of the scales and norms (default bfloat16, as Qwen2.5 is released)")
    parser.set_defaults(func=run)
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--prompt-tokens/-p", args.prompt_tokens), ("--generation-tokens/-g", args.generation_tokens),
                        ("--num-trials/-n", args.num_trials), ("--prefill-step-size", args.prefill_step_size)):
        if value < 1:
            raise QwenMLXError(f"{flag} must be at least 1, got {value}")
    CacheSettings(max_kv_size=args.max_kv_size)
    if args.random is not None:
        check_quantization(args.q_bits, args.q_group_size)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    with tempfile.TemporaryDirectory(prefix="qwen-mlx-bench-") as tmp:
        if args.random is not None:
            config = random_shape(args.random)
            print(f"Building a random {args.random} at {args.q_bits} bits (group {args.q_group_size}, {args.dtype}) "
                  f"...", file=sys.stderr, flush=True)
            folder: str | Path = write_random_quantized_model(Path(tmp) / "model", config, args.q_bits,
                                                              args.q_group_size, args.dtype)
        else:
            folder = args.model or DEFAULT_MODEL
        # On stderr with the progress, so stdout stays mlx_lm.benchmark's lines; the BLAS decides float matmul speed.
        print(f"BLAS: {in_use().describe()}", file=sys.stderr, flush=True)
        print(f"Loading {folder} ...", file=sys.stderr, flush=True)
        model, tokenizer = load(folder, context_length=args.context)
        if model.cpu_weights:
            print(f"CPU weights: {model.cpu_weights}", file=sys.stderr, flush=True)
        trials = bench(model, tokenizer, args.prompt_tokens, args.generation_tokens, args.num_trials,
                       max_kv_size=args.max_kv_size, prefill_step_size=args.prefill_step_size)
    print("Averages: " + format_trial(average(trials)))
    return 0


