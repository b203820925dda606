"""Small helpers shared by the metric families."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from functools import partial

from sampling._numeric import ratio as _ratio


def ngrams(seq: Sequence[Hashable], n: int) -> Iterator[tuple[Hashable, ...]]:
    """The ``len(seq) - n + 1`` contiguous n-grams of ``seq`` (none when it is shorter than ``n``)."""
    return zip(*(seq[i:] for i in range(n)), strict=False)


ratio = partial(_ratio, undefined=0.0)
"""`sampling._numeric.ratio` with the metric families' documented value for empty input: 0.0."""
