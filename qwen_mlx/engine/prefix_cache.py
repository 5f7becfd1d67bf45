"""One prefix cache for the whole process: the KV caches of finished turns, found again by their token ids, in RAM
and on disk, so a request starts from the longest prefix any conversation has computed, across restarts.

- An entry is a finished sequence's PromptCache, keyed by the ids it holds. A new prompt takes the entry that
  shares the longest prefix with it: the entry itself when the prompt continues all of it (its conversation's
  next turn), else a copy of the shared part (a regenerate, an edit, another conversation with the same system
  prompt or document), which leaves the entry as it was.
- A rotating cache that has wrapped cannot be trimmed, so it is only ever copied: each finished turn stays as a
  checkpoint, and a regenerate, an edit or the next turn resumes from the closest one instead of from nothing.
- RAM holds at most `ram_bytes`, least recently used out; entries pushed out, and all of them at `flush`
  (shutdown), go to the disk tier: one safetensors file each under `$QWEN_MLX_HOME/kv-cache/<model>/<settings>/`,
  written atomically (temp file, fsync, rename) with a checksum of its arrays. `disk_bytes` bounds all of
  `kv-cache/`, every model's and setting's entries, least recently used out first. The folder names the model's
  fingerprint and the cache settings, and every file repeats them: a cache is never applied to another model or
  setting, and a file that is damaged or not ours is set aside, never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import replaced_atomically
from qwen_mlx.model.cache import CacheSettings, PromptCache, load_prompt_cache, longest_common_prefix, save_prompt_cache
from qwen_mlx.store.weights import header_entries, read_header

log = logging.getLogger(__name__)

STALE_TEMP_S = 600  # a temporary file this old was left by a writer that died (SIGKILL): removed at start
DAMAGED = "damaged"  # the folder, beside the entries, that unusable entries are moved into
DAMAGED_KEPT = 8  # ... the newest few of them: a cache that keeps breaking must not fill the disk


@dataclass
class CacheStats:
    ram_entries: int = 0
    ram_bytes: int = 0
    disk_entries: int = 0
    disk_bytes: int = 0
    hits: int = 0  # requests that started from a cached prefix
    disk_hits: int = 0  # ... read back from disk
    misses: int = 0
    reused_tokens: int = 0  # prompt tokens not computed thanks to it


def settings_tag(settings: CacheSettings) -> str:
    if settings.kv_bits is not None:
        return f"q{settings.kv_bits}-g{settings.kv_group_size}"
    if settings.max_kv_size is not None:
        return f"rotating{settings.max_kv_size}-keep{settings.keep}"
    return "full"


def usable_prefix(cached: list[int], prompt: list[int], trimmable: bool) -> int:
    """How many leading prompt ids a cache holding `cached` can serve: the shared prefix (one prompt token is
    always left to compute), or, for a cache that cannot be trimmed, all of it or nothing."""
    common = min(longest_common_prefix(cached, prompt), len(prompt) - 1)
    if trimmable:
        return common
    return common if common == len(cached) else 0


def copy_cache(cache: PromptCache, keep: int) -> PromptCache:
    """A new PromptCache holding the first `keep` positions of `cache` (all of them if it cannot be trimmed), with
    buffers of its own, so either can go on without changing the other."""
    copied = PromptCache([type(c).from_state(*c.state()) for c in cache.caches], list(cache.tokens))
    if copied.is_trimmable():
        copied.trim(len(copied.tokens) - keep)
    mx.eval([a for c in copied.caches for a in c.state()[0].values()])
    return copied


@dataclass
class DiskTier:
    """Prefix-cache entries as files, for one model and cache setting, in `folder`: `<root>/<fingerprint>/<tag>`.

    `max_bytes` bounds the whole disk tier, `<root>` with every model's and setting's folder, least recently used
    entries out first: those of a model since removed or changed go in time, and then their folders.

    Nothing in the folder is trusted: an entry that is damaged, truncated, another model's, or not a file at all
    (a folder, a dangling link, a FIFO) is set aside into `damaged/` (`set_aside`), so no file can keep a model
    from starting or give it another's state."""

    folder: Path
    fingerprint: str
    tag: str
    max_bytes: int
    index: dict[Path, tuple[tuple[int, ...], int]] = field(default_factory=dict)  # file → (ids, bytes)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for path in sorted(self.folder.iterdir()):
            if path.name == DAMAGED:
                continue
            try:
                info = path.lstat()
                if path.name.startswith(".") and stat.S_ISREG(info.st_mode):
                    if now - info.st_mtime > STALE_TEMP_S:
                        path.unlink(missing_ok=True)  # a write a killed process never finished
                    continue  # ... or one in progress
                self.index[path] = (entry_tokens(path, info), info.st_size)
            except (OSError, ValueError) as e:
                self.set_aside(path, str(e))
        self._evict()  # the bound may be smaller than last time

    @property
    def root(self) -> Path:
        return self.folder.parent.parent

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.index.values())

    def path_for(self, tokens: list[int]) -> Path:
        return self.folder / f"{hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:32]}.safetensors"

    def write(self, cache: PromptCache) -> None:
        path = self.path_for(cache.tokens)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)  # another process's clean-up may have taken it, empty
            save_prompt_cache(path, cache, {"fingerprint": self.fingerprint, "settings": self.tag})
        except (QwenMLXError, OSError) as e:  # a full disk: the entry is dropped, the server goes on
            log.warning("could not write a prefix-cache entry: %s", e)
            return
        self.index[path] = (tuple(cache.tokens), path.stat().st_size)
        os.utime(path)
        self._evict()

    def read(self, path: Path) -> PromptCache | None:
        """The entry in `path` (its file then removed: it lives in RAM from now on), if it is whole and ours."""
        self.index.pop(path, None)
        try:
            cache, meta = load_prompt_cache(path)
        except QwenMLXError as e:
            self.set_aside(path, str(e))
            return None
        if meta.get("fingerprint") != self.fingerprint or meta.get("settings") != self.tag:
            self.set_aside(path, "another model's or cache setting's entry")
            return None
        path.unlink(missing_ok=True)
        return cache

    def set_aside(self, path: Path, reason: str) -> None:
        """Move an entry that cannot be used out of the way, into `damaged/` beside it for a look (the newest
        DAMAGED_KEPT), else delete it; named once in the log."""
        self.index.pop(path, None)
        if not os.path.lexists(path):  # another process sharing the folder took it first
            return
        damaged = self.folder / DAMAGED
        try:
            damaged.mkdir(exist_ok=True)
            os.replace(path, damaged / f"{time.time_ns()}-{path.name}")  # the time first: oldest sorts first
            for old in sorted(damaged.iterdir())[:-DAMAGED_KEPT]:
                remove_path(old)
            log.warning("prefix cache: set aside %s (%s) into %s", path.name, reason, damaged)
        except OSError:
            try:
                remove_path(path)
                log.warning("prefix cache: deleted %s (%s)", path, reason)
            except OSError as e:
                log.warning("prefix cache: skipped %s (%s); it cannot be moved or deleted: %s", path, reason, e)

    def _evict(self) -> None:
        """Least recently used entries out (set-aside ones first) until the whole disk tier fits `max_bytes`; then
        the folders of other models that hold no entry."""
        items = disk_items(self.root)
        entries = sorted(entry for path in items if (entry := entry_use(path)) is not None)
        total = sum(size for _, size, _ in entries)
        kept = set(items)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            try:
                remove_path(path)
            except OSError as e:
                log.warning("prefix cache: could not remove %s: %s", path, e)
                continue
            total -= size
            kept.discard(path)
        # Entries that other processes sharing the tier took or removed are gone from this index too.
        self.index = {path: entry for path, entry in self.index.items() if path in kept}
        in_use = {self.root / path.relative_to(self.root).parts[0] for path in kept if path.parent.name != DAMAGED}
        for model in safe_listing(self.root):
            if is_cache_folder(model) and model != self.folder.parent and model not in in_use:
                shutil.rmtree(model, ignore_errors=True)  # its replies.json and empty setting folders with it


