"""The models a chat page can pick: the local ones and the aliases not downloaded yet, what a conversation's model
shows before it runs (its tokenizer, default system prompt, context), and its worker when a reply is sent, loaded
(downloaded first for an alias) by the registry that a server uses too (`qwen_mlx.engine.registry`).

No MLX here beyond reading a folder's headers: the workers' threads run the models.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from qwen_mlx.engine.registry import ModelRegistry
from qwen_mlx.engine.worker import Job, ModelWorker
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import CacheSettings
from qwen_mlx.store.hub import Progress, download
from qwen_mlx.store.memory import memory_budget, plan_for_folder, usable_context
from qwen_mlx.store.names import ALIASES, repo_for_alias
from qwen_mlx.text.tokenizer import Tokenizer
from qwen_mlx.webui.rendering import THINK_OPEN

# The aliases the picker offers to download: the instruct models at 4 bits, by size (the full table is in names.py).
PICKER_ALIASES = tuple(a for a in ALIASES if re.fullmatch(r"qwen2\.5(-coder)?:[\d.]+b", a))


@dataclass(frozen=True)
class ModelInfo:
    """What a page shows for a model before it runs: counted with its tokenizer, filled with its defaults."""

    name: str
    tokenizer: Tokenizer
    default_system: str
    opens_thinking: bool
    context_length: int  # the memory plan's limit where memory runs out before the model's own context


def default_system_prompt(tokenizer: Tokenizer | None) -> str:
    """The system prompt the chat template writes when none is given (Qwen2.5: "You are Qwen, ...")."""
    if tokenizer is None:
        return ""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], add_generation_prompt=False)
    match = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.DOTALL)
    return match.group(1) if match else ""


def template_opens_thinking(tokenizer: Tokenizer | None) -> bool:
    """Whether the template's generation prompt ends inside <think> (DeepSeek-R1's does): replies then begin
    with reasoning and only close the block."""
    if tokenizer is None:
        return False
    text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], add_generation_prompt=True)
    return text.rstrip().endswith(THINK_OPEN)


class PageModels:
    """The page's models over a registry: `default` is the one the UI was started with (--model, --demo)."""

    def __init__(self, registry: ModelRegistry, default: str, cache: CacheSettings | None = None):
        self.registry = registry
        self.default = default
        self.cache = cache
        self._info: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()

    def name_of(self, model: str | None) -> str:
        return model or self.default

    def choices(self) -> list[tuple[str, str]]:
        """(label, name) for the picker: the local models, the default first, then the aliases to download."""
        try:
            local = self.registry.models.listing()
        except QwenMLXError:  # the default model's folder is not a model: the page says why, offer it anyway
            return [(self.default, self.default)]
        known = {m.name for m in local} | {a for m in local for a in m.aliases}
        offered = [(m.name, m.name) for m in local]
        if not self.registry.models.only_pinned:
            offered += [(f"{a} (download)", a) for a in PICKER_ALIASES if a not in known]
        return offered

    def is_local(self, name: str) -> bool:
        try:
            self.registry.models.resolve(name)
        except QwenMLXError:
            return False
        return True

    def info(self, model: str | None) -> ModelInfo | None:
        """What the page shows for `model` (None: the default), read once; None while it is not on this machine
        (or cannot be read as a model)."""
        name = self.name_of(model)
        with self._lock:
            if name in self._info:
                return self._info[name]
        loaded = self.registry.find_loaded(name)
        if loaded is not None and loaded.worker.model is not None:
            worker = loaded.worker
            tokenizer = worker.tokenizer
            context = usable_context(worker.model, worker.cache_settings)
        else:
            try:
                folder = self.registry.models.resolve(name).folder
                # Without loading the weights: the tokenizer and the memory plan come from the folder.
                tokenizer = Tokenizer.from_folder(folder)
                plan = plan_for_folder(folder)
            except QwenMLXError:  # not here, or not a model: a reply will say why
                return None
            context = plan.largest_context(memory_budget().nbytes, self.cache)  # at most the model's own
        info = ModelInfo(name, tokenizer, default_system_prompt(tokenizer), template_opens_thinking(tokenizer),
                         context)
        with self._lock:
            self._info[name] = info
        return info

    def fetch(self, name: str, progress: Progress | None = None) -> None:
        """Download the alias `name`, not on this machine yet (`progress(done, total)` hears the bytes)."""
        repo = repo_for_alias(name)
        if repo is None:
            raise QwenMLXError(f"model {name!r} is not on this machine; download it with `qwen-mlx pull {name}`")
        download(repo, name, progress=progress)

    def load(self, model: str | None) -> ModelWorker:
        """The worker of `model`, loaded now if need be (this waits for the load); a failed load is raised."""
        entry = self.registry.acquire(self.name_of(model))
        self.registry.release(entry)
        return entry.worker

    def submit(self, model: str | None, key: str, prompt: Any, **options: Any) -> tuple[Job, ModelWorker]:
        """`prompt`'s job on `model`'s worker (loaded first if need be), and that worker."""
        entry = self.registry.acquire(self.name_of(model))
        try:
            return entry.worker.submit(key, prompt, **options), entry.worker
        finally:
            self.registry.release(entry)  # the job in the worker's queue keeps the model in use from here

    def forget(self, key: str) -> None:
        """A deleted conversation's prefix entries go from every model loaded."""
        for entry in self.registry.loaded():
            entry.worker.forget(key)
