"""Saved conversations: one JSON file per conversation, in a folder per browser, written atomically.

A browser is known by a random owner id it keeps in its localStorage; only that browser can name its folder, so
two users never see each other's conversations.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen_mlx.files import replaced_atomically

_ID = re.compile(r"[0-9a-f]{32}")


def new_id() -> str:
    return secrets.token_hex(16)


def is_id(value: Any) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


@dataclass
class Conversation:
    """A chat as the UI shows it. Messages are {"role", "content"} dicts; an assistant message may also carry
    "stats" (a GenerationStats as a dict, plus "finish_reason") or "error": True (a failed reply, shown but never
    sent back to the model)."""

    owner: str = field(default_factory=new_id)
    id: str = field(default_factory=new_id)
    messages: list[dict[str, Any]] = field(default_factory=list)
    updated: float = field(default_factory=time.time)

    @property
    def title(self) -> str:
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "New chat")
        first = " ".join(first.split())
        return first if len(first) <= 48 else first[:47] + "…"


class ConversationStore:
    def __init__(self, root: Path):
        self.root = root

    def _path(self, owner: str, conversation_id: str) -> Path:
        if not (is_id(owner) and is_id(conversation_id)):  # ids come from the browser: never a path
            raise ValueError(f"not a conversation id: {owner!r}/{conversation_id!r}")
        return self.root / owner / f"{conversation_id}.json"

    def save(self, conversation: Conversation) -> None:
        """Write the conversation (temp file, then rename); an empty one is deleted instead."""
        if not conversation.messages:
            self.delete(conversation)
            return
        conversation.updated = time.time()
        path = self._path(conversation.owner, conversation.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(conversation)
        # A reply's "waiting for a free row" note is for the page while it waits, not for the record.
        data["messages"] = [{k: v for k, v in m.items() if k != "waiting"} for m in data["messages"]]
        with replaced_atomically(path) as tmp:
            tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    def load(self, owner: str, conversation_id: str) -> Conversation | None:
        try:
            data = json.loads(self._path(owner, conversation_id).read_text(encoding="utf-8"))
            return Conversation(owner, conversation_id, data["messages"], data["updated"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def list(self, owner: str) -> list[Conversation]:
        """The owner's conversations, most recently updated first."""
        if not is_id(owner) or not (self.root / owner).is_dir():
            return []
        found = (self.load(owner, path.stem) for path in (self.root / owner).glob("*.json"))
        return sorted((c for c in found if c is not None), key=lambda c: c.updated, reverse=True)

    def delete(self, conversation: Conversation) -> None:
        self._path(conversation.owner, conversation.id).unlink(missing_ok=True)
