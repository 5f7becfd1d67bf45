"""A model's sampling defaults are what transformers' `generate()` would use with the same generation_config.json:
greedy unless it says `do_sample: true`, and transformers' own defaults for the fields it leaves out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwen_mlx.model.generation_config import SamplingParams

CONFIGS: dict[str, dict[str, Any] | None] = {
    "none at all": None,
    "what transformers writes for a GGUF import": {"bos_token_id": 151643, "eos_token_id": 151645},
    "do_sample false with a temperature": {"do_sample": False, "temperature": 0.7},
    "do_sample true, nothing else": {"do_sample": True},
    "Qwen2.5-Instruct's": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                           "repetition_penalty": 1.05},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_defaults_are_the_ones_transformers_generate_uses(name: str, tmp_path: Path) -> None:
    from transformers import GenerationConfig

    config = CONFIGS[name]
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    loaded = GenerationConfig.from_pretrained(tmp_path) if config is not None else GenerationConfig()
    # What generate() runs with: the fields the file leaves unset take transformers' global defaults.
    reference = {k: getattr(loaded, k) if getattr(loaded, k) is not None else v
                 for k, v in GenerationConfig._get_default_generation_params().items()}
    ours = SamplingParams.from_generation_config(tmp_path)
    assert ours.greedy == (not reference["do_sample"])
    assert ours.repetition_penalty == pytest.approx(reference["repetition_penalty"])
    if reference["do_sample"]:
        assert (ours.temperature, ours.top_p, ours.top_k) == pytest.approx(
            (reference["temperature"], reference["top_p"], reference["top_k"]))


def test_info_says_which_defaults_a_model_runs_with() -> None:
    assert SamplingParams.from_generation_config(Path("/nonexistent")).describe() == "greedy"
    qwen = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert qwen.describe() == "temperature 0.7, top_p 0.8, top_k 20, min_p 0, repetition_penalty 1.05"
