"""Saved conversations: one JSON file per conversation, in a folder per browser, written atomically.

A browser is known by a random owner id it keeps in its localStorage, signed by the server (`owner_token`): only
that browser can name its folder, so two users never see each other's conversations, and an owner id alone (seen
in an export's path, say) opens nothing. A file that cannot be read as a conversation (truncated, edited by
hand, of another shape) is skipped and named in the log once; the others stay usable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_mlx.files import replaced_atomically
from qwen_mlx.webui.branches import Node, check_message, flatten, linear, new_root, unflatten
from qwen_mlx.webui.branches import path as shown_path

log = logging.getLogger(__name__)

_ID = re.compile(r"[0-9a-f]{32}")
TITLE_LENGTH = 48
# Keys a message carries only while the page shows it (a reply waiting for a row, its prompt being read).
TRANSIENT = frozenset({"waiting", "pending", "prefill", "origin"})


def new_id() -> str:
    return secrets.token_hex(16)


def is_id(value: Any) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def owner_token(owner: str, secret: str) -> str:
    """What a browser keeps to be known by: its owner id and this server's HMAC of it (the secret never leaves the
    server), so that the server takes back only ids it handed out."""
    return f"{owner}.{_signature(owner, secret)}"


def token_owner(token: Any, secret: str) -> str | None:
    """The owner id in `token` when this server signed it; None for anything else (a bare or forged id)."""
    if not isinstance(token, str):
        return None
    owner, _, signature = token.partition(".")
    if not is_id(owner) or not hmac.compare_digest(signature.encode(), _signature(owner, secret).encode()):
        return None
    return owner


def _signature(owner: str, secret: str) -> str:
    return hmac.new(secret.encode(), owner.encode(), hashlib.sha256).hexdigest()


def short_title(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TITLE_LENGTH else text[: TITLE_LENGTH - 1] + "…"


@dataclass
class Conversation:
    """A chat as the UI shows it: a tree of messages (see branches.py) of which one path is shown.

    A message is {"role", "content"}; a user message may carry "attachments" ([{"name", "text"}]), an assistant
    message "stats" (a GenerationStats as a dict, plus "finish_reason" and "dropped": the oldest messages left out
    of its prompt), "error": True (a failed reply, shown but never sent back to the model) or "unfinished": True
    (saved while it was being written; without "stats", the server stopped before it ended).
    """

    owner: str = field(default_factory=new_id)
    id: str = field(default_factory=new_id)
    tree: Node = field(default_factory=new_root)
    updated: float = field(default_factory=time.time)
    name: str = ""  # the title the user gave it; empty: the first question is the title
    system_prompt: str | None = None  # None: the model's default (conversations saved before it was kept)
    model: str | None = None  # the model it talks to, by the name the picker lists; None: the one the UI started with

    @property
    def messages(self) -> list[Node]:
        """The messages shown, in order (the tree's active path); edit them in place."""
        return shown_path(self.tree)

    @property
    def title(self) -> str:
        if self.name.strip():
            return short_title(self.name)
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        return short_title(first) if first.strip() else "New chat"


@dataclass(frozen=True)
class Summary:
    """What the list of conversations shows, and what its search looks through."""

    id: str
    title: str
    updated: float
    text: str  # every message of every branch, lower-cased


def not_begun(message: Node) -> bool:
    """A reply placeholder that has no text yet: not saved, so a reload never shows an empty reply."""
    return bool(message.get("pending")) and not message.get("content") and not message["children"]


def to_record(conversation: Conversation) -> dict[str, Any]:
    """The conversation as its file holds it (also the JSON export): every message of every alternative, flat
    (see branches.flatten)."""
    nodes, active = flatten(conversation.tree, TRANSIENT, skip=not_begun)
    return {
        "format": "qwen-mlx conversation",
        "id": conversation.id,
        "title": conversation.title,
        "name": conversation.name,
        "system_prompt": conversation.system_prompt,
        "model": conversation.model,
        "updated": conversation.updated,
        "nodes": nodes,
        "active": active,
    }


def from_record(data: Any) -> tuple[Node, float, str, str | None, str | None]:
    """(tree, updated, name, system prompt, model) from a saved or exported conversation, or a plain list of
    {"role", "content"} messages; ValueError saying what is wrong with anything else."""
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict):
        raise ValueError("not a conversation (expected a JSON object or a list of messages)")
    system_prompt = data.get("system_prompt")
    if "nodes" in data:
        tree = unflatten(data["nodes"], data.get("active", 0))
    elif "messages" in data:  # saved before conversations had alternatives, or an imported message list
        messages = data["messages"]
        if not isinstance(messages, list):
            raise ValueError("'messages' is not a list")
        system = [m for m in messages if isinstance(m, dict) and m.get("role") == "system"]
        messages = [m for m in messages if not any(m is s for s in system)]
        for i, m in enumerate(messages):
            check_message(m, f"message {i + 1}")
        if system and system_prompt is None and isinstance(system[0].get("content"), str):
            system_prompt = system[0]["content"]
        tree = linear(messages)
    else:
        raise ValueError("no 'nodes' or 'messages' in it")
    updated = data.get("updated", time.time())
    if isinstance(updated, bool) or not isinstance(updated, int | float) or not math.isfinite(updated):
        raise ValueError(f"'updated' is {updated!r}, not a time")
    name = data.get("name") or ""
    model = data.get("model")
    if not isinstance(name, str) or not all(v is None or isinstance(v, str) for v in (system_prompt, model)):
        raise ValueError("'name', 'system_prompt' and 'model' must be text")
    return tree, float(updated), name, system_prompt, model


