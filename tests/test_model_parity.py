"""Our logits and greedy tokens against transformers (the reference) and mlx-lm, on random tiny Qwen2 models."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from hf_models import load_hf, save_tiny_qwen2

import qwen_mlx
from qwen_mlx.model.cache import make_cache

CONFIGS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    "gqa_8_over_1": {"num_attention_heads": 8, "num_key_value_heads": 1},
    "mha_4_over_4": {"num_attention_heads": 4, "num_key_value_heads": 4},
    "gqa_7_over_1_like_7b": {"hidden_size": 56, "num_attention_heads": 7, "num_key_value_heads": 1},
    # The seed model card's long-context setting, scaled down so that tiny test sequences reach past it.
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
             "max_position_embeddings": 256},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


def random_ids(length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 300, (2, length))


def test_logits_match_transformers(checkpoint: Path) -> None:
    model, _ = qwen_mlx.load(checkpoint)
    ids = random_ids(150)
    ours = np.array(model(mx.array(ids)))
    with torch.no_grad():
        reference = load_hf(checkpoint)(torch.tensor(ids)).logits.numpy()
    assert ours.shape == reference.shape == (2, 150, 320)
    assert np.abs(ours - reference).max() <= 1e-4


def test_incremental_decoding_with_cache_equals_full_forward(checkpoint: Path) -> None:
    model, _ = qwen_mlx.load(checkpoint)
    ids = random_ids(40, seed=1)[:1]
    full = np.array(model(mx.array(ids)))
    cache = make_cache(model)
    pieces = [model(mx.array(ids[:, :25]), cache=cache)]
    pieces += [model(mx.array(ids[:, i : i + 1]), cache=cache) for i in range(25, 40)]
    incremental = np.concatenate([np.array(p) for p in pieces], axis=1)
    assert np.abs(incremental - full).max() <= 1e-4


def test_greedy_tokens_match_transformers_generate(checkpoint: Path) -> None:
    model, tokenizer = qwen_mlx.load(checkpoint)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me the news"}]
    result = qwen_mlx.generate(model, tokenizer, messages, temperature=0, max_tokens=40)
    prompt = tokenizer.apply_chat_template(messages, tokenize=True)
    with torch.no_grad():
        out = load_hf(checkpoint).generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=40,
            eos_token_id=tokenizer.eos_token_ids, pad_token_id=tokenizer.eos_token_ids[-1],
        )
    reference = out[0, len(prompt) :].tolist()
    if reference[-1] in tokenizer.eos_token_ids:
        reference = reference[:-1]
    assert len(result.tokens) >= 32 or result.finish_reason == "stop"
    assert result.tokens == reference


def test_bfloat16_checkpoint_matches_transformers_in_bfloat16(tmp_path: Path) -> None:
    folder = save_tiny_qwen2(tmp_path, dtype="bfloat16")
    model, _ = qwen_mlx.load(folder)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    ids = random_ids(20)
    ours = np.array(model(mx.array(ids)).astype(mx.float32))
    from transformers import Qwen2ForCausalLM

    with torch.no_grad():
        reference = Qwen2ForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)(torch.tensor(ids))
    reference = reference.logits.float().numpy()
    # bfloat16 keeps 8 bits of mantissa: compare relative to the logits' scale.
    assert np.abs(ours - reference).max() <= 0.05 * np.abs(reference).max()


def test_logits_match_mlx_lm_on_the_same_folder(tmp_path: Path) -> None:
    import mlx_lm

    # transformers >= 5 writes rope_theta inside rope_parameters, which mlx-lm does not read (it falls back to
    # 1e6): use Qwen2's own 1e6 so both sides run the same model.
    folder = save_tiny_qwen2(tmp_path, tie_word_embeddings=False, rope_theta=1e6)
    ours, _ = qwen_mlx.load(folder)
    theirs, _ = mlx_lm.load(str(folder))
    ids = mx.array(random_ids(64))
    assert np.abs(np.array(ours(ids)) - np.array(theirs(ids))).max() <= 1e-5


def test_yarn_frequencies_equal_transformers() -> None:
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qwen_mlx.model.rope import yarn_parameters

    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    config = Qwen2Config(hidden_size=3584, num_attention_heads=28, rope_theta=1e6, max_position_embeddings=32768,
                         rope_scaling=scaling)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours, our_factor = yarn_parameters(128, 1e6, scaling, 32768)
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
    assert our_factor == pytest.approx(factor)
    assert our_factor == pytest.approx(0.1 * np.log(4.0) + 1)
