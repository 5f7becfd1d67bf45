"""SamplingParams: a model's own sampling defaults (its generation_config.json), and what a request overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import read_json


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise QwenMLXError(f"{name} must be a finite number, not {value!r}", name)
    return value


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            _number(name, getattr(self, name))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise QwenMLXError(f"top_k must be an integer, not {self.top_k!r}", "top_k")
        if self.temperature < 0:
            raise QwenMLXError(f"temperature {self.temperature} must be >= 0 (0 means greedy)", "temperature")
        if not 0 < self.top_p <= 1:
            raise QwenMLXError(f"top_p {self.top_p} must be in (0, 1]", "top_p")
        if self.top_k < 0:
            raise QwenMLXError(f"top_k {self.top_k} must be >= 0 (0 turns it off)", "top_k")
        if not 0 <= self.min_p < 1:
            raise QwenMLXError(f"min_p {self.min_p} must be in [0, 1)", "min_p")
        if self.repetition_penalty <= 0:
            raise QwenMLXError(f"repetition_penalty {self.repetition_penalty} must be > 0 (1 turns it off)",
                               "repetition_penalty")

    def updated(self, **overrides: Any) -> SamplingParams:
        """These params with the given fields replaced; None values leave a field as it is."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, folder: str | Path) -> SamplingParams:
        """The model's own defaults (generation_config.json), as transformers applies them.

        Qwen2.5-Instruct ships `do_sample: true` with temperature 0.7, top_p 0.8, top_k 20, repetition_penalty
        1.05. As in transformers, `do_sample` defaults to false: a config without it (what transformers writes for
        a GGUF-derived model, and many fine-tunes ship), or no config at all, means greedy; sampling fields it
        leaves out take transformers' defaults (temperature 1, top_p 1, top_k 50).
        """
        path = Path(folder) / "generation_config.json"
        g = read_json(path) if path.exists() else {}
        try:
            params = TRANSFORMERS_DEFAULTS.updated(
                temperature=g.get("temperature"),
                top_p=g.get("top_p"),
                top_k=g.get("top_k"),
                min_p=g.get("min_p"),
                repetition_penalty=g.get("repetition_penalty"),
            )
        except QwenMLXError as e:
            raise QwenMLXError(f"{path}: {e}; fix or remove that entry") from None
        return params if g.get("do_sample") is True else params.updated(temperature=0.0)

    def describe(self) -> str:
        """One line for `qwen-mlx info`: greedy, or the sampling settings."""
        penalty = f"repetition_penalty {self.repetition_penalty:g}"
        if self.greedy:
            return "greedy" if self.repetition_penalty == 1 else f"greedy, {penalty}"
        return (f"temperature {self.temperature:g}, top_p {self.top_p:g}, top_k {self.top_k or 'off'}, "
                f"min_p {self.min_p:g}, {penalty}")


# GenerationConfig's own defaults in transformers, for the fields a generation_config.json leaves out.
TRANSFORMERS_DEFAULTS = SamplingParams(temperature=1.0, top_p=1.0, top_k=50, min_p=0.0, repetition_penalty=1.0)
