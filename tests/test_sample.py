"""Sampling: each filter keeps exactly the tokens it should, seeds reproduce, top_k=1 is greedy."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from qwen_mlx import QwenMLXError, SamplingParams
from qwen_mlx.engine.sample import Sampler, apply_repetition_penalty, filter_logits

# A hand-made distribution over 6 tokens, most likely first: 0.4, 0.25, 0.15, 0.1, 0.06, 0.04.
# (Thresholds sit between cumulative masses, not on them: float32 cannot hold 0.4 + 0.25 exactly.)
PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
LOGITS = mx.array([[math.log(p) for p in PROBS]])


def kept(params: SamplingParams) -> list[int]:
    return np.nonzero(np.isfinite(np.array(filter_logits(LOGITS, params))[0]))[0].tolist()


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.39, [0]), (0.41, [0, 1]), (0.64, [0, 1]), (0.66, [0, 1, 2]), (0.9, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3, 4, 5])],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, expected: list[int]) -> None:
    assert kept(SamplingParams(temperature=1.0, top_p=top_p)) == expected


@pytest.mark.parametrize(("min_p", "expected"), [(0.1, [0, 1, 2, 3, 4, 5]), (0.2, [0, 1, 2, 3]), (0.5, [0, 1]),
                                                 (0.7, [0])])
def test_min_p_keeps_tokens_at_least_min_p_times_the_top(min_p: float, expected: list[int]) -> None:
    assert kept(SamplingParams(temperature=1.0, min_p=min_p)) == expected


def test_top_k_keeps_the_k_most_likely() -> None:
    assert kept(SamplingParams(temperature=1.0, top_k=3)) == [0, 1, 2]


def test_filters_compose_in_transformers_order() -> None:
    assert kept(SamplingParams(temperature=1.0, top_k=4, top_p=0.9, min_p=0.3)) == [0, 1, 2]


def test_top_p_matches_transformers_warper() -> None:
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    rng = np.random.RandomState(0)
    logits = rng.randn(4, 50).astype(np.float32) * 3
    for p in (0.3, 0.75, 0.95):
        theirs = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
        ours = np.array(filter_logits(mx.array(logits), SamplingParams(temperature=1.0, top_p=p)))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))


def test_repetition_penalty_matches_transformers() -> None:
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = np.random.RandomState(1).randn(1, 20).astype(np.float32)
    history = [3, 5, 5, 11]
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), torch.tensor(logits)).numpy()
    ours = np.array(apply_repetition_penalty(mx.array(logits), mx.array(history), 1.3))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_top_k_one_equals_greedy() -> None:
    logits = mx.array(np.random.RandomState(2).randn(1, 100).astype(np.float32))
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1), seed=123)
    assert {sampler(logits).item() for _ in range(20)} == {mx.argmax(logits).item()}


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    logits = mx.zeros((1, 1000))  # uniform: every draw is up to the PRNG

    def draws(seed: int) -> tuple[int, ...]:
        sampler = Sampler(SamplingParams(temperature=1.0), seed)
        return tuple(sampler(logits).item() for _ in range(8))

    assert draws(7) == draws(7)
    # Ten seeds, ten different sequences (two alike by chance: about 1 in 10^22).
    assert len({draws(seed) for seed in range(10)}) == 10
    assert len(set(draws(7))) > 1  # the key moves on between draws


def test_temperature_zero_is_greedy() -> None:
    logits = mx.array(np.random.RandomState(3).randn(1, 100).astype(np.float32))
    assert Sampler(SamplingParams(temperature=0.0))(logits).item() == mx.argmax(logits).item()


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"min_p": 1.0},
                                 {"repetition_penalty": 0}])
def test_bad_sampling_values_are_user_errors(bad: dict[str, float]) -> None:
    with pytest.raises(QwenMLXError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_sampler_draws_only_tokens_the_filters_keep() -> None:
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.9, min_p=0.3)
    sampler = Sampler(params, seed=0)
    draws = {sampler(LOGITS).item() for _ in range(200)}
    assert draws == set(kept(params)) == {0, 1, 2}
