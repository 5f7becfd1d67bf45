"""ModelConfig: the one place where a model folder's config.json becomes typed fields."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qwen_mlx.errors import QwenMLXError

SUPPORTED_MODEL_TYPES = ("qwen2",)


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # mlx-lm's block: {"group_size": 64, "bits": 4, "mode": "affine", "<layer path>": {...} | false}
    quantization: dict[str, Any] | None = None
    # Set by `with_context` (load(..., context_length=N), --context N), never read from config.json:
    context: int | None = None  # the positions asked for
    # YaRN on demand: the scaling a sequence switches to once it outgrows max_position_embeddings
    dynamic_rope_scaling: dict[str, Any] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        """Positions the model handles: what `with_context` asked for, else the pretraining length, stretched by
        a static YaRN's factor."""
        if self.context is not None:
            return self.context
        return self.native_context_length

    @property
    def native_context_length(self) -> int:
        """Positions config.json itself gives: max_position_embeddings, stretched by its YaRN factor if it has one."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        original = self.rope_scaling.get("original_max_position_embeddings") or self.max_position_embeddings
        return max(self.max_position_embeddings, int(original * self.rope_scaling["factor"]))

    @property
    def yarn_switch(self) -> int | None:
        """With YaRN on demand, the most positions a sequence holds under plain RoPE; None: one RoPE throughout."""
        return self.max_position_embeddings if self.dynamic_rope_scaling is not None else None

    @staticmethod
    def check_context(length: object) -> None:
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise QwenMLXError(f"context_length (--context) {length!r} must be an integer of at least 2 "
                               f"(e.g. 131072)", "context_length")

    def with_context(self, length: int) -> ModelConfig:
        """This config for a context of `length` positions (`load(..., context_length=N)`, `--context N`).

        Up to the config's own length it is a limit. Past it, a config without rope_scaling gets the Qwen2.5
        model card's YaRN recipe (factor = length / max_position_embeddings, e.g. 131072 / 32768 = 4.0) on demand:
        plain RoPE while a sequence fits max_position_embeddings, YaRN once it grows past (`PromptCache.fit_rope`).
        A config that has rope_scaling keeps it, static, as transformers runs it, and cannot go past its length.
        """
        self.check_context(length)
        native = self.native_context_length
        if length <= native:
            return replace(self, context=length)
        if self.rope_scaling is not None:
            raise QwenMLXError(
                f"context_length {length}: config.json's rope_scaling gives {native} positions; ask for at most "
                f"that, or remove rope_scaling from config.json so qwen-mlx applies YaRN on demand",
                "context_length")
        yarn = {"rope_type": "yarn", "factor": length / self.max_position_embeddings,
                "original_max_position_embeddings": self.max_position_embeddings}
        return replace(self, context=length, dynamic_rope_scaling=yarn)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise QwenMLXError(
                f"{source}: model_type is {model_type!r}, but qwen-mlx runs Qwen2 / Qwen2.5 models "
                f"(model_type 'qwen2'); pick a Qwen2 or Qwen2.5 checkpoint"
            )
        required = (
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise QwenMLXError(f"{source}: missing {', '.join(missing)}; is this a complete Qwen2 config.json?")
        rope_theta, rope_scaling = _rope_settings(d)
        config = cls(
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            intermediate_size=int(d["intermediate_size"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            vocab_size=int(d["vocab_size"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            quantization=d.get("quantization"),
        )
        if config.hidden_size % config.num_attention_heads:
            raise QwenMLXError(
                f"{source}: hidden_size {config.hidden_size} is not divisible by "
                f"num_attention_heads {config.num_attention_heads}"
            )
        if config.num_attention_heads % config.num_key_value_heads:
            raise QwenMLXError(
                f"{source}: num_attention_heads {config.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {config.num_key_value_heads}"
            )
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_json(path), source=str(path))


def _rope_settings(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from either config layout.

    Hub checkpoints write `rope_theta` + `rope_scaling`; transformers >= 5 saves both inside `rope_parameters`.
    """
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or params)
    theta = float(d.get("rope_theta", params.get("rope_theta", 1_000_000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise QwenMLXError(
            f"config.json: rope scaling type {rope_type!r} is not supported; Qwen2.5 uses 'yarn' "
            f'(e.g. {{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})'
        )
    if "factor" not in scaling:
        raise QwenMLXError("config.json: yarn rope_scaling needs a 'factor' (e.g. 4.0)")
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = "yarn"
    return theta, scaling


def read_json(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise QwenMLXError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise QwenMLXError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise QwenMLXError(f"{path}: expected a JSON object")
    return data
