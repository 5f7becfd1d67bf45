"""`qwen-mlx pull`: download a model into the Hugging Face cache (a progress bar; an interrupted pull resumes),
and nothing else."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.store.catalog import describe_size, find_local, home_models, repo_id_for, runnable_config
from qwen_mlx.store.hub import download
from qwen_mlx.store.names import unknown_name


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("pull", help="download a model (alias or Hugging Face repo id) into the cache")
    parser.add_argument("model", help="an alias (qwen2.5:7b, see the README) or a repo id (owner/name)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    name = args.model
    repo_id = repo_id_for(name)
    if repo_id is None:
        if find_local(name) is not None:
            print(f"qwen-mlx: {name} is a local model folder; nothing to pull", file=sys.stderr)
            return 0
        raise unknown_name(name, [m.name for m in home_models()])
    folder = download(repo_id, name)
    if runnable_config(folder) is None:
        raise QwenMLXError(f"{repo_id}: downloaded into {folder}, but it is not a Qwen2 model qwen-mlx can run "
                           "(config.json with model_type qwen2, *.safetensors weights)")
    model = find_local(repo_id)
    size = f" ({describe_size(model.size)})" if model is not None else ""
    print(f"qwen-mlx: pulled {repo_id}{size} into {folder}", file=sys.stderr)
    return 0
