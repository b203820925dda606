"""The search space: the sweeper's ``params`` (and swept command-line overrides) as Optuna distributions,
in the official Hydra Optuna sweeper's syntax.

    sampling.temperature: interval(0.1, 1.5)          -> FloatDistribution(0.1, 1.5)
    sampling.top_k: int(interval(0, 100))             -> IntDistribution(0, 100)
    sampling.min_p: tag(log, interval(0.001, 0.3))    -> FloatDistribution(0.001, 0.3, log=True)
    sampling.order: choice(rtdlm, hf, vllm)           -> CategoricalDistribution
    sampling.top_p: 0.8,0.9,1.0                       -> CategoricalDistribution
    sampling.top_k: range(0, 100, 10)                 -> IntDistribution(0, 90, step=10)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from rtdlm_experiments.config.errors import ConfigError


@dataclass(frozen=True)
class SearchSpace:
    """What each trial samples (``distributions``) and the overrides every trial shares (``fixed``)."""

    distributions: dict[str, BaseDistribution]
    fixed: list[str]


def distribution(key: str, text: str) -> BaseDistribution | None:
    """The distribution ``key=text`` describes, or None for a plain (fixed) value.

    >>> distribution("t", "interval(0.1, 1.5)")
    FloatDistribution(high=1.5, log=False, low=0.1, step=None)
    >>> distribution("k", "int(interval(0, 100))")
    IntDistribution(high=100, log=False, low=0, step=1)
    >>> distribution("m", "tag(log, interval(0.001, 0.3))").log
    True
    >>> distribution("o", "choice(rtdlm, hf)").choices, distribution("p", "0.9,1.0").choices
    (('rtdlm', 'hf'), (0.9, 1.0))
    >>> distribution("k", "range(0, 100, 10)")
    IntDistribution(high=90, log=False, low=0, step=10)
    >>> distribution("t", "0.5") is None
    True
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(f"{key}={text}")
    except HydraException as err:
        raise ConfigError(f"hydra.sweeper.params.{key}={text!r} is invalid: {err}") from None
    if not override.is_sweep_override():
        return None
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        return _range_distribution(key, text, value)
    if isinstance(value, IntervalSweep):
        return _interval_distribution(key, text, value)
    raise ConfigError(f"hydra.sweeper.params.{key}={text!r} is invalid: use interval, choice or range")


def _interval_distribution(key: str, text: str, sweep: Any) -> BaseDistribution:
    low, high, log = sweep.start, sweep.end, "log" in sweep.tags
    if not low < high:
        raise ConfigError(f"hydra.sweeper.params.{key}={text!r} is invalid: the interval needs low < high")
    if log and low <= 0:
        raise ConfigError(f"hydra.sweeper.params.{key}={text!r} is invalid: a log interval needs low > 0")
    if isinstance(low, int) and isinstance(high, int):
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)


def _range_distribution(key: str, text: str, sweep: Any) -> BaseDistribution:
    values = [sweep.start, sweep.stop, sweep.step]
    if not all(isinstance(value, int) for value in values) or sweep.step <= 0 or sweep.stop <= sweep.start:
        raise ConfigError(f"hydra.sweeper.params.{key}={text!r} is invalid: use range(start, stop, step>0)")
    last = sweep.start + (sweep.stop - 1 - sweep.start) // sweep.step * sweep.step
    return IntDistribution(sweep.start, last, step=sweep.step)


def search_space(params: Mapping[str, Any], arguments: Sequence[str]) -> SearchSpace:
    """The space of ``params`` (the preset's) and the swept command-line ``arguments`` (which win over a
    preset's entry for the same key); every other argument is a fixed override of every trial.

    >>> space = search_space({"a": "interval(0, 1.0)", "b": "2"}, ["a=choice(1, 2)", "c=3"])
    >>> sorted(space.distributions), space.fixed
    (['a'], ['c=3', 'b=2'])
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    distributions: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    command_line = {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        command_line[override.get_key_element()] = override
    for key, text in (params or {}).items():
        if str(key) in command_line:
            continue
        found = distribution(str(key), str(text))
        if found is None:
            command_line.setdefault(str(key), None)
            fixed.append(f"{key}={text}")
        else:
            distributions[str(key)] = found
    for key, override in command_line.items():
        if override is None:
            continue
        swept = override.is_sweep_override()
        found = distribution(key, override.input_line.split("=", 1)[1]) if swept else None
        if found is None:
            fixed.insert(0, override.input_line)
        else:
            distributions[key] = found
    if not distributions:
        raise ConfigError("hydra.sweeper.params is invalid: it names no interval, choice or range to search")
    return SearchSpace(distributions, fixed)


def trial_overrides(params: Mapping[str, Any]) -> list[str]:
    """A trial's sampled values as Hydra overrides (strings quoted, floats rounded to 6 digits for
    readable run names; Optuna keeps the exact value).

    >>> trial_overrides({"sampling.temperature": 0.73456789, "sampling.order": "hf", "sampling.top_k": 5})
    ['sampling.temperature=0.734568', "sampling.order='hf'", 'sampling.top_k=5']
    """
    return [f"{key}={_literal(value)}" for key, value in params.items()]


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, float):
        return repr(round(value, 6))
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)
