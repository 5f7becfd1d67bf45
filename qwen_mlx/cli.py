"""`qwen-mlx`: the command-line front door. User mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.load import DEFAULT_MODEL


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", default=DEFAULT_MODEL,
        help=f"local model folder or Hugging Face repo id (default: {DEFAULT_MODEL})",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the model's generation_config.json)")
    group.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate (default 512, up to 8192)")
    group.add_argument("--temp", "--temperature", dest="temperature", type=float, help="0 for greedy")
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--min-p", type=float)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--seed", type=int, help="makes sampling reproducible")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable); never printed")
    add_cache_arguments(group)


def add_cache_arguments(parser: Any) -> None:
    parser.add_argument(
        "--max-kv-size", type=int,
        help="keep at most this many positions in the KV cache (rotating, first 4 kept): bounded memory",
    )
    parser.add_argument("--kv-bits", type=int, choices=(4, 8),
                        help="store the KV cache at 4 or 8 bits: long contexts in less memory")


def check_cache_arguments(args: argparse.Namespace) -> None:
    """Refuse a cache setting that cannot work before a model load that may take minutes."""
    if args.max_kv_size is not None and args.max_kv_size <= 4:
        raise QwenMLXError(f"--max-kv-size {args.max_kv_size} must be larger than 4 (the kept first positions)")
    if args.max_kv_size is not None and args.kv_bits is not None:
        raise QwenMLXError("choose either --max-kv-size (a rotating cache) or --kv-bits (a quantized one), not both")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }


def print_stats(stats: Any) -> None:
    reused = stats.prompt_tokens - stats.prefilled_tokens
    print(
        f"prompt: {stats.prompt_tokens} tokens ({reused} reused from cache), {stats.prompt_tps:.1f} tokens/s | "
        f"generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens/s | "
        f"first token: {stats.time_to_first_token:.2f} s | peak memory: {stats.peak_memory_gb:.2f} GB | "
        f"context: {stats.context_tokens}/{stats.context_size}",
        file=sys.stderr,
    )


def load_with_status(model: str) -> tuple[Any, Any]:
    from qwen_mlx.load import load

    print(f"Loading {model} ...", file=sys.stderr, flush=True)
    return load(model)


def read_prompt_cache(path: str, model: Any) -> tuple[Any, list[dict[str, Any]]]:
    """A saved prompt cache and the messages behind it, checked against the model it will run with."""
    from qwen_mlx.cache import load_prompt_cache

    prompt_cache, meta = load_prompt_cache(path)
    if meta.get("model_shape") != model_shape(model):
        raise QwenMLXError(f"{path}: this prompt cache was made with another model ({meta.get('model')})")
    return prompt_cache, json.loads(meta.get("messages", "[]"))


def model_shape(model: Any) -> str:
    c = model.config
    return f"{c.num_hidden_layers}x{c.num_key_value_heads}x{c.head_dim}/{c.vocab_size}"


def stream_reply(model: Any, tokenizer: Any, messages: list[dict[str, Any]], args: argparse.Namespace,
                 prompt_cache: Any) -> tuple[str, Any]:
    """Print a reply as it streams; return its text and stats."""
    from qwen_mlx.generate import stream_generate

    parts = []
    stats = None
    for chunk in stream_generate(model, tokenizer, messages, prompt_cache=prompt_cache, **sampling_kwargs(args)):
        print(chunk.text, end="", flush=True)
        parts.append(chunk.text)
        if chunk.stats is not None:
            stats = chunk.stats
    print(flush=True)
    return "".join(parts), stats


def start_messages(args: argparse.Namespace, model: Any) -> tuple[Any, list[dict[str, Any]]]:
    from qwen_mlx.cache import PromptCache

    if args.prompt_cache:
        prompt_cache, messages = read_prompt_cache(args.prompt_cache, model)
    else:
        prompt_cache, messages = PromptCache.new(model, args.max_kv_size, kv_bits=args.kv_bits), []
    if args.system:
        messages = [m for m in messages if m["role"] != "system"]
        messages.insert(0, {"role": "system", "content": args.system})
    return prompt_cache, messages


def cmd_generate(args: argparse.Namespace) -> int:
    check_cache_arguments(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_with_status(args.model)
    prompt_cache, messages = start_messages(args, model)
    messages.append({"role": "user", "content": prompt})
    _, stats = stream_reply(model, tokenizer, messages, args, prompt_cache)
    print_stats(stats)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    check_cache_arguments(args)
    model, tokenizer = load_with_status(args.model)
    prompt_cache, start = start_messages(args, model)
    messages = list(start)
    print("Chat with the model. /clear starts over, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/clear":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply, stats = stream_reply(model, tokenizer, messages, args, prompt_cache)
        except KeyboardInterrupt:
            # Ctrl-C stops this reply, not the chat; the half reply is dropped from the conversation.
            print("\n[stopped]", file=sys.stderr)
            messages.pop()
            continue
        except QwenMLXError as e:  # e.g. the conversation outgrew the context: say so and keep chatting
            print(f"qwen-mlx: error: {e} (try /clear)", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
        if args.verbose:
            print_stats(stats)


def cmd_cache_prompt(args: argparse.Namespace) -> int:
    check_cache_arguments(args)
    from qwen_mlx.cache import PromptCache, save_prompt_cache
    from qwen_mlx.generate import prefill

    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_with_status(args.model)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    prompt_cache = PromptCache.new(model, args.max_kv_size, kv_bits=args.kv_bits)
    prefill(model, ids, prompt_cache, step_size=512)
    meta = {"model": args.model, "model_shape": model_shape(model), "messages": json.dumps(messages)}
    save_prompt_cache(args.output, prompt_cache, meta)
    print(f"Saved {len(ids)} tokens of prompt cache to {args.output} ({prompt_cache.nbytes / 1e6:.1f} MB)",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-mlx", description="Qwen2 / Qwen2.5 on Apple MLX")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one reply to a prompt")
    add_model_argument(gen)
    gen.add_argument("--prompt", "-p", required=True, help="the user message ('-' reads stdin)")
    gen.add_argument("--system", help="system prompt (default: the model's own)")
    gen.add_argument("--prompt-cache", help="start from a prompt cache saved by `qwen-mlx cache-prompt`")
    add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="multi-turn chat in the terminal")
    add_model_argument(chat)
    chat.add_argument("--system", help="system prompt (default: the model's own)")
    chat.add_argument("--prompt-cache", help="start from a prompt cache saved by `qwen-mlx cache-prompt`")
    chat.add_argument("--verbose", "-v", action="store_true", help="print statistics after each reply")
    add_sampling_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    cache = sub.add_parser("cache-prompt", help="process a long system prompt or document once and save it")
    add_model_argument(cache)
    cache.add_argument("--prompt", "-p", required=True, help="the document / first user message ('-' reads stdin)")
    cache.add_argument("--system", help="system prompt (default: the model's own)")
    cache.add_argument("--output", "-o", required=True, help="the .safetensors file to write")
    add_cache_arguments(cache)
    cache.set_defaults(func=cmd_cache_prompt)

    from qwen_mlx.converter.convert import add_parser as add_convert_parser

    add_convert_parser(sub)

    from qwen_mlx.webui.cli import add_parser as add_webui_parser

    add_webui_parser(sub)

    from qwen_mlx.serve import add_parser as add_serve_parser

    add_serve_parser(sub)

    from qwen_mlx.bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QwenMLXError as e:
        print(f"qwen-mlx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
