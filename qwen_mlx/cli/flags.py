"""The flags several commands share, defined and checked once: the model, sampling, the KV cache, splitting the
model over processes, and what the two servers (`serve`, `webui`) have in common (address, port, queue, batch,
demo model)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any

from qwen_mlx.engine.registry import keep_alive_seconds
from qwen_mlx.engine.request import DEFAULT_DRAFT_TOKENS, speculation_settings
from qwen_mlx.engine.setup import DEFAULT_CACHE_DISK_GB, EngineSettings, start_worker
from qwen_mlx.engine.speculative import DraftModel, check_cache_can_rewind
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import CacheSettings
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.parallel import MODES, Parallel, start_group
from qwen_mlx.store.load import DEFAULT_MODEL

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_model_argument(parser: Any, demo: bool = False) -> None:
    """--model (a folder or repo id); with `demo`, also --demo, the offline random model, as its alternative."""
    group = parser.add_mutually_exclusive_group() if demo else parser
    group.add_argument("--model", "-m", default=DEFAULT_MODEL,
                       help=f"model folder, local model name, alias (qwen2.5:7b; see `qwen-mlx list`) or Hugging Face "
                            f"repo id (default: {DEFAULT_MODEL})")
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


def add_parallel_argument(parser: Any) -> None:
    parser.add_argument("--parallel", choices=MODES,
                        help="split the model over the processes mlx.launch starts (see the README): tensor for "
                             "fast links (Thunderbolt), pipeline for slow ones (Ethernet); default under mlx.launch: "
                             "tensor")


def parallel_group(args: argparse.Namespace) -> Parallel | None:
    """This process's place in a split model (None: it runs alone), once the flags it rules out are checked."""
    parallel = start_group(args.parallel)
    if parallel is None:
        return None
    if getattr(args, "prompt_cache", None):
        raise QwenMLXError("--prompt-cache holds one process's cache and cannot be used with a model split over "
                           "processes; drop it (each turn's prefix is still reused)")
    if getattr(args, "cache_disk_gb", None):
        raise QwenMLXError("--cache-disk-gb: a model split over processes keeps its prefix cache in memory only "
                           "(each machine's disk would hold other turns); drop the flag")
    return parallel


def follow(args: argparse.Namespace, parallel: Parallel, max_batch: int = 1) -> int:
    """What a rank other than 0 does for any command: load its part of the model and follow rank 0's steps.

    Ctrl-C in the terminal reaches every process mlx.launch started there: rank 0 stops, and tells the others
    (which ignore it) in its last plan; a rank that stops on its own would leave rank 0's last step without it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = start_worker(engine_settings(args), args.model, parallel, max_batch)
    worker.follow()
    return 0


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
    if args.draft_model or args.prompt_lookup:
        check_cache_can_rewind(args.max_kv_size is not None, "--max-kv-size")


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
    add_parallel_argument(parser)
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
    parser.add_argument("--cache-ram-gb", type=float,
                        help="memory for the KV caches of finished turns, reused by any request that starts the "
                             "same way (default: a tenth of this machine's RAM)")
    parser.add_argument("--cache-disk-gb", type=float,
                        help="disk for the turns that no longer fit in memory and for all of them at shutdown, "
                             f"so a restarted server resumes them (default {DEFAULT_CACHE_DISK_GB:g}; 0: none; none "
                             "with --parallel)")


def check_server_arguments(args: argparse.Namespace, guard_flag: str, guarded: bool) -> CacheSettings:
    """Check the shared server flags; warn when the server opens beyond this machine without `guard_flag`."""
    settings = cache_settings(args)
    check_speculation_arguments(args)
    for flag, value in (("--max-queue", args.max_queue), ("--max-batch", args.max_batch)):
        if value < 1:
            raise QwenMLXError(f"{flag} {value} must be at least 1")
    for flag, value in (("--cache-ram-gb", args.cache_ram_gb), ("--cache-disk-gb", args.cache_disk_gb)):
        if value is not None and not value >= 0:
            raise QwenMLXError(f"{flag} {value:g} must be 0 or more")
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


def add_registry_arguments(parser: argparse.ArgumentParser, keep_alive: str = "5m") -> None:
    """How many models a server keeps loaded, and for how long (see `registry.ModelRegistry`)."""
    parser.add_argument("--max-models", type=int, default=1,
                        help="most models loaded at once; a request for another unloads the least recently used idle "
                             "one (default 1)")
    parser.add_argument("--keep-alive", default=keep_alive,
                        help="unload a model idle this long: 5m, 1h, 30s, 300 (seconds), 0 (after each request) or "
                             f"-1 (never) (default {keep_alive})")


def engine_settings(args: argparse.Namespace, parallel: Parallel | None = None) -> EngineSettings:
    """What the flags say the engine is (the flags any command lacks keep their defaults), checked before a
    model load that may take minutes."""
    max_models = getattr(args, "max_models", 1)
    if max_models < 1:
        raise QwenMLXError(f"--max-models {max_models} must be at least 1")
    if parallel is not None and max_models != 1:
        raise QwenMLXError("--max-models: a model split over processes (--parallel) is the only one served; drop "
                           "--max-models")
    keep_alive = getattr(args, "keep_alive", None)
    return EngineSettings(
        model=args.model, demo=getattr(args, "demo", False), context=getattr(args, "context", None),
        cache=cache_settings(args), draft_model=getattr(args, "draft_model", None),
        num_draft_tokens=getattr(args, "num_draft_tokens", None), prompt_lookup=getattr(args, "prompt_lookup", None),
        max_batch=getattr(args, "max_batch", 1), max_queue=getattr(args, "max_queue", None),
        cache_ram_gb=getattr(args, "cache_ram_gb", None), cache_disk_gb=getattr(args, "cache_disk_gb", None),
        max_models=max_models,
        keep_alive=keep_alive_seconds(keep_alive, "--keep-alive") if keep_alive is not None else 300.0,
        step_delay=float(os.environ.get("QWEN_MLX_TOKEN_DELAY") or 0))
