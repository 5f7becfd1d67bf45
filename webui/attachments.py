"""Text files attached to a message: read as text (never run, never parsed), checked, and written into the prompt.

A file is accepted if it is UTF-8 (or UTF-16 with its byte-order mark) text without NUL bytes and at most
MAX_BYTES long; anything else gets a one-line reason. Its text goes into the user's message with its name, in a
fence longer than any backtick run inside it, so the file cannot end the block early.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_BYTES = 512 * 1024  # per file: a long source file or log; the context meter shows what it costs
MAX_FILES = 10  # per message


class AttachmentError(ValueError):
    """A file that cannot be attached; the message says which and why, in one line."""


@dataclass(frozen=True)
class Attachment:
    name: str
    text: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "text": self.text}


def size_text(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MB" if size >= 1024 * 1024 else f"{max(1, round(size / 1024))} kB"


def read_attachment(path: str | os.PathLike[str], name: str | None = None) -> Attachment:
    """The text of the uploaded file at `path` (shown as `name`), or AttachmentError."""
    path = Path(path)
    name = clean_name(name or path.name)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise AttachmentError(f"{name} is {size_text(size)}; attachments are limited to {size_text(MAX_BYTES)} each")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return Attachment(name, data.decode("utf-16"))
        except UnicodeDecodeError:
            pass
    elif b"\0" not in data:
        try:
            return Attachment(name, data.decode("utf-8-sig"))
        except UnicodeDecodeError:
            pass
    raise AttachmentError(f"{name} is not a text file; attach code, markdown, CSV, logs or other plain text")


def clean_name(name: str) -> str:
    """The file's own name, without folders or control characters (it is shown and sent to the model)."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", os.path.basename(name.replace("\\", "/"))).strip()
    return name[:200] or "attachment"


def read_uploads(files: list[Any] | None, already: int = 0) -> tuple[list[Attachment], list[str]]:
    """The uploaded files (Gradio's paths or file objects) as attachments, and a reason for each one refused."""
    attached, refused = [], []
    for file in files or []:
        path = getattr(file, "name", file)
        label = getattr(file, "orig_name", None) or os.path.basename(str(path))
        if already + len(attached) >= MAX_FILES:
            refused.append(f"{clean_name(label)}: at most {MAX_FILES} files per message")
            continue
        try:
            attached.append(read_attachment(path, label))
        except AttachmentError as e:
            refused.append(str(e))
        except OSError as e:
            refused.append(f"{clean_name(label)} could not be read ({e.strerror or e})")
    return attached, refused


def with_attachments(text: str, attachments: list[dict[str, str]]) -> str:
    """The user's message as the model reads it: their text, then each file under its name."""
    parts = [text] if text.strip() else []
    for a in attachments:
        parts.append(f"File `{a['name']}`:\n{fenced(a['text'])}")
    return "\n\n".join(parts)


def fenced(text: str) -> str:
    """`text` as a markdown code block whose fence is longer than any run of backticks in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text.rstrip()}\n{fence}"
