"""The racing rule on synthetic objectives with known means: it prunes a clearly worse trial, and a trial
as good as the incumbent (the hardest case for "never prune the best") is pruned with probability at
most 1 - confidence over all its looks; the twin without the Bonferroni correction breaks that bound."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy.stats import binomtest

from rtdlm_experiments.search.racing import Race, should_prune
from sampling.decoding.base import GenerationOutput

PROMPTS = 40
CHUNK = 5  # 8 chunks: 7 looks
SAMPLES = 5


@dataclass(frozen=True)
class FakeRow:
    prompt_index: int
    sample_index: int


def per_prompt_scores(rng: np.random.Generator, difficulty: np.ndarray, shift: float) -> np.ndarray:
    """pass@1-like values: the mean of SAMPLES Bernoulli draws per prompt, at the prompt's rate + shift."""
    rates = np.clip(difficulty + shift, 0.0, 1.0)
    return rng.binomial(SAMPLES, rates) / SAMPLES


def race_once(seed: int, shift: float, sign: float = 1.0) -> Race:
    """One trial raced against an incumbent on the same prompts; ``shift`` is its true mean difference."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0.1, 0.9, PROMPTS)
    incumbent = per_prompt_scores(rng, difficulty, 0.0)
    trial = per_prompt_scores(rng, difficulty, shift)
    if sign < 0:  # a metric to minimize: the same race on negated values
        incumbent, trial = -incumbent, -trial
    rows = [FakeRow(p, s) for p in range(PROMPTS) for s in range(SAMPLES)]
    race = Race("pass_at_1", sign, dict(enumerate(incumbent.tolist())), CHUNK, confidence=0.95)

    def generate(chunk):
        return {"decoder": GenerationOutput(token_ids=[[1]] * len(chunk))}

    def score(chunk, _output):
        return {row.prompt_index: float(trial[row.prompt_index]) for row in chunk}

    race.run(rows, generate, score)
    return race


def naive_prunes(seed: int, shift: float) -> bool:
    """The broken twin: every look at the full 95% level, no correction for repeated looks."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0.1, 0.9, PROMPTS)
    incumbent = per_prompt_scores(rng, difficulty, 0.0)
    trial = per_prompt_scores(rng, difficulty, shift)
    for end in range(CHUNK, PROMPTS, CHUNK):
        if should_prune((trial[:end] - incumbent[:end]).tolist(), 0.95, planned_looks=1):
            return True
    return False


def test_a_clearly_worse_trial_is_pruned_early_and_saves_generations():
    races = [race_once(seed, shift=-0.3) for seed in range(200)]
    pruned = [race for race in races if race.pruned]
    assert len(pruned) >= 0.95 * len(races)
    saved = sum(race.metrics()["race_generations_saved"] for race in races)
    assert saved >= 0.5 * PROMPTS * SAMPLES * len(races)  # most stop within the first half
    for race in pruned:
        metrics = race.metrics()
        assert metrics["race_generations_used"] + metrics["race_generations_saved"] == PROMPTS * SAMPLES
        assert metrics["race_upper_bound"] < 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_trial_as_good_as_the_incumbent_is_pruned_at_most_5_percent_of_the_time(sign: float):
    trials = 2000
    pruned = sum(race_once(10_000 + seed, shift=0.0, sign=sign).pruned for seed in range(trials))
    # H0: P(prune) <= 0.05. Rejected only if the count is implausibly high (one-sided, alpha = 0.001).
    assert binomtest(pruned, trials, 0.05, alternative="greater").pvalue > 1e-3, pruned


def test_a_better_trial_is_almost_never_pruned():
    assert sum(race_once(seed, shift=0.1).pruned for seed in range(500)) <= 2


def test_the_uncorrected_twin_prunes_an_equal_trial_too_often():
    trials = 2000
    pruned = sum(naive_prunes(10_000 + seed, shift=0.0) for seed in range(trials))
    assert binomtest(pruned, trials, 0.05, alternative="greater").pvalue < 1e-3, pruned


def test_no_incumbent_means_no_pruning_but_every_prompt_is_scored():
    race = Race("pass_at_1", 1.0, {}, CHUNK)
    rows = [FakeRow(p, 0) for p in range(12)]
    done, outputs = race.run(
        rows,
        lambda chunk: {"decoder": GenerationOutput(token_ids=[[p.prompt_index] for p in chunk])},
        lambda chunk, _output: {row.prompt_index: 0.0 for row in chunk},
    )
    assert done == rows and not race.pruned and race.looks == 0
    assert outputs["decoder"].token_ids == [[p] for p in range(12)]
    assert sorted(race.scores) == list(range(12))
