"""Per task, which job of a sweep scores best and whether it beats the runner-up beyond noise.

For ``sweep=presets_by_task`` (presets × tasks) this is the guide's preset table made empirical: within
each task (``prompts.name``) the jobs are ranked by the task's headline metric (the first of
:data:`HEADLINE_METRICS` they have), and the best is compared with the runner-up row by row on the same
problems and samples (paired bootstrap over problems, `rtdlm_experiments.analysis.stats.paired_comparison`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtdlm_experiments.analysis import compare
from rtdlm_experiments.analysis.markdown import markdown_table
from rtdlm_experiments.analysis.stats import PairedComparison, paired_comparison
from rtdlm_experiments.results.record import load_job

HEADLINE_METRICS = {"pass_at_1": "pass", "accuracy": "correct", "exact_match": "exact_match",
                    "contains_answer": "contains_answer"}  # fmt: skip
"""A job metric → the per-row value (`compare.per_row_values`) whose mean it is."""


@dataclass(frozen=True)
class TaskJob:
    task: str
    label: str
    metric: str
    value: float
    low: float
    high: float
    folder: Path


@dataclass(frozen=True)
class TaskVerdict:
    best: TaskJob
    runner_up: TaskJob | None
    comparison: PairedComparison | None
    """Best − runner-up on the shared rows."""

    def row(self) -> list[str]:
        best, other = self.best, self.runner_up
        cells = [best.task, best.metric, best.label, _value(best)]
        if other is None or self.comparison is None:
            return [*cells, "-", "-", "-"]
        c = self.comparison
        reading = "within noise" if c.within_noise else "beats it beyond noise"
        delta = f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}], p = {c.p_value:.2g}, {c.pairs} pairs"
        return [*cells, f"{other.label} {_value(other)}", delta, reading]


def _value(job: TaskJob) -> str:
    return f"{job.value:.3f} [{job.low:.3f}, {job.high:.3f}]"


def task_job(folder: Path) -> TaskJob | None:
    """A saved job's task, label (``run_name``), headline metric and CI; None if it has no task metric."""
    record, _ = load_job(folder)
    metrics: dict[str, Any] = record.get("metrics", {})
    metric = next((name for name in HEADLINE_METRICS if name in metrics), None)
    if metric is None:
        return None
    task = str(record.get("config", {}).get("prompts", {}).get("name", "?"))
    label = str(record.get("job", {}).get("run_name") or folder.name)
    low, high = (
        metrics.get(f"{metric}_ci_low", metrics[metric]),
        metrics.get(f"{metric}_ci_high", metrics[metric]),
    )
    return TaskJob(task, label, metric, float(metrics[metric]), float(low), float(high), folder)


def task_verdicts(folders: Sequence[Path]) -> list[TaskVerdict]:
    """One verdict per task among the jobs, tasks in order of first appearance."""
    jobs = [job for job in map(task_job, folders) if job is not None]
    verdicts = []
    for task in dict.fromkeys(job.task for job in jobs):
        ranked = sorted((job for job in jobs if job.task == task), key=lambda job: -job.value)
        best, runner_up = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        comparison = _paired(best, runner_up) if runner_up else None
        verdicts.append(TaskVerdict(best, runner_up, comparison))
    return verdicts


def _paired(best: TaskJob, other: TaskJob) -> PairedComparison | None:
    name = HEADLINE_METRICS[best.metric]
    values = [
        compare.per_row_values(compare.load_job_folder(job.folder)).get(name, {}) for job in (other, best)
    ]
    if not values[0].keys() & values[1].keys():
        return None
    return paired_comparison(values[0], values[1])


def verdicts_markdown(verdicts: Sequence[TaskVerdict]) -> str:
    """The verdicts as a Markdown table (values with their 95% CIs)."""
    header = ["task", "metric", "best", "value [95% CI]", "runner-up", "best − runner-up (paired)", "verdict"]
    return markdown_table(header, [verdict.row() for verdict in verdicts])