def is_cache_folder(path: Path) -> bool:
    """A model's folder of the disk tier: named by a fingerprint (32 hex digits), a folder and not a link."""
    return (len(path.name) == 32 and all(c in "0123456789abcdef" for c in path.name) and path.is_dir()
            and not path.is_symlink())


def disk_items(root: Path) -> list[Path]:
    """Every file and set-aside item in the disk tier's `<root>/<fingerprint>/<tag>/` folders. Only those: a folder
    under the root not named as a fingerprint is never looked into, let alone removed."""
    found = []
    for model in filter(is_cache_folder, safe_listing(root)):
        for setting in safe_listing(model):
            if setting.is_dir() and not setting.is_symlink():
                for path in safe_listing(setting):
                    found += safe_listing(path) if path.name == DAMAGED and path.is_dir() else [path]
    return found


def entry_use(path: Path) -> tuple[float, int, Path] | None:
    """(last used, bytes, path) of an item of the disk tier; set-aside ones count as used at time 0, to go first.
    None for a temporary file (a write in progress) or one removed meanwhile."""
    if path.name.startswith(".") and path.parent.name != DAMAGED:
        return None
    try:
        info = path.lstat()
    except OSError:
        return None
    return (0.0 if path.parent.name == DAMAGED else info.st_mtime, info.st_size, path)


