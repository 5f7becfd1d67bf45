"""The Qwen tokenizer: `tokenizers` BPE, special tokens that typed text cannot forge, streaming detokenizer."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, overload

from tokenizers import Tokenizer as BackendTokenizer

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import read_json
from qwen_mlx.text.template import render_chat


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte is written as one printable character in the vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_ENCODER = _bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


class Tokenizer:
    """Qwen2's byte-level BPE with its chat template and end-of-turn ids.

    `encode(text)` treats everything as ordinary text: `<|im_start|>` typed by a user becomes the tokens of those
    characters, never the control token. Only the markers a chat template writes itself become special ids.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        chat_template: str | None = None,
        eos_token_ids: list[int] | None = None,
        special_tokens_map: dict[str, str | None] | None = None,  # None: a token given without its content
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens_map = special_tokens_map or {}
        self.added_tokens = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        # The same BPE without added tokens: it cannot produce a control id from any text.
        plain = json.loads(backend.to_str())
        plain["added_tokens"] = []
        self.plain_backend = BackendTokenizer.from_str(json.dumps(plain))
        if eos_token_ids is None:
            eos_token_ids = [self.added_tokens[t] for t in ("<|im_end|>", "<|endoftext|>") if t in self.added_tokens]
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        # Longest first, so a marker that is a prefix of another never wins.
        self._added_pattern = re.compile(
            "|".join(re.escape(t) for t in sorted(self.added_tokens, key=len, reverse=True))
        ) if self.added_tokens else None

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise QwenMLXError(f"{folder}: no tokenizer.json; copy it from the original Hugging Face model folder")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise QwenMLXError(f"{path}: cannot read the tokenizer ({e})") from None
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # the list-of-named-templates form; "default" is the chat one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        eos_ids: list[int] = []
        generation = folder / "generation_config.json"
        if generation.exists():
            eos = read_json(generation).get("eos_token_id")
            eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        special = {
            key: value if isinstance(value, str) else value.get("content")
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if isinstance(value := config.get(key), str | dict)
        }
        tokenizer = cls(backend, template, None, special)
        eos_token = special.get("eos_token")
        if eos_token in tokenizer.added_tokens:
            eos_ids.append(tokenizer.added_tokens[eos_token])
        if eos_ids:
            tokenizer.eos_token_ids = list(dict.fromkeys(eos_ids))
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text` as ordinary text; `allow_special=True` lets added-token strings become their ids."""
        backend = self.backend if allow_special else self.plain_backend
        return backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: Literal[False] = False,
    ) -> str: ...

    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        *,
        tokenize: Literal[True],
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render `messages` with the model's chat template: the prompt text, or (tokenize=True) its ids.

        Added-token strings inside user-controlled text (system/user/tool contents, tool definitions) are hidden
        behind one-off placeholders while the template renders, so only the template's own markers are split out
        as control tokens. Assistant turns keep theirs: those tokens were the model's own (e.g. `<tool_call>`).

        An assistant message may carry the `token_ids` its content was generated as: where they decode to the
        content exactly, they stand for it in the ids, so the prompt matches the KV cache that generated them
        even when the text would tokenize otherwise (a random model's byte soup, an unusual merge).
        """
        nonce = secrets.token_hex(8)
        placeholders: dict[str, str] = {}
        replies: dict[str, list[int]] = {}
        if tokenize:
            messages = [self._stand_in(m, f"\ue000{nonce}:reply{i}\ue001", replies) for i, m in enumerate(messages)]

        def stash(match: re.Match[str]) -> str:
            key = f"\ue000{nonce}:{len(placeholders)}\ue001"
            placeholders[key] = match.group(0)
            return key

        def hide(value: Any) -> Any:
            if isinstance(value, str):
                return self._added_pattern.sub(stash, value) if self._added_pattern else value
            if isinstance(value, dict):  # keys too: a tool's parameter names are written out by `tojson`
                return {hide(k): hide(v) for k, v in value.items()}
            if isinstance(value, list):
                return [hide(v) for v in value]
            return value

        hidden_messages = [m if m.get("role") == "assistant" else hide(m) for m in messages]
        hidden_tools = hide(tools) if tools else None
        rendered = render_chat(
            self.chat_template, hidden_messages, hidden_tools, add_generation_prompt, **self.special_tokens_map
        )

        def reveal(text: str) -> str:
            for key, original in placeholders.items():
                text = text.replace(key, original)
            return text

        if not tokenize:
            return reveal(rendered)
        ids: list[int] = []
        pos = 0
        for match in self._added_pattern.finditer(rendered) if self._added_pattern else ():
            ids += self._encode_piece(reveal(rendered[pos : match.start()]), replies)
            ids.append(self.added_tokens[match.group(0)])
            pos = match.end()
        ids += self._encode_piece(reveal(rendered[pos:]), replies)
        return ids

    def _stand_in(self, message: dict[str, Any], key: str, replies: dict[str, list[int]]) -> dict[str, Any]:
        """An assistant message whose `token_ids` spell its content, with a placeholder for the content."""
        ids = message.get("token_ids")
        content = message.get("content")
        if message.get("role") != "assistant" or not isinstance(content, str) or not content or not ids:
            return message
        if self.decode(ids) != content:
            return message
        replies[key] = list(ids)
        return {**message, "content": key}

    def _encode_piece(self, text: str, replies: dict[str, list[int]]) -> list[int]:
        """Ordinary text's ids, with each reply placeholder's own ids spliced in where it stands."""
        ids: list[int] = []
        for key, reply in replies.items():
            before, found, text = text.partition(key) if key in text else ("", "", text)
            if found:
                ids += self.encode(before) + reply
        return ids + self.encode(text)

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the vocabulary and its added tokens: equal for tokenizers that give text the same ids."""
        vocab = sorted(self.backend.get_vocab(with_added_tokens=True).items())
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for: byte-level vocab entries mapped back, added tokens as their UTF-8."""
        table: list[bytes] = [b""] * self.vocab_size
        for token, i in self.backend.get_vocab(with_added_tokens=False).items():
            table[i] = bytes(BYTE_DECODER[c] for c in token)
        for token, i in self.added_tokens.items():
            table[i] = token.encode("utf-8")
        return table

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self.token_bytes)


class StreamingDetokenizer:
    """Turns token ids into text increments that never split a UTF-8 character.

    Byte-level BPE splits multi-byte characters (CJK, Arabic, emoji, ZWJ sequences) across tokens, so the bytes
    are buffered until they form complete characters. Each token costs O(its own bytes): nothing is re-decoded.
    The increments concatenate to `tokenizer.decode(ids)`; an incomplete tail is flushed as U+FFFD by `finalize`,
    exactly as `decode` renders it.
    """

    def __init__(self, token_bytes: list[bytes]):
        self.token_bytes = token_bytes
        self.pending = b""

    def add(self, token: int) -> str:
        # Ids past the tokenizer's vocabulary (Qwen pads the embedding to a multiple of 128) decode to nothing,
        # as `decode` treats them.
        self.pending += self.token_bytes[token] if token < len(self.token_bytes) else b""
        cut = _complete_utf8_prefix(self.pending)
        text = self.pending[:cut].decode("utf-8", errors="replace")
        self.pending = self.pending[cut:]
        return text

    def finalize(self) -> str:
        text = self.pending.decode("utf-8", errors="replace")
        self.pending = b""
        return text


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a possibly-incomplete UTF-8 character."""
    n = len(data)
    # A character is at most 4 bytes: look back at most 3 bytes for the lead byte of an unfinished one.
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n - back if back < need else n
        return n  # ASCII: everything before it is complete
    return n
