"""Drift between two runs of the same sweep: which key metrics of the same jobs moved beyond a tolerance.

Jobs are matched by config hash, so only like is compared with like (same model, sampling, decoder,
prompts, seed...), whatever their run names or order. Pure computation: the caller fetches the runs and
logs the result (`rtdlm_experiments.schedule`).

A tolerance is ``ABS``, ``REL%`` or ``ABS+REL%`` (``0.02``, ``25%``, ``0.01+5%``): a change is drift when
``|current - previous| > ABS + REL * |previous|`` (numpy's ``isclose`` rule); ``off`` skips the metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rtdlm_experiments.analysis.report import to_markdown
from rtdlm_experiments.results.metric_names import plain_metrics, plain_name


@dataclass(frozen=True)
class Tolerance:
    """How far a metric may move between two runs of the same job before it counts as drift."""

    absolute: float = 0.0
    relative: float = 0.0

    def allows(self, previous: float, current: float) -> bool:
        """Whether the change is within tolerance (NaN equals only NaN: a metric that appears or
        disappears is drift)."""
        if math.isnan(previous) or math.isnan(current):
            return math.isnan(previous) and math.isnan(current)
        return abs(current - previous) <= self.absolute + self.relative * abs(previous)

    def __str__(self) -> str:
        parts = [f"{self.absolute:g}"] if self.absolute or not self.relative else []
        if self.relative:
            parts.append(f"{self.relative * 100:g}%")
        return "+".join(parts)


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "acceptance_rate": Tolerance(absolute=0.05),
    "speedup": Tolerance(relative=0.20),
    "tokens_per_second": Tolerance(relative=0.25),
    "distinct_2": Tolerance(absolute=0.02),
    "perplexity": Tolerance(relative=0.05),
}
"""Generation-quality metrics are deterministic for a fixed config and code, so their tolerances only
absorb numerical noise across hardware; speed is noisy, so its tolerances are wide."""


def parse_tolerance(text: str | float | None) -> Tolerance | None:
    """``0.02`` → absolute, ``25%`` → relative, ``0.01+5%`` → both, ``off`` → None (not compared)."""
    if text is False or text is None:  # YAML reads a bare ``off`` as false
        return None
    if isinstance(text, int | float):
        text = str(text)
    spec = text.strip().lower()
    if spec == "off":
        return None
    values: dict[str, float] = {}
    for part in spec.split("+"):
        kind = "relative" if part.strip().endswith("%") else "absolute"
        try:
            value = float(part.strip().removesuffix("%"))
        except ValueError:
            value = math.nan
        if kind in values or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"invalid tolerance {text!r}: expected ABS, REL%, ABS+REL% or off (e.g. 0.02, 25%, 0.01+5%)"
            )
        values[kind] = value
    return Tolerance(values.get("absolute", 0.0), values.get("relative", 0.0) / 100)


def parse_tolerances(items: Mapping[str, str | float | None]) -> dict[str, Tolerance | None]:
    """``{metric: spec}`` → ``{metric: Tolerance or None}``, metrics by plain name whether given plain
    or namespaced (``speed/speedup`` = ``speedup``); the error names the metric.

    >>> parse_tolerances({"speed/speedup": "20%", "distinct_2": "0.02"})
    {'speedup': Tolerance(absolute=0.0, relative=0.2), 'distinct_2': Tolerance(absolute=0.02, relative=0.0)}
    """
    parsed = {}
    for metric, spec in items.items():
        try:
            parsed[plain_name(metric)] = parse_tolerance(spec)
        except ValueError as err:
            raise ValueError(f"{metric}: {err}") from None
    return parsed


def load_tolerances(path: Path) -> dict[str, Tolerance | None]:
    """A YAML file mapping metric names to tolerance specs (``distinct_2: 0.02``, ``speedup: 20%``)."""
    import yaml

    items = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(items, dict):
        raise ValueError(f"{path}: expected a mapping of metric names to tolerances")
    return parse_tolerances({str(metric): spec for metric, spec in items.items()})


def resolve_tolerances(*layers: Mapping[str, Tolerance | None]) -> dict[str, Tolerance]:
    """`DEFAULT_TOLERANCES` updated by each layer in turn (a None tolerance removes the metric)."""
    merged: dict[str, Tolerance | None] = dict(DEFAULT_TOLERANCES)
    for layer in layers:
        merged.update(layer)
    return {metric: tolerance for metric, tolerance in merged.items() if tolerance is not None}


@dataclass
class DriftReport:
    """The comparison of a run's jobs with a baseline run's jobs of the same configs.

    ``table`` has one row per (matched job, compared metric): ``run``, ``metric``, ``previous``,
    ``current``, ``change``, ``tolerance``, ``drifted``, ``config_hash``. ``unmatched`` names the
    current jobs the baseline did not run.
    """

    table: pd.DataFrame
    unmatched: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> pd.DataFrame:
        return self.table[self.table["drifted"]]

    @property
    def has_drift(self) -> bool:
        return bool(self.table["drifted"].any())

    @property
    def matched_jobs(self) -> int:
        return self.table["config_hash"].nunique()


_COLUMNS = ["run", "metric", "previous", "current", "change", "tolerance", "drifted", "config_hash"]


def compare(
    previous: Mapping[str, Mapping[str, Any]],
    current: Mapping[str, Mapping[str, Any]],
    tolerances: Mapping[str, Tolerance],
) -> DriftReport:
    """Compare the jobs of two runs by config hash.

    ``previous`` and ``current`` map config hashes to ``{"run_name": str, "metrics": {name: value}}``
    (`rtdlm_experiments.tracking.finished_child_runs`); names plain or namespaced (`metric_names`).
    A metric is compared when it has a tolerance and either job has it.
    """
    rows = []
    for config_hash, job in current.items():
        if config_hash not in previous:
            continue
        before, after = plain_metrics(previous[config_hash]["metrics"]), plain_metrics(job["metrics"])
        for metric, tolerance in tolerances.items():
            if metric not in before and metric not in after:
                continue
            old, new = float(before.get(metric, math.nan)), float(after.get(metric, math.nan))
            rows.append(
                {
                    "run": job["run_name"],
                    "metric": metric,
                    "previous": old,
                    "current": new,
                    "change": new - old,
                    "tolerance": str(tolerance),
                    "drifted": not tolerance.allows(old, new),
                    "config_hash": config_hash,
                }
            )
    table = pd.DataFrame(rows, columns=_COLUMNS).astype({"drifted": bool})
    unmatched = sorted(job["run_name"] for config_hash, job in current.items() if config_hash not in previous)
    return DriftReport(table.sort_values(["run", "metric"], ignore_index=True), unmatched)


def to_text(report: DriftReport, baseline: str) -> str:
    """A Markdown page: verdict, the drifted rows, then every comparison."""
    verdict = (
        f"**DRIFT** in {len(report.drifted)} of {len(report.table)} comparisons"
        if report.has_drift
        else f"no drift in {len(report.table)} comparisons"
    )
    lines = [
        f"# Drift vs {baseline}",
        "",
        f"{verdict} ({report.matched_jobs} jobs matched by config hash).",
    ]
    if report.unmatched:
        lines.append(f"Not in the baseline (not compared): {', '.join(report.unmatched)}.")
    shown = ["run", "metric", "previous", "current", "change", "tolerance"]
    if report.has_drift:
        lines += ["", "## Drifted", "", to_markdown(report.drifted[shown], float_digits=4)]
    lines += ["", "## All comparisons", "", to_markdown(report.table[[*shown, "drifted"]], float_digits=4)]
    return "\n".join(lines)
