"""Models Ollama has pulled, by name: `ollama:qwen2.5:7b` → the GGUF file in Ollama's store.

Ollama keeps a manifest per model, `manifests/registry.ollama.ai/library/<name>/<tag>` (JSON, as an OCI image
manifest), whose layer of media type `application/vnd.ollama.image.model` names the GGUF by digest:
`blobs/sha256-<hex>`. The store is ~/.ollama/models, or $OLLAMA_MODELS.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qwen_mlx.errors import QwenMLXError

PREFIX = "ollama:"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
# A name part as Ollama allows it; anything else (a "..", a slash at either end) could reach outside the store.
NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def is_ollama_name(source: str) -> bool:
    return source.startswith(PREFIX)


def ollama_store() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def manifest_path(name: str, store: Path) -> Path:
    """`qwen2.5:7b` → manifests/registry.ollama.ai/library/qwen2.5/7b (`user/model`, `host/user/model` as Ollama
    spells them; the tag is `latest` when left out)."""
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if len(parts) > 3 or not all(NAME_PART.fullmatch(p) for p in [*parts, tag or "latest"]):
        raise QwenMLXError(f"ollama:{name}: not an Ollama model name; write it as Ollama does, e.g. "
                           "ollama:qwen2.5:7b")
    registry, namespace = DEFAULT_REGISTRY, DEFAULT_NAMESPACE
    if len(parts) == 3:
        registry, namespace = parts[0], parts[1]
    elif len(parts) == 2:
        namespace = parts[0]
    return store / "manifests" / registry / namespace / parts[-1] / (tag or "latest")


def resolve_ollama(source: str) -> Path:
    """The GGUF file behind `ollama:NAME[:TAG]`, from the manifest Ollama wrote when it pulled the model."""
    name = source.removeprefix(PREFIX)
    store = ollama_store()
    manifest = manifest_path(name, store)
    if not manifest.is_file():
        raise QwenMLXError(f"{source}: Ollama has not pulled it (no {manifest}); run `ollama pull {name}` first, "
                           "or set OLLAMA_MODELS to Ollama's models folder")
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
        digests = [layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_MEDIA_TYPE]
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as e:
        raise QwenMLXError(f"{manifest}: not a readable Ollama manifest ({e}); run `ollama pull {name}` again") \
            from None
    match = DIGEST.fullmatch(digests[0]) if len(digests) == 1 and isinstance(digests[0], str) else None
    if match is None:
        raise QwenMLXError(f"{manifest}: names no single model file ({MODEL_MEDIA_TYPE}); run `ollama pull {name}` "
                           "again")
    blob = store / "blobs" / f"sha256-{match[1]}"
    if not blob.is_file():
        raise QwenMLXError(f"{source}: its model file {blob} is missing; run `ollama pull {name}` again")
    return blob
