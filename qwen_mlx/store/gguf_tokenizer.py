"""The tokenizer files of a GGUF model: tokenizer.json rebuilt from the file's token list and merges,
tokenizer_config.json (chat template, special tokens) and generation_config.json (end-of-generation ids).

The token list is byte-level BPE spelled as in Hugging Face's tokenizer.json, so the vocabulary and merges go to
the `tokenizers` library unchanged, under Qwen2's own pipeline (qwen_tokenizer_pipeline): the ids are those of
the real Qwen2 tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as BackendTokenizer

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.store.gguf import metadata, required
from qwen_mlx.store.tokenizer_files import qwen_tokenizer_pipeline

# llama.cpp's names for a pre-tokenizer that splits text as Qwen2's does.
QWEN2_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")
# Qwen's end markers: llama.cpp stops at them when they are control tokens, as Qwen2.5's generation_config does.
END_MARKERS = ("<|im_end|>", "<|endoftext|>")
# general.sampling.* → generation_config.json's names
SAMPLING = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "penalty_repeat": "repetition_penalty"}


def write_tokenizer_files(reader: gguf.GGUFReader, tokenizer: BackendTokenizer, folder: Path, context: int) -> None:
    """tokenizer.json (`tokenizer`, built by build_tokenizer), tokenizer_config.json, generation_config.json."""
    tokenizer.save(str(folder / "tokenizer.json"))
    for name, data in (("tokenizer_config.json", tokenizer_config(reader, tokenizer, context)),
                       ("generation_config.json", generation_config(reader, tokenizer))):
        (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def build_tokenizer(reader: gguf.GGUFReader, path: Path) -> BackendTokenizer:
    """Byte-level BPE over the normal tokens, then the control tokens as special tokens and the user-defined ones
    as plain added tokens, each at its own id. Unused slots (llama.cpp's `[PAD151665]`, padding the vocabulary to
    the embedding's rows) stay out, as in Qwen's tokenizer.json."""
    if (kind := metadata(reader, "tokenizer.ggml.model")) != "gpt2":
        raise QwenMLXError(f"{path}: tokenizer {kind!r}, but Qwen2's is byte-level BPE (llama.cpp's 'gpt2')")
    if (pre := metadata(reader, "tokenizer.ggml.pre")) not in QWEN2_PRE_TOKENIZERS:
        raise QwenMLXError(f"{path}: pre-tokenizer {pre!r}; Qwen2 models have "
                           f"{' or '.join(map(repr, QWEN2_PRE_TOKENIZERS))}")
    tokens = required(reader, "tokenizer.ggml.tokens", path)
    types = required(reader, "tokenizer.ggml.token_type", path)
    if len(types) != len(tokens):
        raise QwenMLXError(f"{path}: {len(tokens)} tokens but {len(types)} token types; re-download the file")
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
             if kind == gguf.TokenType.NORMAL}
    merges = [tuple(m.split(" ")) for m in required(reader, "tokenizer.ggml.merges", path)]
    bad = next((m for m in merges if len(m) != 2 or m[0] not in vocab or m[1] not in vocab), None)
    if bad is not None:
        raise QwenMLXError(f"{path}: merge {' '.join(bad)!r} is not two tokens of the vocabulary; re-download it")
    tokenizer = qwen_tokenizer_pipeline(
        BackendTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False)))
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            continue
        added = AddedToken(token, special=kind == gguf.TokenType.CONTROL, normalized=False)
        if added.special:
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])
        # An added token takes the next free id: a gap before it would shift it and every id after.
        if tokenizer.token_to_id(token) != i:
            raise QwenMLXError(f"{path}: token {token!r} should have id {i} but the vocabulary before it does not "
                               "end there; its token list does not match its metadata")
    return tokenizer


def tokenizer_config(reader: gguf.GGUFReader, tokenizer: BackendTokenizer, context: int) -> dict[str, Any]:
    """As Qwen2's tokenizer_config.json, from the file: the chat template, the special tokens by their ids."""
    tokens = metadata(reader, "tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        i = metadata(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", False))
    return {
        "add_bos_token": add_bos,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
        },
        # Qwen writes no BOS: its bos id is only a name for <|endoftext|>, and llama.cpp's add_bos_token says so
        "bos_token": token("bos_token_id") if add_bos else None,
        "chat_template": metadata(reader, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": token("eos_token_id"),
        "errors": "replace",
        "model_max_length": context,
        "pad_token": token("padding_token_id"),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def generation_config(reader: gguf.GGUFReader, tokenizer: BackendTokenizer) -> dict[str, Any]:
    """The end-of-generation ids (the file's eos and eot, and Qwen's end markers) and any sampling defaults the
    file records (general.sampling.*)."""
    ends = [metadata(reader, f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id")]
    added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    ends += [added.get(marker) for marker in END_MARKERS]
    config: dict[str, Any] = {
        "bos_token_id": metadata(reader, "tokenizer.ggml.bos_token_id"),
        "pad_token_id": metadata(reader, "tokenizer.ggml.padding_token_id"),
        "eos_token_id": list(dict.fromkeys(i for i in ends if i is not None)),
    }
    for key, name in SAMPLING.items():
        config[name] = metadata(reader, f"general.sampling.{key}")
    return {k: v for k, v in config.items() if v is not None}
