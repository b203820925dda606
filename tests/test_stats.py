"""Bootstrap intervals over prompts and paired comparisons: coverage on synthetic data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from rtdlm_experiments.analysis.stats import (
    bootstrap_mean_ci,
    bootstrap_statistic_ci,
    paired_comparison,
    resample_counts,
)


def synthetic_run(seed: int, prompts: int = 30, samples: int = 4, shift: float = 0.0):
    """Rows of a run whose true mean is ``shift``: a per-prompt effect shared by its samples (so they are
    correlated) plus per-sample noise."""
    rng = np.random.default_rng(seed)
    prompt_effect = rng.normal(0.0, 1.0, prompts)
    values = prompt_effect[:, None] + rng.normal(0.0, 1.0, (prompts, samples)) + shift
    groups = np.repeat(np.arange(prompts), samples)
    return values.ravel(), groups


def coverage(repetitions: int, rows_as_groups: bool = False) -> float:
    hits = 0
    for seed in range(repetitions):
        values, groups = synthetic_run(seed)
        labels = np.arange(len(values)) if rows_as_groups else groups
        hits += bootstrap_mean_ci(values, labels, resamples=1000, seed=seed).contains(0.0)
    return hits / repetitions


@pytest.mark.slow
def test_interval_over_prompts_covers_the_true_mean_about_95_percent_of_the_time():
    assert 0.90 <= coverage(400) <= 0.98


@pytest.mark.slow
def test_resampling_rows_instead_of_prompts_would_undercover():
    assert coverage(200, rows_as_groups=True) < 0.85


def test_interval_is_reproducible_and_brackets_the_estimate():
    values, groups = synthetic_run(seed=1)
    first = bootstrap_mean_ci(values, groups, seed=7)
    assert first == bootstrap_mean_ci(values, groups, seed=7)
    assert first.low < first.estimate < first.high
    assert first.estimate == pytest.approx(values.mean())
    assert bootstrap_mean_ci(values, groups, seed=8) != first


def test_resample_counts_draw_every_group_equally_often_on_average():
    counts = resample_counts(5, resamples=4000, seed=3)
    assert counts.shape == (4000, 5)
    assert (counts.sum(axis=1) == 5).all()
    assert np.allclose(counts.mean(axis=0), 1.0, atol=0.05)


def test_pooled_statistic_of_the_flattened_mean_agrees_with_the_mean_interval():
    values, groups = synthetic_run(seed=2, prompts=12, samples=3)
    prompt_groups = [values[groups == g].tolist() for g in range(12)]
    pooled = bootstrap_statistic_ci(
        prompt_groups, lambda drawn: float(np.mean([x for group in drawn for x in group])), resamples=500
    )
    direct = bootstrap_mean_ci(values, groups, resamples=500)
    assert pooled.estimate == pytest.approx(direct.estimate)
    assert (pooled.low, pooled.high) == pytest.approx((direct.low, direct.high))


def test_pooled_statistic_sees_groups_drawn_twice():
    distinct_share = lambda drawn: len({x for group in drawn for x in group}) / sum(len(g) for g in drawn)  # noqa: E731
    interval = bootstrap_statistic_ci([["a", "b"], ["c", "d"], ["e", "f"]], distinct_share, resamples=300)
    assert interval.estimate == 1.0
    assert interval.low < 1.0  # a resample drawing a prompt twice repeats its words


def as_rows(values: np.ndarray, groups: np.ndarray) -> dict[tuple[int, int], float]:
    rows, seen = {}, {}
    for value, group in zip(values.tolist(), groups.tolist(), strict=True):
        sample = seen[group] = seen.get(group, -1) + 1
        rows[(group, sample)] = value
    return rows


def test_paired_comparison_detects_a_real_shift():
    base, groups = synthetic_run(seed=5)
    noise = np.random.default_rng(6).normal(0.0, 0.3, base.shape)
    comparison = paired_comparison(as_rows(base, groups), as_rows(base + 0.5 + noise, groups))
    assert not comparison.within_noise
    assert comparison.low > 0.0 and comparison.p_value < 0.01
    assert comparison.difference == pytest.approx(0.5 + noise.mean())
    assert "B is higher" in comparison.verdict("score")


def test_paired_comparison_calls_a_null_difference_within_noise():
    base, groups = synthetic_run(seed=5)
    other = base + np.random.default_rng(9).normal(0.0, 0.3, base.shape)
    comparison = paired_comparison(as_rows(base, groups), as_rows(other, groups))
    assert comparison.within_noise
    assert comparison.p_value > 0.05
    assert comparison.verdict("score").endswith("within noise")


def test_paired_comparison_uses_only_shared_rows_and_needs_some():
    a = {("p", 0): 1.0, ("p", 1): 0.0, ("q", 0): 5.0}
    b = {("p", 0): 2.0, ("p", 1): 1.0, ("r", 0): 5.0}
    comparison = paired_comparison(a, b, resamples=100)
    assert (comparison.pairs, comparison.difference) == (2, 1.0)
    with pytest.raises(ValueError, match="share no"):
        paired_comparison({("p", 0): 1.0}, {("q", 0): 1.0})
