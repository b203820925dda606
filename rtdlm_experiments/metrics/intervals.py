"""95% bootstrap confidence intervals over prompts for the job metrics that are means over generations
(``nll_per_token``, ``perplexity``, ``mean_entropy``, ``mean_kept``, ``seq_rep_4``, ``rep_w16``,
``loop_rate``) or pooled statistics of them (``distinct_{1..4}``, ``distinct_{1..4}_words``).

Each metric ``m`` gets ``m_ci_low`` and ``m_ci_high``; the point estimate is the metric itself. Not
covered (too costly to recompute a thousand times, or not a statistic of the prompts): ``self_bleu_4``,
``compression_ratio``, ``zipf_coefficient`` and the speed metrics.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

from rtdlm_experiments.analysis.stats import (
    CONFIDENCE,
    RESAMPLES,
    SEED,
    Interval,
    bootstrap_ratio_ci,
    group_index,
    resample_counts,
)
from rtdlm_experiments.metrics._ngrams import ngrams
from rtdlm_experiments.metrics.repetition import ends_in_loop, repeats_within

CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
_SHARED_CELLS_PER_CHUNK = 20_000_000
"""Bound on the boolean (resamples × shared n-gram occurrences) block held at once by the distinct-n CI."""

RatioParts = tuple[list[float], list[float]]


def interval_entries(name: str, interval: Interval) -> dict[str, float]:
    """``{name_ci_low: ..., name_ci_high: ...}``.

    >>> interval_entries("loop_rate", Interval(0.2, 0.1, 0.3))
    {'loop_rate_ci_low': 0.1, 'loop_rate_ci_high': 0.3}
    """
    return {f"{name}{CI_LOW}": interval.low, f"{name}{CI_HIGH}": interval.high}


def row_ratio_parts(
    token_ids: Sequence[Sequence[int]],
    model_logprobs: Sequence[Sequence[float]],
    entropies: Sequence[Sequence[float]],
    num_kept: Sequence[Sequence[float]],
) -> dict[str, RatioParts]:
    """Per generation, each mean metric as (numerator, denominator), so that the job's value is
    Σ numerators / Σ denominators (token-weighted for the likelihood metrics and rep/16; seq-rep-4 leaves
    out generations shorter than 4 tokens with a denominator of 0).

    >>> parts = row_ratio_parts([[1, 1, 1, 1, 1, 1], [2, 3]], [], [], [])
    >>> parts["seq_rep_4"], parts["loop_rate"]
    (([0.6666666666666667, 0.0], [1.0, 0.0]), ([1.0, 0.0], [1.0, 1.0]))
    """
    parts: dict[str, RatioParts] = {}
    for name, rows, sign in (("nll_per_token", model_logprobs, -1.0), ("mean_entropy", entropies, 1.0),
                             ("mean_kept", num_kept, 1.0)):  # fmt: skip
        if rows:
            parts[name] = ([sign * math.fsum(row) for row in rows], [float(len(row)) for row in rows])
    seq_rep = [_seq_rep(seq, 4) for seq in token_ids]
    parts["seq_rep_4"] = ([value or 0.0 for value in seq_rep], [float(v is not None) for v in seq_rep])
    lengths = [float(len(seq)) for seq in token_ids]
    parts["rep_w16"] = ([float(repeats_within(seq, 16)) for seq in token_ids], lengths)
    parts["loop_rate"] = ([float(ends_in_loop(seq)) for seq in token_ids], [1.0] * len(token_ids))
    return parts


def _seq_rep(seq: Sequence[Hashable], n: int) -> float | None:
    if len(seq) < n:
        return None
    return 1.0 - len(set(ngrams(seq, n))) / (len(seq) - n + 1)


def ratio_intervals(
    parts: dict[str, RatioParts], groups: Sequence[Hashable], resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, float]:
    """CI entries of every ratio metric of ``parts`` (left out when its denominators sum to 0);
    ``perplexity`` = exp of ``nll_per_token``'s interval (the percentile interval follows monotone maps)."""
    entries: dict[str, float] = {}
    for name, (numerators, denominators) in parts.items():
        if sum(denominators) <= 0:
            continue
        interval = bootstrap_ratio_ci(numerators, denominators, groups, resamples=resamples, seed=seed)
        entries |= interval_entries(name, interval)
        if name == "nll_per_token":
            exp_interval = Interval(_exp(interval.estimate), _exp(interval.low), _exp(interval.high))
            entries |= interval_entries("perplexity", exp_interval)
    return entries


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def distinct_n_interval(
    sequences: Sequence[Sequence[Hashable]],
    groups: Sequence[Hashable],
    n: int,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    correct_bias: bool = False,
) -> Interval:
    """Pooled distinct-n (`rtdlm_experiments.metrics.distinct_n`) with the bootstrap CI of
    `rtdlm_experiments.analysis.stats.bootstrap_statistic_ci` (same draws, same values), vectorised: a
    resample's
    unique n-grams are those of the groups it draws at least once, its total counts a group drawn twice
    twice. N-grams of a single group are counted per group; only shared ones need a presence table.

    A prompt drawn twice duplicates its n-grams, so resampled distinct-n is biased low (the plain
    percentile interval can lie wholly below the estimate). ``correct_bias`` shifts the resampled values
    by that bias (their mean minus the estimate), clipped to [0, 1], before taking the percentiles.

    >>> interval = distinct_n_interval([[1, 2], [1, 2], [3, 4]], groups=[0, 0, 1], n=1, resamples=200)
    >>> interval.estimate, interval.low, interval.high
    (0.6666666666666666, 0.25, 0.6666666666666666)
    """
    index = group_index(groups)
    num_groups = int(index.max()) + 1 if len(index) else 0
    totals = np.zeros(num_groups)
    holders: dict[tuple[Hashable, ...], set[int]] = {}
    for seq, group in zip(sequences, index.tolist(), strict=True):
        if len(seq) >= n:
            totals[group] += len(seq) - n + 1
            for gram in ngrams(seq, n):
                holders.setdefault(gram, set()).add(group)
    if totals.sum() == 0:
        return Interval(0.0, 0.0, 0.0)
    single = np.zeros(num_groups)
    shared_groups: list[list[int]] = []
    for owners in holders.values():
        if len(owners) == 1:
            single[next(iter(owners))] += 1
        else:
            shared_groups.append(sorted(owners))
    draws = resample_counts(num_groups, resamples, seed)
    unique = (draws > 0) @ single + _shared_present(draws > 0, shared_groups)
    total = draws @ totals
    values = unique[total > 0] / total[total > 0]
    estimate = len(holders) / float(totals.sum())
    if correct_bias:  # a distinct-n ratio stays in [0, 1] after the shift
        values = np.clip(values - (values.mean() - estimate), 0.0, 1.0)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high))


