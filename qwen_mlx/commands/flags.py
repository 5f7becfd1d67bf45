"""The flags several commands share, defined and checked once: the model, sampling, the KV cache, and what the
two servers (`serve`, `webui`) have in common (address, port, queue, batch, demo model)."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

import mlx.nn as nn

from qwen_mlx.cache import CacheSettings
from qwen_mlx.config import ModelConfig
from qwen_mlx.demo import demo_model_folder
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import data_home
from qwen_mlx.load import DEFAULT_MODEL, load, resolve_model_path
from qwen_mlx.memory import check_context_fits, plan_for_folder
from qwen_mlx.request import DEFAULT_DRAFT_TOKENS, speculation_settings
from qwen_mlx.speculative import DraftModel, load_draft
from qwen_mlx.tokenizer import Tokenizer
from qwen_mlx.worker import ModelWorker, slowed_for_tests

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_model_argument(parser: Any, demo: bool = False) -> None:
    """--model (a folder or repo id); with `demo`, also --demo, the offline random model, as its alternative."""
    group = parser.add_mutually_exclusive_group() if demo else parser
    group.add_argument("--model", "-m", default=DEFAULT_MODEL,
                       help=f"local model folder or Hugging Face repo id (default: {DEFAULT_MODEL})")
    if demo:
        group.add_argument("--demo", action="store_true",
                           help="no download: a tiny random-weight Qwen2 with the real tokenizer (replies are "
                                "gibberish)")
    add_context_argument(parser)


def add_context_argument(parser: Any) -> None:
    parser.add_argument("--context", type=int, metavar="N",
                        help="context length: up to the model's own, a limit; past it (e.g. 131072 for Qwen2.5), "
                             "YaRN on demand: plain RoPE until a conversation outgrows the original length, then "
                             "one re-encode of the context with YaRN")


def load_for_context(name: str | Path, args: argparse.Namespace) -> tuple[nn.Module, Tokenizer]:
    """`load` with --context, after checking that --context positions fit here with the cache flags (before any
    weight is read; `load` itself refuses weights that cannot fit at all)."""
    context = getattr(args, "context", None)
    folder = resolve_model_path(name)
    if context is not None:
        config = ModelConfig.from_file(folder / "config.json").with_context(context)
        check_context_fits(plan_for_folder(folder, config), context, cache_settings(args),
                           what=f"--context {context}:")
    return load(folder, context_length=context)


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
    add_speculation_arguments(parser)


def add_speculation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding (exact: greedy replies are the plain ones)")
    group.add_argument("--draft-model", metavar="MODEL",
                       help="a small model with the same tokenizer that drafts tokens (e.g. "
                            "mlx-community/Qwen2.5-0.5B-Instruct-4bit for the 7B)")
    group.add_argument("--num-draft-tokens", type=int,
                       help=f"most draft tokens verified per forward pass (default {DEFAULT_DRAFT_TOKENS})")
    group.add_argument("--prompt-lookup", type=int, metavar="N",
                       help="draft up to N tokens by copying what followed the last words earlier in the context")


def speculation_options(args: argparse.Namespace, draft: DraftModel | None) -> dict[str, Any]:
    """`stream_generate`'s speculation keyword arguments from the flags (and the draft model they loaded)."""
    return {"draft_model": draft, "num_draft_tokens": args.num_draft_tokens, "prompt_lookup": args.prompt_lookup}


def check_speculation_arguments(args: argparse.Namespace) -> None:
    """Refuse bad speculation flags before any model is loaded."""
    speculation_settings(None, None, args.num_draft_tokens, args.prompt_lookup, None)
    if args.num_draft_tokens is not None and args.draft_model is None and args.prompt_lookup is None:
        raise QwenMLXError("--num-draft-tokens needs a draft source: --draft-model or --prompt-lookup")
    if (args.draft_model or args.prompt_lookup) and args.max_kv_size is not None:
        raise QwenMLXError("speculative decoding (--draft-model, --prompt-lookup) needs a KV cache it can rewind; "
                           "drop --max-kv-size")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """`stream_generate`'s keyword arguments from the sampling flags."""
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


