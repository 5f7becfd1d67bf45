"""The flags several commands share, defined and checked once: the model, sampling, the KV cache, splitting the
model over processes, and what the two servers (`serve`, `webui`) have in common (address, port, queue, batch,
demo model)."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import mlx.nn as nn

from qwen_mlx.engine.lockstep import Lockstep
from qwen_mlx.engine.registry import LocalModels, ModelRegistry, ModelSource, keep_alive_seconds
from qwen_mlx.engine.request import DEFAULT_DRAFT_TOKENS, speculation_settings
from qwen_mlx.engine.speculative import DraftModel, load_draft
from qwen_mlx.engine.worker import CacheTiers, ModelWorker, default_ram_bytes, slowed_for_tests
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import data_home
from qwen_mlx.model.cache import CacheSettings
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.parallel import MODES, Parallel, start_group
from qwen_mlx.store.catalog import record_use, repo_id_for
from qwen_mlx.store.load import DEFAULT_MODEL, load, resolve_model_path
from qwen_mlx.store.memory import check_context_fits, plan_for_folder, split_plan
from qwen_mlx.store.names import aliases_of
from qwen_mlx.store.synthetic import demo_model_folder
from qwen_mlx.text.tokenizer import Tokenizer

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_CACHE_DISK_GB = 10.0


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


def load_for_context(name: str | Path, args: argparse.Namespace,
                     parallel: Parallel | None = None) -> tuple[nn.Module, Tokenizer]:
    """`load` with --context (this rank's part with `parallel`), after checking that --context positions fit here
    with the cache flags (before any weight is read; `load` itself refuses weights that cannot fit at all)."""
    context = getattr(args, "context", None)
    folder = resolve_model_path(name)
    if context is not None:
        config = ModelConfig.from_file(folder / "config.json").with_context(context)
        plan = plan_for_folder(folder, config)
        check_context_fits(plan if parallel is None else split_plan(plan, parallel.size), context,
                           cache_settings(args), what=f"--context {context}:")
    return load(folder, context_length=context, parallel=parallel)


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
    worker = start_worker(args, cache_settings(args), args.model, parallel, max_batch)
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


def model_source(args: argparse.Namespace) -> ModelSource:
    """The model a server starts with (--model, --demo), resolved (downloaded first if need be) before it serves;
    requests may call it by its served name, by what --model said, or by an alias of its repo."""
    if args.demo:
        return ModelSource("qwen2-demo", demo_model_folder(data_home() / "models"), ("demo",), pinned=True)
    folder = resolve_model_path(args.model)
    name = served_model_name(args)
    repo_id = repo_id_for(args.model) if not Path(args.model).expanduser().exists() else None
    aliases = {args.model, *([repo_id, *aliases_of(repo_id)] if repo_id else [])} - {name}
    return ModelSource(name, folder, tuple(sorted(aliases)), pinned=True)


def start_registry(args: argparse.Namespace, cache: CacheSettings,
                   parallel: Parallel | None = None) -> tuple[ModelRegistry, ModelSource]:
    """The registry a server runs its models in, with --model (or --demo) loading; its progress on stderr. Only
    that model gets --draft-model (a draft must share its model's tokenizer).

    With `parallel` it serves that one model only, loaded for the server's life: every rank holds its part.
    """
    if args.max_models < 1:
        raise QwenMLXError(f"--max-models {args.max_models} must be at least 1")
    if parallel is not None and args.max_models != 1:
        raise QwenMLXError("--max-models: a model split over processes (--parallel) is the only one served; drop "
                           "--max-models")
    keep_alive = keep_alive_seconds(args.keep_alive, "--keep-alive")
    pinned = model_source(args)

    def start(source: ModelSource, spare: ModelWorker | None) -> ModelWorker:
        if parallel is not None:
            return start_worker(args, cache, source.name, parallel, folder=source.folder)

        def load_source() -> tuple[nn.Module, Tokenizer]:
            # --context is the pinned model's; another model runs with its own context.
            model, tokenizer = load_for_context(source.folder, args) if source.pinned else load(source.folder)
            if not source.pinned:
                record_use(source.name)
            return slowed_for_tests(model), tokenizer

        def draft_for(tokenizer: Tokenizer) -> DraftModel:
            return load_draft(args.draft_model, tokenizer, context_length=getattr(args, "context", None))

        options = speculation_options(args, None)
        draft = draft_for if source.pinned and args.draft_model else None

        def status(message: str) -> None:
            print(f"qwen-mlx: {source.name}: {message}", file=sys.stderr, flush=True)

        if spare is not None:
            spare.reload(load_source, options=options, load_draft=draft, on_status=status)
            return spare
        return ModelWorker(load_source, cache=cache, max_batch=args.max_batch, max_queue=args.max_queue,
                           options=options, load_draft=draft, on_status=status, tiers=cache_tiers(args))

    registry = ModelRegistry(LocalModels([pinned], only_pinned=parallel is not None), start,
                             max_models=args.max_models, keep_alive=None if parallel else keep_alive,
                             resident=parallel is not None)
    return registry, pinned


def cache_tiers(args: argparse.Namespace, parallel: Parallel | None = None) -> CacheTiers:
    """The prefix cache's memory (--cache-ram-gb) and disk (--cache-disk-gb, none when split over processes)."""
    ram_gb = getattr(args, "cache_ram_gb", None)
    ram = default_ram_bytes() if ram_gb is None else int(ram_gb * 1e9)
    if parallel is not None:
        return CacheTiers(ram)
    disk_gb = getattr(args, "cache_disk_gb", None)
    return CacheTiers(ram, data_home() / "kv-cache", int((DEFAULT_CACHE_DISK_GB if disk_gb is None else disk_gb) * 1e9))


def served_model_name(args: argparse.Namespace) -> str:
    """How a server names its model: "qwen2-demo", a local folder's name, or the repo id."""
    if args.demo:
        return "qwen2-demo"
    return Path(args.model).name if Path(args.model).is_dir() else args.model


def start_worker(args: argparse.Namespace, cache: CacheSettings, label: str, parallel: Parallel | None = None,
                 max_batch: int | None = None, folder: Path | None = None) -> ModelWorker:
    """The model worker a command runs on: --model (or --demo) loaded on its thread (this rank's part of it with
    `parallel`), its progress on stderr (rank 0's).

    QWEN_MLX_TOKEN_DELAY=<seconds> makes every model step sleep that long first: for tests and diagnostics only,
    so that a tiny model streams slowly enough to watch, stop and disconnect from.
    """

    def load_model() -> tuple[nn.Module, Tokenizer]:
        source = folder or (demo_model_folder(data_home() / "models") if getattr(args, "demo", False) else args.model)
        model, tokenizer = load_for_context(source, args, parallel)
        return slowed_for_tests(model), tokenizer

    def draft_for(tokenizer: Tokenizer) -> DraftModel:
        return load_draft(args.draft_model, tokenizer, context_length=getattr(args, "context", None))

    speaks = parallel is None or parallel.leads
    return ModelWorker(load_model, cache=cache, max_batch=max_batch or getattr(args, "max_batch", 1),
                       max_queue=getattr(args, "max_queue", None), tiers=cache_tiers(args, parallel),
                       options=speculation_options(args, None), load_draft=draft_for if args.draft_model else None,
                       on_status=(lambda status: print(f"qwen-mlx: {label}: {status}", file=sys.stderr, flush=True))
                       if speaks else None, lockstep=Lockstep(parallel.group) if parallel else None)
