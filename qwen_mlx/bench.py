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
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.quantize import check_quantization

# The official Qwen2.5 config.json shapes (Qwen/Qwen2.5-{0.5B,1.5B,3B,7B}-Instruct), bfloat16 as released.
_QWEN25 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "bfloat16",
}
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {**_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-1.5b": {**_QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-3b": {**_QWEN25, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False},
}
DTYPES = ("bfloat16", "float16", "float32")


def random_shape(name: str) -> dict[str, Any]:
    """The config of a named Qwen2.5 shape ("qwen2.5-0.5b" or "0.5b"), or of any Qwen2 from a config.json path."""
    key = name.lower()
    if key in SHAPES or f"qwen2.5-{key}" in SHAPES:
        return dict(SHAPES.get(key) or SHAPES[f"qwen2.5-{key}"])
    path = Path(name).expanduser()
    if path.suffix == ".json":
        from qwen_mlx.config import ModelConfig, read_json

        config = read_json(path)
        ModelConfig.from_dict(config, str(path))  # the same checks a model folder gets
        return {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    raise QwenMLXError(f"--random {name}: unknown shape; choose one of {', '.join(SHAPES)} or give a config.json")


def write_random_quantized_model(
    folder: Path, config: dict[str, Any], bits: int = 4, group_size: int = 64, dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """A model folder that loads in qwen-mlx and mlx-lm: `config`'s shape, quantized weights drawn at random, and
    Qwen2.5's real tokenizer. Nothing is downloaded.

    The weights are drawn directly in quantized form (random codes, one scale and bias per matrix) and written
    shard by shard, so memory holds at most one 5 GB shard, never a float model: Qwen2.5-7B at 4 bits takes
    about 4.3 GB of disk and a minute or two.
    """
    from qwen_mlx.config import ModelConfig
    from qwen_mlx.converter.convert import write_weights
    from qwen_mlx.qwen_tokenizer_files import write_qwen_tokenizer

    check_quantization(bits, group_size)
    if dtype not in DTYPES:
        raise QwenMLXError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    shape = ModelConfig.from_dict(config)
    if shape.hidden_size % group_size or shape.intermediate_size % group_size:
        raise QwenMLXError(
            f"hidden_size {shape.hidden_size} and intermediate_size {shape.intermediate_size} must be multiples of "
            f"the group size {group_size}"
        )
    float_type = getattr(mx, dtype)
    key = mx.random.key(seed)

    def next_key() -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return sub

    def quantized(name: str, rows: int, cols: int) -> dict[str, mx.array]:
        # Uniform codes between -a and a with a = sqrt(3 / cols): unit-variance outputs for unit-variance inputs,
        # so the activations of a deep random model neither vanish nor overflow float16.
        a = math.sqrt(3 / cols)
        scale = 2 * a / (2**bits - 1)
        words = (rows, cols * bits // 32)
        high = mx.random.randint(0, 1 << 16, words, dtype=mx.uint32, key=next_key())
        low = mx.random.randint(0, 1 << 16, words, dtype=mx.uint32, key=next_key())
        groups = (rows, cols // group_size)
        return {
            f"{name}.weight": (high << 16) | low,  # randint draws 16 uniform bits at most
            f"{name}.scales": mx.full(groups, scale, dtype=float_type),
            f"{name}.biases": mx.full(groups, -a, dtype=float_type),
        }

    h, n_kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    weights: dict[str, mx.array] = quantized("model.embed_tokens", shape.vocab_size, h)
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        for proj, rows in (("q_proj", h), ("k_proj", n_kv), ("v_proj", n_kv)):
            weights.update(quantized(f"{p}.self_attn.{proj}", rows, h))
            weights[f"{p}.self_attn.{proj}.bias"] = mx.zeros((rows,), dtype=float_type)
        weights.update(quantized(f"{p}.self_attn.o_proj", h, h))
        weights.update(quantized(f"{p}.mlp.gate_proj", shape.intermediate_size, h))
        weights.update(quantized(f"{p}.mlp.up_proj", shape.intermediate_size, h))
        weights.update(quantized(f"{p}.mlp.down_proj", h, shape.intermediate_size))
        weights[f"{p}.input_layernorm.weight"] = mx.ones((h,), dtype=float_type)
        weights[f"{p}.post_attention_layernorm.weight"] = mx.ones((h,), dtype=float_type)
    weights["model.norm.weight"] = mx.ones((h,), dtype=float_type)
    if not shape.tie_word_embeddings:
        weights.update(quantized("lm_head", shape.vocab_size, h))

    folder.mkdir(parents=True, exist_ok=True)
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    full_config = {**config, "torch_dtype": dtype, "quantization": quantization, "quantization_config": quantization}
    (folder / "config.json").write_text(json.dumps(full_config, indent=2, sort_keys=True) + "\n")
    parameters = sum(v.size * (32 // bits if v.dtype == mx.uint32 else 1) for k, v in weights.items()
                     if not k.endswith((".scales", ".biases")))
    write_weights(folder, weights, parameters, desc="Drawing random weights")
    write_qwen_tokenizer(folder)
    return folder


@dataclass
class Trial:
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    time_to_first_token: float  # seconds
    peak_memory: float  # GB
    total_time: float  # seconds


def run_trial(model: Any, tokenizer: Any, prompt: list[int], generation_tokens: int, **kwargs: Any) -> Trial:
    """One greedy generation of exactly `generation_tokens` tokens after `prompt`, timed."""
    from qwen_mlx.generate import stream_generate

    eos, tokenizer.eos_token_ids = tokenizer.eos_token_ids, []  # every trial runs to its full length
    try:
        start = time.perf_counter()
        for chunk in stream_generate(model, tokenizer, prompt, max_tokens=generation_tokens, temperature=0,
                                     repetition_penalty=1.0, **kwargs):
            stats = chunk.stats
        total = time.perf_counter() - start
    finally:
        tokenizer.eos_token_ids = eos
    return Trial(stats.prompt_tokens, stats.generation_tokens, stats.prompt_tps, stats.generation_tps,
                 stats.time_to_first_token, stats.peak_memory_gb, total)


def random_prompt(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Token ids drawn uniformly from the vocabulary, as mlx_lm.benchmark draws its prompt."""
    return mx.random.randint(0, vocab_size, (length,), key=mx.random.key(seed)).tolist()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The `bench` subcommand, with mlx_lm.benchmark's flags."""
    from qwen_mlx.load import DEFAULT_MODEL

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
    if args.max_kv_size is not None and args.max_kv_size <= 4:
        raise QwenMLXError(f"--max-kv-size must be larger than 4 (the positions always kept), got {args.max_kv_size}")
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
            from qwen_mlx.load import DEFAULT_MODEL

            folder = args.model or DEFAULT_MODEL
        from qwen_mlx.load import load

        print(f"Loading {folder} ...", file=sys.stderr, flush=True)
        model, tokenizer = load(folder)
        trials = bench(model, tokenizer, args)
    print("Averages: " + format_trial(average(trials)))
    return 0


def bench(model: Any, tokenizer: Any, args: argparse.Namespace) -> list[Trial]:
    """Warm up, then run and print `args.num_trials` trials."""
    context = model.config.context_length
    if args.prompt_tokens + args.generation_tokens >= context:
        raise QwenMLXError(
            f"-p {args.prompt_tokens} + -g {args.generation_tokens} tokens do not fit the model's context ({context})"
        )
    kwargs = {"max_kv_size": args.max_kv_size, "prefill_step_size": args.prefill_step_size}
    prompt = random_prompt(args.prompt_tokens, model.config.vocab_size)
    # A short run compiles and allocates what the timed ones need; a full-length one would double a CPU benchmark.
    print("Running warmup..", file=sys.stderr, flush=True)
    run_trial(model, tokenizer, prompt[:16], 2, **kwargs)
    print(f"Timing with prompt_tokens={args.prompt_tokens}, generation_tokens={args.generation_tokens}, "
          f"batch_size=1.", file=sys.stderr, flush=True)
    trials = []
    for i in range(args.num_trials):
        trial = run_trial(model, tokenizer, prompt, args.generation_tokens, **kwargs)
        if trial.generation_tokens != args.generation_tokens:
            raise AssertionError(f"trial {i + 1} generated {trial.generation_tokens} tokens")
        trials.append(trial)
        print(f"Trial {i + 1}:  {format_trial(trial)}, total_time={trial.total_time:.3f}", flush=True)
    return trials


def average(trials: list[Trial]) -> Trial:
    fields = asdict(trials[0])
    return Trial(**{k: sum(getattr(t, k) for t in trials) / len(trials) for k in fields})


def format_trial(trial: Trial) -> str:
    return (f"prompt_tps={trial.prompt_tps:.3f}, generation_tps={trial.generation_tps:.3f}, "
            f"time_to_first_token={trial.time_to_first_token:.3f}, peak_memory={trial.peak_memory:.3f}")