def add_cache_arguments(parser: Any) -> None:
    parser.add_argument(
        "--max-kv-size", type=int,
        help="keep at most this many positions in the KV cache (rotating, first 4 kept): bounded memory",
    )
    parser.add_argument("--kv-bits", type=int, choices=(4, 8),
                        help="store the KV cache at 4 or 8 bits: long contexts in less memory")


def cache_settings(args: argparse.Namespace) -> CacheSettings:
    """The cache flags as settings, checked before a model load that may take minutes."""
    if getattr(args, "context", None) is not None:
        ModelConfig.check_context(args.context)
    return CacheSettings(max_kv_size=args.max_kv_size, kv_bits=args.kv_bits)


def cache_options(settings: CacheSettings) -> dict[str, Any]:
    """`stream_generate`'s cache keyword arguments for `settings`."""
    return {"max_kv_size": settings.max_kv_size, "keep": settings.keep, "kv_bits": settings.kv_bits,
            "kv_group_size": settings.kv_group_size}


def add_server_arguments(parser: argparse.ArgumentParser, port: int, max_queue: int) -> None:
    """What `serve` and `webui` share: the model (or --demo), address, port, KV cache, queue, batch, drafts."""
    add_model_argument(parser, demo=True)
    add_speculation_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    add_cache_arguments(parser)
    parser.add_argument("--max-queue", type=int, default=max_queue,
                        help=f"most requests waiting for the model; more are refused (default {max_queue})")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="most requests decoded together, one forward pass per step for all (default 8; "
                             "1: one at a time)")


def check_server_arguments(args: argparse.Namespace, guard_flag: str, guarded: bool) -> CacheSettings:
    """Check the shared server flags; warn when the server opens beyond this machine without `guard_flag`."""
    settings = cache_settings(args)
    check_speculation_arguments(args)
    for flag, value in (("--max-queue", args.max_queue), ("--max-batch", args.max_batch)):
        if value < 1:
            raise QwenMLXError(f"{flag} {value} must be at least 1")
    if args.host not in LOOPBACK_HOSTS and not guarded:
        print(f"qwen-mlx: warning: --host {args.host} without {guard_flag} lets anyone who can reach this machine "
              f"use the model; add {guard_flag}", file=sys.stderr)
    check_port(args.host, args.port)
    return settings


def check_port(host: str, port: int) -> None:
    """Fail with a one-line error now, not after a model load that may take minutes."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise QwenMLXError(f"cannot listen on {host}:{port} ({e.strerror}); check --host and --port") from None


def served_model_name(args: argparse.Namespace) -> str:
    """How a server names its model: "qwen2-demo", a local folder's name, or the repo id."""
    if args.demo:
        return "qwen2-demo"
    return Path(args.model).name if Path(args.model).is_dir() else args.model


def start_worker(args: argparse.Namespace, cache: CacheSettings, label: str) -> ModelWorker:
    """The model worker a server runs on: --model (or --demo) loaded on its thread, its progress on stderr.

    QWEN_MLX_TOKEN_DELAY=<seconds> makes every model step sleep that long first: for tests and diagnostics only,
    so that a tiny model streams slowly enough to watch, stop and disconnect from.
    """

    def load_model() -> tuple[nn.Module, Tokenizer]:
        model, tokenizer = load_for_context(demo_model_folder(data_home() / "models") if args.demo else args.model,
                                            args)
        return slowed_for_tests(model), tokenizer

    def draft_for(tokenizer: Tokenizer) -> DraftModel:
        return load_draft(args.draft_model, tokenizer, context_length=args.context)

    return ModelWorker(load_model, cache=cache, max_batch=args.max_batch, max_queue=args.max_queue,
                       options=speculation_options(args, None), load_draft=draft_for if args.draft_model else None,
                       on_status=lambda status: print(f"qwen-mlx: {label}: {status}", file=sys.stderr, flush=True))
