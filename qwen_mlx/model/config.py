"""ModelConfig: the one place where a model folder's config.json becomes typed fields."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import read_json

SUPPORTED_MODEL_TYPES = ("qwen2",)
REQUIRED = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")


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
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise QwenMLXError(f"{source}: missing {', '.join(missing)}; is this a complete Qwen2 config.json?")
        heads = positive_int(d, "num_attention_heads", source)
        rope_theta, rope_scaling = _rope_settings(d, source)
        quantization = d.get("quantization")
        if quantization is not None:
            check_quantization_block(quantization, source)
        config = cls(
            hidden_size=positive_int(d, "hidden_size", source),
            num_hidden_layers=positive_int(d, "num_hidden_layers", source),
            intermediate_size=positive_int(d, "intermediate_size", source),
            num_attention_heads=heads,
            num_key_value_heads=positive_int(d, "num_key_value_heads", source) if d.get("num_key_value_heads")
            is not None else heads,
            vocab_size=positive_int(d, "vocab_size", source),
            rms_norm_eps=positive_number(d, "rms_norm_eps", source, 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=positive_int(d, "max_position_embeddings", source, 32768),
            tie_word_embeddings=flag(d, "tie_word_embeddings", source),
            quantization=quantization,
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


def positive_int(d: dict[str, Any], key: str, source: str, default: int | None = None) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise QwenMLXError(f"{source}: {key} is {value!r}, but must be a positive integer; fix config.json")
    return value


def positive_number(d: dict[str, Any], key: str, source: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise QwenMLXError(f"{source}: {key} is {value!r}, but must be a positive number; fix config.json")
    return float(value)


def flag(d: dict[str, Any], key: str, source: str) -> bool:
    value = d.get(key, False)
    if not isinstance(value, bool):
        raise QwenMLXError(f"{source}: {key} is {value!r}, but must be true or false; fix config.json")
    return value


def check_quantization_block(block: Any, source: str) -> None:
    """mlx-lm's block: {"group_size": 64, "bits": 4, "mode": "affine", "<layer path>": {...} | false}."""
    if not isinstance(block, dict):
        raise QwenMLXError(f"{source}: quantization is {block!r}, but must be an object like "
                           '{"group_size": 64, "bits": 4}; fix config.json')
    for key in ("group_size", "bits"):
        positive_int(block, key, f"{source} (quantization)")
    for name, layer in block.items():
        if isinstance(layer, dict):
            for key in ("group_size", "bits"):
                positive_int(layer, key, f"{source} (quantization of {name})")
        elif name not in ("group_size", "bits", "mode") and layer is not False:
            raise QwenMLXError(f"{source}: quantization entry {name!r} is {layer!r}; a layer's entry is an object "
                               "or false")


def _rope_settings(d: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from either config layout.

    Hub checkpoints write `rope_theta` + `rope_scaling`; transformers >= 5 saves both inside `rope_parameters`.
    """
    for key in ("rope_parameters", "rope_scaling"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise QwenMLXError(f"{source}: {key} is {d[key]!r}, but must be an object like "
                               '{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}')
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or params)
    theta = positive_number({**params, **d}, "rope_theta", source, 1_000_000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise QwenMLXError(
            f"{source}: rope scaling type {rope_type!r} is not supported; Qwen2.5 uses 'yarn' "
            f'(e.g. {{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})'
        )
    positive_number(scaling, "factor", f"{source} (yarn rope_scaling)", 0)
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = "yarn"
    return theta, scaling
