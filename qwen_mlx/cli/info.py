"""`qwen-mlx info`: what a model takes before anything is loaded: parameters, quantization, weights, KV cache per
token for each cache choice, and the largest context that fits on this machine with each.

    qwen-mlx info mlx-community/Qwen2.5-7B-Instruct-4bit
    qwen-mlx info Qwen/Qwen2.5-7B-Instruct --q-bits 4      # as `convert -q` would write it

Only config.json and the safetensors headers are read: no weight, no download (a repo id must already be in the
Hugging Face cache). A folder with config.json alone is planned from its shapes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from qwen_mlx.blas import in_use
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import read_json
from qwen_mlx.model.cache import CacheSettings
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.store.memory import (
    CPU_WEIGHTS_LABELS,
    Budget,
    MemoryPlan,
    cache_choices,
    choose_cpu_weights,
    config_dtype,
    gb,
    memory_budget,
    plan_for_config,
    plan_for_folder,
)
from qwen_mlx.store.quantize import check_quantization

CARD_YARN_FACTOR = 4  # the Qwen2.5 model card: 131072 positions over 32768


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("info", help="parameters, weights, KV cache and the largest context that fits here",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="local model folder, or a Hugging Face repo id already in the local cache")
    parser.add_argument("--q-bits", type=int, help="plan the model quantized to these bits (2, 3, 4, 6 or 8)")
    parser.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default 64)")
    parser.add_argument("--context", type=int,
                        help="the context to plan up to (default: the model card's YaRN reach, 4x the original)")
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per forward pass (512)")
    parser.set_defaults(func=run)
    return parser


def cached_folder(name: str) -> Path:
    """A local folder, or the snapshot of a repo id in the Hugging Face cache (nothing is downloaded)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise QwenMLXError(f"{name}: not a model folder, nor a Hugging Face repo id like 'Qwen/Qwen2.5-7B-Instruct'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise QwenMLXError(f"{name}: not in the local Hugging Face cache; `hf download {name} --include "
                           f"'*.json'` fetches its config (or pass a folder)") from None


def make_plan(args: argparse.Namespace) -> tuple[MemoryPlan, str]:
    """The plan, and a line saying what it was planned from."""
    folder = cached_folder(args.model)
    raw = read_json(folder / "config.json")
    config = ModelConfig.from_dict(raw, str(folder / "config.json"))
    context = args.context or (config.max_position_embeddings * CARD_YARN_FACTOR if config.rope_scaling is None
                               else config.native_context_length)
    config = config.with_context(context)
    if args.q_bits is not None:
        check_quantization(args.q_bits, args.q_group_size)
        plan = plan_for_config(config, config_dtype(raw), bits=args.q_bits, group_size=args.q_group_size)
        return plan, f"from config.json's shapes, quantized to {args.q_bits} bits as `qwen-mlx convert -q` writes"
    plan = plan_for_folder(folder, config)
    has_weights = any(folder.glob("*.safetensors"))
    return plan, "from the safetensors headers" if has_weights else "from config.json's shapes (no weights here)"


def describe(plan: MemoryPlan, budget: Budget, chunk: int, sampling: SamplingParams) -> list[str]:
    c = plan.config
    held = []
    if plan.cpu and plan.quantization_bits:
        # On the CPU the weights may be held in float32 (`memory.choose_cpu_weights`): the contexts below count them.
        weights, why = choose_cpu_weights(plan, budget)
        held = [f"CPU weights     {CPU_WEIGHTS_LABELS[weights]} ({why})"]
        if weights == "float":
            plan = replace(plan, weights=plan.parameters * 4)
    switch, scaling = c.yarn_switch, c.dynamic_rope_scaling  # a switch only with YaRN on demand's scaling
    rope = (f"YaRN on demand past {switch} (factor {scaling['factor']:g})" if switch and scaling else
            "static YaRN (config.json's rope_scaling)" if c.rope_scaling else "plain RoPE")
    lines = [
        f"parameters      {plan.parameters / 1e9:.2f} B",
        f"quantization    {plan.quantization}",
        f"weights         {gb(plan.weights)}",
        f"context         {c.context_length} positions, {rope}",
        f"sampling        {sampling.describe()} (generation_config.json, as transformers applies it)",
        f"memory here     {gb(budget.nbytes)} ({budget.source})",
        # Float matmuls (attention, unquantized weights) run on it: the reference BLAS is 30-40x slower than OpenBLAS.
        f"BLAS            {in_use().describe()}",
        *held,
        "",
        f"{'KV cache':<22}{'bytes/token':>14}{'largest context that fits':>28}",
    ]
    for name, settings in cache_choices(c.context_length):
        per_token = plan.kv_bytes_per_token(settings)
        largest = plan.largest_context(budget.nbytes, settings, chunk)
        label = f"{name} ({plan.dtype})" if name == "default" else name
        fits = f"{largest}" + (" (all)" if largest == c.context_length else "") if largest else "none"
        lines.append(f"{label:<22}{kib(per_token):>14}{fits:>28}")
    return lines


def kib(n: float) -> str:
    return f"{n / 1024:.2f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def check_args(args: argparse.Namespace) -> None:
    if args.prefill_step_size < 1:
        raise QwenMLXError(f"--prefill-step-size must be at least 1, got {args.prefill_step_size}")
    CacheSettings()


def run(args: argparse.Namespace) -> int:
    check_args(args)
    plan, source = make_plan(args)
    print(f"{args.model} ({source})")
    sampling = SamplingParams.from_generation_config(cached_folder(args.model))
    for line in describe(plan, memory_budget(), args.prefill_step_size, sampling):
        print(line)
    print(f"(a rotating cache stops growing at its window; figures include one prefill chunk of "
          f"{args.prefill_step_size} tokens)", file=sys.stderr)
    return 0
