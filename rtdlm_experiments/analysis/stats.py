"""Error bars over prompts: percentile-bootstrap confidence intervals and paired comparisons of two runs.

The unit of resampling is the prompt: the samples of one prompt share it, so they are correlated and move
together (resampling rows instead would make intervals too narrow). One resample draws as many prompts as
there are, with replacement; a statistic is recomputed on the drawn prompts' rows; the interval is the
``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the recomputed values (the percentile
bootstrap, Efron & Tibshirani 1993, ch. 13). Seeds are fixed, so an interval is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0

Group = TypeVar("Group")


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def resample_counts(num_groups: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(resamples, num_groups)`` counts: how often each group is drawn in each resample (each row sums
    to ``num_groups``).

    >>> counts = resample_counts(4, resamples=3)
    >>> counts.shape, counts.sum(axis=1).tolist()
    ((3, 4), [4, 4, 4])
    """
    if num_groups < 1:
        raise ValueError("the bootstrap needs at least one group")
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_groups, np.full(num_groups, 1.0 / num_groups), size=resamples)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _group_totals(values: Sequence[float], groups: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    if len(values) != len(groups):
        raise ValueError(f"{len(values)} values but {len(groups)} group labels")
    index = group_index(groups)
    sums = np.bincount(index, weights=np.asarray(values, dtype=float))
    return sums, np.bincount(index).astype(float)


def bootstrap_mean_ci(
    values: Sequence[float],
    groups: Sequence[Hashable],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """The mean of ``values`` (one per row) with a bootstrap CI that resamples the rows' ``groups``
    (prompts) whole.

    >>> interval = bootstrap_mean_ci([1.0, 1.0, 0.0, 0.0], groups=["a", "a", "b", "b"])
    >>> interval.estimate, interval.low, interval.high
    (0.5, 0.0, 1.0)
    """
    sums, counts = _group_totals(values, groups)
    draws = resample_counts(len(sums), resamples, seed)
    means = (draws @ sums) / (draws @ counts)
    return Interval(float(sums.sum() / counts.sum()), *_percentiles(means, confidence))


def bootstrap_ratio_ci(
    numerators: Sequence[float],
    denominators: Sequence[float],
    groups: Sequence[Hashable],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """``Σ numerators / Σ denominators`` over rows (a token-weighted mean: a row's summed values over its
    token count; or a mean over the rows that have a value: denominator 0 leaves a row out) with a
    bootstrap CI that resamples the rows' ``groups`` whole. Resamples whose denominators sum to 0 are
    ignored.

    >>> interval = bootstrap_ratio_ci([3.0, 0.0, 2.0], [3.0, 0.0, 4.0], groups=["a", "b", "c"])
    >>> round(interval.estimate, 4), interval.low, interval.high
    (0.7143, 0.5, 1.0)
    """
    if not len(numerators) == len(denominators) == len(groups):
        raise ValueError(
            f"{len(numerators)} numerators, {len(denominators)} denominators, {len(groups)} group labels"
        )
    index = group_index(groups)
    top = np.bincount(index, weights=np.asarray(numerators, dtype=float))
    bottom = np.bincount(index, weights=np.asarray(denominators, dtype=float))
    if bottom.sum() <= 0:
        raise ValueError("the denominators sum to 0: no ratio to estimate")
    draws = resample_counts(len(top), resamples, seed)
    drawn_bottom = draws @ bottom
    ratios = (draws @ top)[drawn_bottom > 0] / drawn_bottom[drawn_bottom > 0]
    return Interval(float(top.sum() / bottom.sum()), *_percentiles(ratios, confidence))


def group_index(groups: Sequence[Hashable]) -> np.ndarray:
    """Each row's group as 0, 1, ... in order of first appearance.

    >>> group_index(["b", "a", "b"]).tolist()
    [0, 1, 0]
    """
    numbering: dict[Hashable, int] = {}
    return np.array([numbering.setdefault(group, len(numbering)) for group in groups], dtype=np.int64)


def bootstrap_statistic_ci(
    groups: Sequence[Group],
    statistic: Callable[[list[Group]], float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """A pooled ``statistic`` of all ``groups`` (e.g. distinct-n over every generation of every prompt,
    one group = one prompt's generations) with a bootstrap CI: the statistic is recomputed on each
    resample's list of groups (a group drawn twice appears twice).

    >>> pooled_mean = lambda drawn: float(np.mean([x for group in drawn for x in group]))
    >>> bootstrap_statistic_ci([[1.0, 1.0], [0.0, 0.0]], pooled_mean, resamples=200)
    Interval(estimate=0.5, low=0.0, high=1.0)
    """
    draws = resample_counts(len(groups), resamples, seed)
    values = np.array(
        [statistic([group for group, n in zip(groups, row, strict=True) for _ in range(n)]) for row in draws]
    )
    return Interval(float(statistic(list(groups))), *_percentiles(values, confidence))


MIN_PAIRED_PROMPTS = 10
"""Fewest prompts a paired comparison calls a difference with. The bootstrap resamples prompts whole, so
its noise estimate comes from the spread between prompts: one prompt has none (every resample is the
same, and any difference looks certain); with a few, the percentile bootstrap's interval is too narrow
(its variance is (n-1)/n of the sample's, read with normal rather than t quantiles: at 10 prompts the
t quantile is still 15% wider) and an exact sign test over n prompts cannot reach p < 0.05 below 6. Ten
keeps the undercoverage modest while letting a consistent effect reach p ≈ 0.002."""


@dataclass(frozen=True)
class PairedComparison:
    """``B - A`` over the rows both runs have, with its paired-bootstrap CI and two-sided p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    pairs: int
    confidence: float = CONFIDENCE
    prompts: int | None = None
    """Distinct prompts among the pairs (None: one per pair)."""

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high

    @property
    def too_few_prompts(self) -> bool:
        return (self.pairs if self.prompts is None else self.prompts) < MIN_PAIRED_PROMPTS

    def verdict(self, metric: str = "the metric") -> str:
        """A plain-language reading.

        >>> PairedComparison(0.1, -0.05, 0.2, 0.3, 40).verdict("pass_at_1")
        'pass_at_1: B - A = +0.1 (95% CI -0.05 to +0.2, p = 0.3, 40 pairs): within noise'
        >>> PairedComparison(-0.2, -0.3, -0.1, 0.001, 40).verdict("loop_rate")
        'loop_rate: B - A = -0.2 (95% CI -0.3 to -0.1, p = 0.001, 40 pairs): B is lower'
        >>> PairedComparison(-2.0, -2.0, -2.0, 0.0005, 1, prompts=1).verdict("new_tokens")
        'new_tokens: B - A = -2 (1 pairs over 1 prompt): too few prompts to tell (at least 10 needed)'
        """
        if self.too_few_prompts:
            prompts = self.pairs if self.prompts is None else self.prompts
            over = f"{prompts} prompt{'s' if prompts != 1 else ''}"
            return (
                f"{metric}: B - A = {self.difference:+.4g} ({self.pairs} pairs over {over}): too few prompts "
                f"to tell (at least {MIN_PAIRED_PROMPTS} needed)"
            )
        reading = (
            "within noise" if self.within_noise else ("B is higher" if self.difference > 0 else "B is lower")
        )
        return (
            f"{metric}: B - A = {self.difference:+.4g} ({self.confidence:.0%} CI {self.low:+.4g} to "
            f"{self.high:+.4g}, p = {self.p_value:.2g}, {self.pairs} pairs): {reading}"
        )


def paired_comparison(
    a: Mapping[tuple[Hashable, Any], float],
    b: Mapping[tuple[Hashable, Any], float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> PairedComparison:
    """Compare two runs row by row: ``a`` and ``b`` map ``(prompt, sample)`` to a metric value; rows
    present in both are paired, their differences ``b - a`` averaged, and prompts resampled whole.

    The p-value is the two-sided bootstrap test of "no difference": the share of resampled differences
    at least as far from the observed one as the observed one is from 0 (the bootstrap distribution
    shifted to the null), with the usual ``+1`` so that it is never 0.

    >>> a = {("p1", 0): 0.0, ("p1", 1): 1.0, ("p2", 0): 0.0, ("p3", 0): 1.0}
    >>> b = {("p1", 0): 1.0, ("p1", 1): 1.0, ("p2", 0): 1.0, ("p9", 0): 1.0}
    >>> comparison = paired_comparison(a, b, resamples=500)
    >>> comparison.pairs, round(comparison.difference, 4)
    (3, 0.6667)
    """
    keys = [key for key in a if key in b]
    if not keys:
        raise ValueError("the two runs share no (prompt, sample) rows")
    differences = [b[key] - a[key] for key in keys]
    sums, counts = _group_totals(differences, [key[0] for key in keys])
    observed = float(sums.sum() / counts.sum())
    draws = resample_counts(len(sums), resamples, seed)
    resampled = (draws @ sums) / (draws @ counts)
    extreme = np.count_nonzero(np.abs(resampled - observed) >= abs(observed) - 1e-12)
    p_value = (extreme + 1) / (resamples + 1)
    low, high = _percentiles(resampled, confidence)
    return PairedComparison(observed, low, high, min(1.0, p_value), len(keys), confidence, len(sums))
