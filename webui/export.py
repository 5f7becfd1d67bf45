"""A conversation as files to download: Markdown (the messages shown, for reading) and JSON (every alternative,
for importing again here or elsewhere)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from qwen_mlx.files import replaced_atomically
from qwen_mlx.webui.attachments import fenced
from qwen_mlx.webui.conversations import Conversation, to_record
from qwen_mlx.webui.rendering import attachment_line, split_thinking, stats_line


def to_markdown(conversation: Conversation, system_prompt: str) -> str:
    updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.updated))
    lines = [f"# {conversation.title}", "", f"_{updated}_", ""]
    if system_prompt.strip():
        lines += ["**System prompt:**", "", *(f"> {line}" for line in system_prompt.splitlines()), ""]
    for m in conversation.messages:
        if m["role"] == "user":
            lines += ["## User", "", m["content"], ""]
            for a in m.get("attachments", []):
                lines += [f"{attachment_line([a])}:", "", fenced(a["text"]), ""]
            continue
        lines += ["## Assistant", ""]
        if m.get("error"):
            lines += [f"_Error: {m['content']}_", ""]
            continue
        thought, _, answer = split_thinking(m["content"])
        if thought:
            lines += ["<details><summary>Thinking</summary>", "", thought, "", "</details>", ""]
        lines += [answer, ""]
        if m.get("stats"):
            lines += [f"<sub>{stats_line(m['stats'])}</sub>", ""]
    return "\n".join(lines).rstrip() + "\n"


def file_stem(title: str) -> str:
    stem = re.sub(r"[^\w.-]+", "-", title).strip("-._")[:60]
    return stem or "conversation"


def write_exports(conversation: Conversation, system_prompt: str, folder: Path) -> tuple[Path, Path]:
    """The Markdown and JSON files of the conversation, in `folder` (replaced if there already)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = file_stem(conversation.title)
    markdown, data = folder / f"{stem}.md", folder / f"{stem}.json"
    for old in folder.iterdir():  # the conversation was renamed: its old files would be downloaded no more
        if old not in (markdown, data) and old.suffix in (".md", ".json") and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    with replaced_atomically(markdown) as tmp:
        tmp.write_text(to_markdown(conversation, system_prompt), encoding="utf-8")
    # "messages", the conversation shown, for other tools; "nodes" has every alternative too (and is what an
    # import here reads).
    shown = [{k: v for k, v in m.items() if k in ("role", "content", "attachments", "stats", "error")}
             for m in conversation.messages]
    record = {**to_record(conversation), "system_prompt": system_prompt, "messages": shown}
    with replaced_atomically(data) as tmp:
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
    return markdown, data
