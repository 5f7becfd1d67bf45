"""`qwen-mlx convert`: the command over `qwen_mlx.store.conversion`, with mlx_lm.convert's flags."""

from __future__ import annotations

import argparse
from typing import Any

from qwen_mlx.store.conversion import DTYPES, convert, convert_gguf, parse_q_keep


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face or GGUF Qwen2 model to MLX, optionally quantized",
        description="Convert a Hugging Face Qwen2 / Qwen2.5 model (safetensors) or a GGUF file into an MLX model "
        "folder that qwen-mlx and mlx-lm both load, e.g. `qwen-mlx convert --hf-path Qwen/Qwen2.5-7B-Instruct -q` "
        "or `qwen-mlx convert --gguf ollama:qwen2.5:7b -o qwen2.5-7b`.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-path", "--model", help="local model folder or Hugging Face repo id")
    source.add_argument(
        "--gguf", metavar="PATH", help="a GGUF file, or ollama:NAME[:TAG] for a model Ollama has pulled"
    )
    parser.add_argument("--mlx-path", "-o", default="mlx_model", help="the folder to write (default: mlx_model)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument("--q-bits", type=int, default=4, help="bits per weight: 2, 3, 4, 6 or 8 (default 4)")
    parser.add_argument(
        "--q-group-size", type=int, default=64, help="quantization group size: 32, 64 or 128 (default 64)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES,
        help="type of the unquantized tensors (default: as stored in the source); a GGUF is dequantized to it"
    )
    parser.add_argument(
        "-d", "--dequantize", action="store_true", help="turn an MLX-quantized model or a GGUF back into full precision"
    )
    parser.add_argument(
        "--q-keep", action="append", default=[], metavar="NAMES[=BITS]",
        help="quantize these layers with more bits (default 8), e.g. embed_tokens,lm_head=8 (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --mlx-path")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    summary = (convert_gguf if args.gguf else convert)(
        args.gguf or args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        dtype=args.dtype,
        dequantize=args.dequantize,
        q_keep=parse_q_keep(args.q_keep),
        force=args.force,
    )
    print(summary)
    return 0
