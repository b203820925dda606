"""What a search optimizes and under which constraints, read from a job's metrics.

search.objectives=[quality/accuracy:max]                          one objective: the best config
search.objectives=[quality/pass_at_1:max,diversity/distinct_2:max]   several: the Pareto front
search.constraints=["diversity/distinct_2>=0.5"]                  feasible when every one holds
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.results.metric_names import plain_name, resolve_metric

_DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
_CONSTRAINT = re.compile(r"^\s*([\w/.\-]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Objective:
    """A job metric to maximize or minimize (``metric`` as written, plain or namespaced)."""

    metric: str
    direction: str

    @property
    def sign(self) -> float:
        """+1 when larger is better: ``sign * value`` is always maximized."""
        return 1.0 if self.direction == "maximize" else -1.0

    def value(self, metrics: Mapping[str, float]) -> float:
        return metric_value(metrics, self.metric, "search.objectives")


@dataclass(frozen=True)
class Constraint:
    """``metric >= bound`` or ``metric <= bound``."""

    metric: str
    operator: str
    bound: float

    def violation(self, metrics: Mapping[str, float]) -> float:
        """Optuna's convention: <= 0 when satisfied, else by how much it is missed.

        >>> Constraint("distinct_2", ">=", 0.5).violation({"distinct_2": 0.4})
        0.09999999999999998
        >>> Constraint("distinct_2", "<=", 0.5).violation({"distinct_2": 0.4}) <= 0
        True
        """
        value = metric_value(metrics, self.metric, "search.constraints")
        return self.bound - value if self.operator == ">=" else value - self.bound

    def __str__(self) -> str:
        return f"{self.metric}{self.operator}{self.bound:g}"


def metric_value(metrics: Mapping[str, float], name: str, field: str) -> float:
    """``metrics[name]`` by plain or namespaced name; a missing or undefined one is a config error."""
    column = resolve_metric(name, metrics)
    value = metrics.get(column) if column else None
    if value is None or not math.isfinite(float(value)):
        known = ", ".join(sorted(name for name in metrics if not name.endswith(("_ci_low", "_ci_high"))))
        raise ConfigError(f"{field}: the job has no defined metric {name!r}; it has: {known}")
    return float(value)


def parse_objectives(items: Sequence[str], default_direction: str | None = None) -> list[Objective]:
    """``["quality/accuracy:max"]`` → objectives; a metric without ``:max``/``:min`` takes
    ``default_direction`` (the sweeper's ``direction``).

    >>> [o.direction for o in parse_objectives(["quality/accuracy:max", "diversity/distinct_2:min"])]
    ['maximize', 'minimize']
    >>> parse_objectives(["pass_at_1"], "maximize")[0].direction
    'maximize'
    """
    if not items:
        raise ConfigError(
            "search.objectives=[] is invalid: a search needs at least one, e.g. [quality/pass_at_1:max]"
        )
    objectives = []
    for item in items:
        metric, _, direction = str(item).rpartition(":") if ":" in str(item) else (str(item), "", "")
        direction = direction or default_direction or ""
        if direction not in _DIRECTIONS or not metric:
            raise ConfigError(
                f"search.objectives: {item!r} is invalid: use METRIC:max or METRIC:min "
                "(e.g. quality/pass_at_1:max)"
            )
        objectives.append(Objective(metric, _DIRECTIONS[direction]))
    if len({plain_name(objective.metric) for objective in objectives}) < len(objectives):
        raise ConfigError(f"search.objectives={list(items)} is invalid: a metric is named twice")
    return objectives


def parse_constraints(items: Sequence[str]) -> list[Constraint]:
    """``["diversity/distinct_2>=0.5"]`` → constraints.

    >>> [str(c) for c in parse_constraints(["diversity/distinct_2>=0.5", "repetition/loop_rate <= 0.1"])]
    ['diversity/distinct_2>=0.5', 'repetition/loop_rate<=0.1']
    """
    constraints = []
    for item in items or ():
        match = _CONSTRAINT.match(str(item))
        if match is None:
            raise ConfigError(
                f"search.constraints: {item!r} is invalid: use METRIC>=NUMBER or METRIC<=NUMBER "
                "(e.g. diversity/distinct_2>=0.5)"
            )
        try:
            bound = float(match.group(3))
        except ValueError:
            message = f"search.constraints: {item!r} is invalid: {match.group(3)!r} is no number"
            raise ConfigError(message) from None
        constraints.append(Constraint(match.group(1), match.group(2), bound))
    return constraints
