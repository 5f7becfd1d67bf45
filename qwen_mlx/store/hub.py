"""The Hugging Face hub: a repo's model files downloaded into the local cache (resumed when cut off, with a progress
bar or a progress callback), or found there offline. huggingface_hub does the work (`snapshot_download`); this
module picks the files a model needs and turns the hub's errors into one line that says what to do.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qwen_mlx.errors import QwenMLXError

# What a model needs from a repo: configs, weights, the tokenizer. Never *.bin / *.pt (pickles).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "merges.txt", "vocab.json", "*.txt"]

Progress = Callable[[int, int], None]  # (bytes done, bytes in all) as a download goes


def download(repo_id: str, name: str | None = None, *, local_only: bool = False,
             progress: Progress | None = None) -> Path:
    """The snapshot folder of `repo_id` in the Hugging Face cache, downloaded first unless it is complete there.

    `name` is what the user typed (an alias, say): errors tell them to `qwen-mlx pull` that. With `local_only`,
    nothing is fetched: a repo not in the cache is an error. `progress(done, total)` hears the bytes as they come
    (no progress bar is drawn then); without it huggingface_hub draws its own bar on a terminal.
    """
    from huggingface_hub import snapshot_download

    name = name or repo_id
    options: dict[str, Any] = {"allow_patterns": ALLOW_PATTERNS, "local_files_only": local_only}
    if progress is not None:
        options["tqdm_class"] = reporting_tqdm(progress)
    try:
        return Path(snapshot_download(repo_id, **options))
    except Exception as e:
        mapped = hub_error(repo_id, name, e)
        if mapped is None:
            raise
        raise mapped from None


def hub_error(repo_id: str, name: str, error: Exception) -> QwenMLXError | None:
    """The one line for a hub failure (None: not a hub failure, let it through)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    shown = name if name == repo_id else f"{name} ({repo_id})"
    if isinstance(error, GatedRepoError):
        return QwenMLXError(f"{shown}: the repo is gated; accept its terms on huggingface.co and run `hf auth login`")
    if isinstance(error, RepositoryNotFoundError):
        return QwenMLXError(f"{shown}: no such model on the Hugging Face hub (check the spelling, or log in for a "
                            "private repo)")
    if isinstance(error, IncompleteSnapshotError):
        return QwenMLXError(f"{shown}: only part of it is downloaded; finish with `qwen-mlx pull {name}` while online")
    if isinstance(error, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        return QwenMLXError(f"{shown}: not downloaded yet and {why}; run `qwen-mlx pull {name}` while online (or pass "
                            "a local folder)")
    if isinstance(error, HFValidationError):
        return QwenMLXError(f"{repo_id}: not a valid Hugging Face repo id ({error})")
    # The HTTP stack's own errors (a connection dropped for good, say) come from httpx (huggingface_hub < 1.0:
    # requests) and carry no common base class to name here.
    transport = type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
    if isinstance(error, HfHubHTTPError | OSError) or transport:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return QwenMLXError(f"{shown}: download failed ({detail}); check the connection and run `qwen-mlx pull "
                            f"{name}` again (the files already downloaded are kept), or pass a local folder")
    return None


def reporting_tqdm(report: Progress) -> type[tqdm]:
    """A tqdm class for `snapshot_download` that draws nothing and reports the bytes written to `report`.

    snapshot_download sums every file into two byte bars, bytes received and bytes written ("Reconstructing");
    the second is what is on disk, the part a resumed download starts from.
    """

    class Reporting(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
            self.reports = self.unit == "B" and str(kwargs.get("desc", "")).startswith("Reconstruct")

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.reports:
                report(int(self.n), int(self.total or 0))
            return shown

    return Reporting
