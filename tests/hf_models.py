"""Random tiny Qwen2 checkpoints written by transformers itself: the reference the tests compare against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen_mlx.store.synthetic import tiny_config
from qwen_mlx.store.tokenizer_files import QWEN25_REFERENCE_DIR

# Qwen2.5-7B-Instruct's official configs: the shared reference beside the repository when there is one (CI, the
# team's machines), else the copy the package ships (checked equal to it in test_tokenizer.py).
SHARED_REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qwen2.5-7b-instruct"
REFERENCE_DIR = SHARED_REFERENCE_DIR if SHARED_REFERENCE_DIR.is_dir() else QWEN25_REFERENCE_DIR

# A byte-level tokenizer small enough for tiny models: the 256 bytes, a few merges, and Qwen's chat markers.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
TINY_VOCAB = 320


def write_tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from qwen_mlx.text.tokenizer import BYTE_ENCODER

    vocab = {BYTE_ENCODER[b]: b for b in range(256)}
    merges = []
    for a, b in [("t", "h"), ("th", "e"), ("Ġ", "t"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "the")]:
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS[:3])
    tok.add_tokens(SPECIAL_TOKENS[3:])
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    reference = json.loads((REFERENCE_DIR / "tokenizer_config.json").read_text())
    config = {
        "chat_template": reference["chat_template"],
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "special": t in SPECIAL_TOKENS[:3], "lstrip": False, "rstrip": False,
                          "normalized": False, "single_word": False}
            for t in SPECIAL_TOKENS
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
                  "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def save_tiny_qwen2(folder: Path, *, seed: int = 0, dtype: str = "float32", tokenizer: bool = True,
                    max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Save a random Qwen2ForCausalLM with `save_pretrained` (safetensors); `overrides` change its config."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = tiny_config(**{"vocab_size": TINY_VOCAB, "max_position_embeddings": 2048, "rope_theta": 10000.0,
                           **overrides})
    settings = {k: v for k, v in shape.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**settings)).eval()
    # Random init is tiny (std 0.02): widen it so the logits differ enough for greedy decoding to be a real test.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.25 if p.dim() > 1 else 0.1)
    model = model.to(getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    if tokenizer:
        write_tiny_tokenizer(folder)
    return folder


def load_hf(folder: Path):  # noqa: ANN201
    import torch
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