def _shared_present(drawn: np.ndarray, shared_groups: list[list[int]]) -> np.ndarray:
    """For each resample (row of ``drawn``), how many shared n-grams have a holder among its groups."""
    if not shared_groups:
        return np.zeros(len(drawn))
    columns = np.fromiter((g for owners in shared_groups for g in owners), dtype=np.int64)
    starts = np.cumsum([0] + [len(owners) for owners in shared_groups[:-1]])
    chunk = max(1, _SHARED_CELLS_PER_CHUNK // len(columns))
    counts = [
        np.logical_or.reduceat(drawn[start : start + chunk][:, columns], starts, axis=1).sum(axis=1)
        for start in range(0, len(drawn), chunk)
    ]
    return np.concatenate(counts).astype(float)


def distinct_intervals(
    token_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    groups: Sequence[Hashable],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, float]:
    """CI entries of ``distinct_{1..4}`` (model tokens) and ``distinct_{1..4}_words`` (whitespace words),
    bias-corrected (see `distinct_n_interval`)."""
    words = [text.split() for text in texts]
    entries: dict[str, float] = {}
    for n in range(1, 5):
        for name, sequences in ((f"distinct_{n}", token_ids), (f"distinct_{n}_words", words)):
            interval = distinct_n_interval(
                sequences, groups, n, resamples=resamples, seed=seed, correct_bias=True
            )
            entries |= interval_entries(name, interval)
    return entries


def generation_intervals(
    token_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    model_logprobs: Sequence[Sequence[float]],
    entropies: Sequence[Sequence[float]],
    num_kept: Sequence[Sequence[float]],
    groups: Sequence[Hashable],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, float]:
    """Every CI entry this module covers, for one job's generations grouped by prompt."""
    if not token_ids:
        return {}
    parts = row_ratio_parts(token_ids, model_logprobs, entropies, num_kept)
    return ratio_intervals(parts, groups, resamples, seed) | distinct_intervals(
        token_ids, texts, groups, resamples, seed
    )
