"""Model names as people type them: Ollama-style aliases (`qwen2.5:7b`) for the mlx-community builds of Qwen2.5.

An alias maps to one Hugging Face repo id. `qwen2.5` = `qwen2.5:latest` = `qwen2.5:7b` is the 4-bit 7B, as Ollama
and Docker's model card have it. Only repos known to exist on the hub are listed (the README's table says which);
a name that looks like an alias (no "/") but is none is a one-line error listing the close matches.
"""

from __future__ import annotations

import difflib

from qwen_mlx.errors import QwenMLXError

SIZES = ("0.5", "1.5", "3", "7", "14", "32", "72")
VARIANTS = {"": "4bit", "-8bit": "8bit", "-bf16": "bf16"}  # alias suffix -> repo suffix
DEFAULT_SIZE = "7"
# mlx-community's Qwen2.5-Coder-*-Instruct builds seen on the hub (its qwen25-coder collection and model pages);
# the others (every 3B, 7B-8bit, ...) are left out rather than guessed.
CODER_REPOS = {
    "0.5": ("4bit", "bf16"),
    "1.5": ("4bit", "bf16"),
    "7": ("4bit", "bf16"),
    "14": ("4bit", "8bit"),
    "32": ("4bit", "8bit", "bf16"),
}


def _alias_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for size in SIZES:
        for suffix, variant in VARIANTS.items():
            table[f"qwen2.5:{size}b{suffix}"] = f"mlx-community/Qwen2.5-{size}B-Instruct-{variant}"
    for size, variants in CODER_REPOS.items():
        for suffix, variant in VARIANTS.items():
            if variant in variants:
                table[f"qwen2.5-coder:{size}b{suffix}"] = f"mlx-community/Qwen2.5-Coder-{size}B-Instruct-{variant}"
    for family in ("qwen2.5", "qwen2.5-coder"):
        for short in (family, f"{family}:latest"):
            table[short] = table[f"{family}:{DEFAULT_SIZE}b"]
    return table


ALIASES: dict[str, str] = _alias_table()


def repo_for_alias(name: str) -> str | None:
    """The repo id an alias names (case-insensitive), or None if `name` is no alias."""
    return ALIASES.get(name.strip().lower())


def aliases_of(repo_id: str) -> list[str]:
    """Every alias of `repo_id`, shortest first (`qwen2.5`, `qwen2.5:7b`, `qwen2.5:latest`)."""
    return sorted((a for a, r in ALIASES.items() if r.lower() == repo_id.lower()), key=lambda a: (len(a), a))


def looks_like_repo_id(name: str) -> bool:
    """`owner/name`, as the hub spells repo ids (a path would start with '.', '/' or '~')."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def close_matches(name: str, candidates: list[str] | None = None, n: int = 3) -> list[str]:
    """The known names nearest to `name`, best first (difflib's ratio over the alias table and `candidates`)."""
    known = sorted(set(ALIASES) | set(candidates or []))
    return difflib.get_close_matches(name.strip().lower(), known, n=n, cutoff=0.6)


def unknown_name(name: str, local: list[str] | None = None) -> QwenMLXError:
    """The error for a name that is no folder, repo id, local model or alias, with the closest names."""
    matches = close_matches(name, local)
    hint = f"did you mean {', '.join(matches)}? " if matches else ""
    return QwenMLXError(f"{name!r} is not a model folder, a Hugging Face repo id (owner/name), a local model or a "
                        f"known alias; {hint}see `qwen-mlx list` and the README's alias table", "model")