def all_text(tree: Node) -> str:
    parts, stack = [], [tree]
    while stack:
        at = stack.pop()
        parts.append(at.get("content", ""))
        stack += at["children"]
    return "\n".join(parts).lower()


class ConversationStore:
    def __init__(self, root: Path):
        self.root = root
        self._summaries: dict[Path, tuple[int, int, Summary | None]] = {}  # path → (mtime_ns, size, summary)

    def _path(self, owner: str, conversation_id: str) -> Path:
        if not (is_id(owner) and is_id(conversation_id)):  # ids come from the browser: never a path
            raise ValueError(f"not a conversation id: {owner!r}/{conversation_id!r}")
        return self.root / owner / f"{conversation_id}.json"

    def save(self, conversation: Conversation) -> None:
        """Write the conversation (temp file, then rename); an empty one is deleted instead."""
        record = to_record(conversation)
        if not record["nodes"]:
            self.delete(conversation)
            return
        conversation.updated = record["updated"] = time.time()
        path = self._path(conversation.owner, conversation.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp:
            tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")

    def load(self, owner: str, conversation_id: str) -> Conversation | None:
        """The conversation, or None if there is none (or its file is unreadable: logged once)."""
        try:
            path = self._path(owner, conversation_id)
        except ValueError:
            return None
        return self._read(path, owner)

    def _read(self, path: Path, owner: str) -> Conversation | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            self._skip(path, str(e))
            return None
        try:
            tree, updated, name, system_prompt, model = from_record(json.loads(text))
        except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
            self._skip(path, str(e))
            return None
        return Conversation(owner, path.stem, tree, updated, name, system_prompt, model)

    def _skip(self, path: Path, reason: str) -> None:
        log.warning("skipping the conversation file %s, which cannot be read: %s", path, reason)

    def list(self, owner: str) -> list[Summary]:
        """The owner's conversations, most recently updated first (files read again only when they change)."""
        folder = self.root / owner if is_id(owner) else None
        if folder is None or not folder.is_dir():
            return []
        found = []
        for path in folder.glob("*.json"):
            if not is_id(path.stem):  # a temporary file of a write in progress
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            cached = self._summaries.get(path)
            if cached is None or cached[:2] != (stat.st_mtime_ns, stat.st_size):
                conversation = self._read(path, owner)  # an unreadable file is logged once: then it is cached
                summary = None if conversation is None else Summary(
                    conversation.id, conversation.title, conversation.updated, all_text(conversation.tree))
                cached = self._summaries[path] = (stat.st_mtime_ns, stat.st_size, summary)
            if cached[2] is not None:
                found.append(cached[2])
        return sorted(found, key=lambda s: s.updated, reverse=True)

    def delete(self, conversation: Conversation) -> None:
        path = self._path(conversation.owner, conversation.id)
        path.unlink(missing_ok=True)
        self._summaries.pop(path, None)
