"""Repetition within generations: seq-rep-n, rep/ℓ, trailing loops, Zipf coefficient."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from rtdlm_experiments.metrics._ngrams import ngrams, ratio

ZIPF_TOP_TYPES = 5000


def seq_rep_n(sequences: Sequence[Sequence[Hashable]], n: int = 4) -> float:
    """seq-rep-n (Welleck et al. 2020, "Neural Text Generation with Unlikelihood Training"): mean over
    sequences of ``1 - |unique n-grams| / |n-grams|`` within the sequence.

    Sequences shorter than ``n`` have no n-grams and are left out of the mean; 0.0 when none is left.
    """
    values = [1.0 - len(set(ngrams(seq, n))) / (len(seq) - n + 1) for seq in sequences if len(seq) >= n]
    return ratio(sum(values), len(values))


def rep_window(sequences: Sequence[Sequence[Hashable]], window: int = 16) -> float:
    """rep/ℓ (Welleck et al. 2020) pooled over all sequences: the fraction of tokens ``x_t`` that occur
    among ``x_{t-ℓ}, ..., x_{t-1}`` of the same sequence (only generated tokens; the first token of a
    sequence never counts as a repeat). 0.0 when there are no tokens.
    """
    repeated = sum(repeats_within(seq, window) for seq in sequences)
    return ratio(repeated, sum(len(seq) for seq in sequences))


def repeats_within(seq: Sequence[Hashable], window: int = 16) -> int:
    """How many tokens of ``seq`` occur among the ``window`` tokens before them (rep/ℓ's numerator).

    >>> repeats_within(["a", "b", "a", "c", "a"], window=2)
    2
    """
    repeated = 0
    last_seen: dict[Hashable, int] = {}
    for t, token in enumerate(seq):
        previous = last_seen.get(token)
        if previous is not None and t - previous <= window:
            repeated += 1
        last_seen[token] = t
    return repeated


def ends_in_loop(
    seq: Sequence[Hashable], max_period: int = 20, min_repeats: int = 3, min_tokens: int = 6
) -> bool:
    """Whether ``seq`` ends with some phrase of p = 1..``max_period`` tokens repeated k times back to back,
    the last copy ending at the last token, with ``k >= min_repeats`` and ``k * p >= min_tokens``.

    Equivalently: for some p, the last ``max(min_repeats * p, ceil(min_tokens / p) * p)`` tokens have period
    p. With the defaults ``a a a a a a`` and ``c a b a b a b`` are loops; ``a b a b a`` (2.5 copies) is not.
    """
    seq = list(seq)
    length = len(seq)
    for period in range(1, max_period + 1):
        repeats = max(min_repeats, -(-min_tokens // period))
        span = repeats * period
        if span > length:
            continue
        start = length - span
        # The last `span` tokens are `repeats` copies of one phrase iff they have period `period`.
        if seq[start : length - period] == seq[start + period : length]:
            return True
    return False


def loop_rate(
    sequences: Sequence[Sequence[Hashable]], max_period: int = 20, min_repeats: int = 3, min_tokens: int = 6
) -> float:
    """Fraction of sequences for which :func:`ends_in_loop` holds. 0.0 when there are no sequences."""
    loops = sum(ends_in_loop(seq, max_period, min_repeats, min_tokens) for seq in sequences)
    return ratio(loops, len(sequences))


def zipf_coefficient_from_counts(counts: Iterable[int], top_types: int = ZIPF_TOP_TYPES) -> float:
    """−slope of the least-squares line of ``log(frequency)`` on ``log(rank)`` over the ``top_types`` most
    frequent types (ranks 1, 2, ...; Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").
    0.0 with fewer than two types (no slope).
    """
    freq = np.sort(np.fromiter((c for c in counts if c > 0), dtype=np.float64))[::-1][:top_types]
    if freq.size < 2:
        return 0.0
    log_rank = np.log(np.arange(1, freq.size + 1, dtype=np.float64))
    slope = np.polyfit(log_rank, np.log(freq), 1)[0]
    return float(-slope)


def zipf_coefficient(sequences: Sequence[Sequence[Hashable]], top_types: int = ZIPF_TOP_TYPES) -> float:
    """:func:`zipf_coefficient_from_counts` on the token counts pooled over all sequences."""
    counts: Counter[Hashable] = Counter()
    for seq in sequences:
        counts.update(seq)
    return zipf_coefficient_from_counts(counts.values(), top_types)


def repetition_metrics(token_ids: Sequence[Sequence[int]]) -> dict[str, float]:
    """``seq_rep_4``, ``rep_w16``, ``loop_rate`` and ``zipf_coefficient``, all on model tokens."""
    return {
        "seq_rep_4": seq_rep_n(token_ids, 4),
        "rep_w16": rep_window(token_ids, 16),
        "loop_rate": loop_rate(token_ids),
        "zipf_coefficient": zipf_coefficient(token_ids),
    }
