"""Small helpers shared by the metric families."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence


def ngrams(seq: Sequence[Hashable], n: int) -> Iterator[tuple[Hashable, ...]]:
    """The ``len(seq) - n + 1`` contiguous n-grams of ``seq`` (none when it is shorter than ``n``)."""
    return zip(*(seq[i:] for i in range(n)), strict=False)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or 0.0 when the denominator is 0 (the defined value for empty input)."""
    return numerator / denominator if denominator else 0.0
