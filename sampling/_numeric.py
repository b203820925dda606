"""Numeric helpers shared by the sampling core, the app's metrics and the benchmarks."""

from __future__ import annotations

import math


def ratio(numerator: float, denominator: float, undefined: float = math.nan) -> float:
    """``numerator / denominator``, with one rule for the cases where that is not a number.

    - A zero denominator means nothing was counted: the ratio is undefined and the result is
      ``undefined``, NaN by default, because a fake 0 would read as a measurement. A caller whose
      quantity is *defined* for empty input passes that value (distinct-n of no n-grams is 0.0).
    - A NaN in either argument gives NaN: a missing measurement stays missing.

    >>> ratio(3, 4)
    0.75
    >>> ratio(1, 0)
    nan
    >>> ratio(0, 0, undefined=0.0)
    0.0
    >>> ratio(1, float("nan"), undefined=0.0)
    nan
    """
    if math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator if denominator else undefined