def safe_listing(folder: Path) -> list[Path]:
    """A folder's entries; none if it cannot be listed (gone meanwhile, no permission)."""
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def remove_path(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder with all it holds."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def entry_tokens(path: Path, info: os.stat_result | None = None) -> tuple[int, ...]:
    """The ids a prefix-cache file holds, from its header alone, once the file is known to be a whole cache file;
    ValueError says why it is not. `info`: its lstat, when the caller has it."""
    info = info or path.lstat()
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO would wait for a writer forever
        raise ValueError("not a regular file")
    header, length = read_header(path)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != "qwen-mlx-prompt-cache":
        raise ValueError("not a qwen-mlx prompt cache")
    if not isinstance(metadata.get("checksum"), str):  # what `read` checks the arrays against
        raise ValueError("it has no checksum (written by an older qwen-mlx)")
    end = max((v["data_offsets"][1] for v in header_entries(header).values()), default=0)
    if 8 + length + end != info.st_size:
        raise ValueError(f"{info.st_size} bytes where its header describes {8 + length + end}")
    try:
        tokens = json.loads(metadata["tokens"])
    except (KeyError, TypeError, ValueError, RecursionError):
        tokens = None
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise ValueError("its token list is damaged")
    return tuple(tokens)


def read_tokens(path: Path) -> tuple[int, ...] | None:
    """The ids a prefix-cache file holds, from its header alone (None if it is not a whole cache file)."""
    try:
        return entry_tokens(path)
    except (OSError, ValueError):
        return None


class PrefixCache:
    """The process's KV caches by token prefix, for one model and cache setting (see the module's docstring)."""

    def __init__(self, model: nn.Module, settings: CacheSettings, ram_bytes: int, disk: DiskTier | None = None,
                 entry_bytes: Callable[[PromptCache], int] | None = None):
        self.model = model
        self.entry_bytes = entry_bytes or (lambda cache: cache.nbytes)  # what an entry counts against ram_bytes
        self.settings = settings
        self.ram_bytes = ram_bytes
        self.disk = disk
        self.entries: OrderedDict[int, PromptCache] = OrderedDict()  # least recently used first
        self.stats = CacheStats()
        self._next = 0

    def acquire(self, prompt: list[int]) -> PromptCache:
        """The cache to run `prompt` in: the best entry (taken, or its shared prefix copied), or a new cache."""
        best: int | Path | None = None  # a RAM entry's key, or a disk tier's file
        usable = 0
        for key, entry in self.entries.items():
            n = usable_prefix(entry.tokens, prompt, entry.is_trimmable())
            if n > usable:
                best, usable = key, n
        for path, (tokens, _) in (self.disk.index.items() if self.disk else ()):
            n = usable_prefix(list(tokens), prompt, self.settings.max_kv_size is None or len(tokens) <
                              self.settings.max_kv_size)
            if n > usable:
                best, usable = path, n
        from_disk = isinstance(best, Path)
        cache = self._take(best, usable)
        if cache is None:
            self.stats.misses += 1
            return PromptCache.new(self.model, self.settings)
        self.stats.hits += 1
        self.stats.disk_hits += from_disk
        self.stats.reused_tokens += usable
        return cache

    def _take(self, best: int | Path | None, usable: int) -> PromptCache | None:
        if best is None:
            return None
        if isinstance(best, Path):
            assert self.disk is not None  # only the disk tier's index names files
            read = self.disk.read(best)
            if read is None:
                return None
            best = self._add(read)  # back in RAM, then as any RAM entry
        cache = self.entries[best]
        # A prompt that continues the whole entry (its conversation's next turn) takes it; any other (a regenerate,
        # an edit, another conversation with the same start) gets a copy of the shared part, so the entry stays
        # as it was, a checkpoint to come back to. A wrapped rotating cache can only ever be copied.
        if cache.is_trimmable() and usable >= len(cache.tokens):
            return self.entries.pop(best)
        self.entries.move_to_end(best)
        return copy_cache(cache, usable)

    def drop(self, cache: PromptCache | None) -> None:
        """Forget an entry (its conversation was deleted)."""
        for key, entry in list(self.entries.items()):
            if entry is cache:
                del self.entries[key]

    def checkpoint(self, cache: PromptCache) -> None:
        """Keep a copy of a live cache's state as it is now (a rotating cache at the end of its prompt)."""
        self._add(copy_cache(cache, len(cache.tokens)))

    def release(self, cache: PromptCache) -> None:
        """A finished sequence's cache becomes an entry (the turn's checkpoint)."""
        if cache.tokens:
            cache.draft = None
            self._add(cache)

    def _add(self, cache: PromptCache) -> int:
        for key, entry in list(self.entries.items()):
            if entry.tokens == cache.tokens:  # the same ids twice: keep one
                del self.entries[key]
        key, self._next = self._next, self._next + 1
        self.entries[key] = cache
        self._evict(keep=key)
        return key

    def _evict(self, keep: int) -> None:
        """Least recently used entries out of RAM (to disk) until the rest fit; the newest, `keep`, stays."""
        while len(self.entries) > 1 and sum(map(self.entry_bytes, self.entries.values())) > self.ram_bytes:
            oldest = next(k for k in self.entries if k != keep)
            cache = self.entries.pop(oldest)
            if self.disk is not None:
                self.disk.write(cache)

    def flush(self) -> None:
        """Write every RAM entry to the disk tier (at shutdown), so the next process starts from them."""
        if self.disk is None:
            return
        for cache in self.entries.values():
            self.disk.write(cache)

    def snapshot(self) -> CacheStats:
        stats = self.stats
        stats.ram_entries = len(self.entries)
        stats.ram_bytes = sum(c.nbytes for c in self.entries.values())
        stats.disk_entries = len(self.disk.index) if self.disk else 0
        stats.disk_bytes = self.disk.nbytes if self.disk else 0
        return stats


class ReplyMemory:
    """The token ids recent replies were generated as, by their text. A client that resends a conversation as text
    (every OpenAI client) then gets the prompt ids the model saw, so its turn matches the cached prefix even where
    the text would tokenize otherwise. Kept beside the disk tier, so it survives a restart with the caches."""

    def __init__(self, path: Path | None = None, size: int = 256):
        self.path = path
        self.size = size
        self.replies: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()  # the server's threads read and write it
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                self.replies.update((text, ids) for text, ids in saved if isinstance(text, str)
                                    and isinstance(ids, list) and all(type(t) is int for t in ids))
            except (OSError, ValueError, TypeError):
                log.warning("skipped a damaged reply memory: %s", path)

    def remember(self, text: str, ids: list[int]) -> None:
        if not (text and ids):
            return
        with self._lock:
            self.replies[text] = list(ids)
            self.replies.move_to_end(text)
            while len(self.replies) > self.size:
                self.replies.popitem(last=False)

    def ids_for(self, text: str) -> list[int] | None:
        with self._lock:
            return self.replies.get(text)

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            saved = json.dumps(list(self.replies.items()))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # a clean-up may have taken the empty folder
            with replaced_atomically(self.path) as tmp:
                tmp.write_text(saved, encoding="utf-8")
        except OSError as e:
            log.warning("could not save the reply memory: %s", e)
