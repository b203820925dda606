"""Paired comparison of two jobs: ``python -m rtdlm_experiments.analysis.compare A B`` (job folders or
MLflow run ids).

Rows are matched by (prompt_index, sample_index); for each key metric the difference B − A of the per-row
values gets a paired-bootstrap 95% CI over prompts and a p-value (`rtdlm_experiments.analysis.stats`), and
a plain
verdict: "within noise" when the CI holds 0, "too few prompts to tell" below
`rtdlm_experiments.analysis.stats.MIN_PAIRED_PROMPTS` prompts. Per-row metrics: ``pass`` (HumanEval jobs),
``exact_match`` / ``contains_answer`` (prompts with answers), ``mean_logprob``, ``new_tokens``,
``seq_rep_4``, ``rep_w16``, ``loop`` (ends in a loop) and ``distinct_2`` within the row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtdlm_experiments.analysis.stats import RESAMPLES, paired_comparison
from rtdlm_experiments.metrics import distinct_n, ends_in_loop, seq_rep_n
from rtdlm_experiments.metrics.repetition import repeats_within
from rtdlm_experiments.results.record import GENERATIONS_FILE, RESULTS_FILE, load_job
from rtdlm_experiments.tasks import answers
from rtdlm_experiments.tasks.base import SAMPLES_SUFFIX

RowKey = tuple[int, int]
_ANSWER_METRICS = ("exact_match", "contains_answer")
_RECORD_FIELDS = ("prompt_index", "task_id", "sample", "status", "detail", "extracted", "completion")


@dataclass
class LoadedJob:
    label: str
    generations: list[dict[str, Any]]
    scored: dict[RowKey, dict[str, float]] = field(default_factory=dict)
    """The task's per-sample values of each (prompt, sample) (``<task>_samples.jsonl``); empty if none."""


def row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The per-row metrics of one ``generations.jsonl`` row (those its fields allow).

    >>> metrics = row_metrics({"output": "Paris.", "answer": "paris", "token_ids": [1, 2, 1, 2, 1, 2],
    ...                        "mean_logprob": -0.5, "new_tokens": 6})
    >>> metrics["contains_answer"], round(metrics["seq_rep_4"], 4), metrics["loop"], metrics["distinct_2"]
    (1.0, 0.3333, 1.0, 0.4)
    """
    ids = row.get("token_ids") or []
    metrics: dict[str, float] = {}
    if row.get("answer") is not None:
        metrics["exact_match"] = answers.exact_match(row.get("output", ""), row["answer"])
        metrics["contains_answer"] = answers.contains_answer(row.get("output", ""), row["answer"])
    if row.get("mean_logprob") is not None:
        metrics["mean_logprob"] = float(row["mean_logprob"])
    metrics["new_tokens"] = float(row.get("new_tokens", len(ids)))
    if len(ids) >= 4:
        metrics["seq_rep_4"] = seq_rep_n([ids], 4)
    if ids:
        metrics["rep_w16"] = repeats_within(ids, 16) / len(ids)
        metrics["distinct_2"] = distinct_n([ids], 2)
    metrics["loop"] = float(ends_in_loop(ids))
    return metrics


def per_row_values(job: LoadedJob) -> dict[str, dict[RowKey, float]]:
    """``{metric: {(prompt_index, sample_index): value}}`` over the job's rows."""
    values: dict[str, dict[RowKey, float]] = {}
    for row in job.generations:
        key = (int(row["prompt_index"]), int(row["sample_index"]))
        metrics = row_metrics(row)
        if job.scored:  # the task's scores replace the generic answer checks
            metrics = {name: value for name, value in metrics.items() if name not in _ANSWER_METRICS}
            metrics = job.scored.get(key, {}) | metrics
        for name, value in metrics.items():
            values.setdefault(name, {})[key] = value
    return values


def compare_jobs(a: LoadedJob, b: LoadedJob, resamples: int = RESAMPLES) -> list[str]:
    """One verdict line per metric both jobs have on shared rows, plus a warning when matched rows have
    different prompts."""
    lines = [f"A: {a.label} ({len(a.generations)} rows)", f"B: {b.label} ({len(b.generations)} rows)"]
    prompts_a = {int(row["prompt_index"]): row.get("prompt") for row in a.generations}
    differing = sum(
        1
        for row in b.generations
        if prompts_a.get(int(row["prompt_index"]), row.get("prompt")) != row.get("prompt")
    )
    if differing:
        lines.append(f"warning: {differing} rows of B have a different prompt than A's row of the same index")
    values_a, values_b = per_row_values(a), per_row_values(b)
    for name in values_a:
        if name not in values_b or not values_a[name].keys() & values_b[name].keys():
            continue
        lines.append(paired_comparison(values_a[name], values_b[name], resamples=resamples).verdict(name))
    return lines


def load_job_folder(path: Path) -> LoadedJob:
    """A job folder's generations and its task's per-sample records."""
    _, generations = load_job(path)
    scored: dict[RowKey, dict[str, float]] = {}
    for file in sorted(path.glob(f"*{SAMPLES_SUFFIX}")):
        for key, values in sample_values(file).items():
            scored.setdefault(key, {}).update(values)
    return LoadedJob(str(path), generations, scored)


def sample_values(path: Path) -> dict[RowKey, dict[str, float]]:
    """``{(prompt_index, sample): {value name: value}}`` of a ``<task>_samples.jsonl`` file: its numeric
    columns (a file without any, as HumanEval's before tasks had values: ``pass`` from ``status``)."""
    values: dict[RowKey, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        numbers = {name: float(value) for name, value in row.items()
                   if name not in _RECORD_FIELDS and isinstance(value, int | float)}  # fmt: skip
        key = (int(row["prompt_index"]), int(row["sample"]))
        values[key] = numbers or {"pass": float(row["status"] == "passed")}
    return values


def load_run(run_id: str, tracking_uri: str | None) -> LoadedJob:
    """An MLflow run's generations (and HumanEval results), downloaded to a temporary folder."""
    from rtdlm_experiments.tracking.downloads import download_job_files

    with tempfile.TemporaryDirectory() as folder:
        download_job_files(
            run_id, tracking_uri, Path(folder), GENERATIONS_FILE, [RESULTS_FILE], SAMPLES_SUFFIX
        )
        job = load_job_folder(Path(folder))
    return LoadedJob(f"run {run_id}", job.generations, job.scored)


def folder_problem(reference: str) -> str | None:
    """Why ``reference`` names a path (it exists, or has a ``/``) that is no job folder; None when it is
    a job folder or looks like an MLflow run id."""
    path = Path(reference).expanduser()
    if (path / RESULTS_FILE).is_file():
        return None
    if path.exists():
        return f"{reference} is not a job folder: no {RESULTS_FILE} in it"
    if "/" in reference or reference.startswith("."):
        return f"{reference} is not a job folder: no such folder"
    return None


def load_either(
    reference: str, tracking_uri: str | None, load_run: Callable[..., LoadedJob] = load_run
) -> LoadedJob:
    """A job folder when ``reference`` is one, else an MLflow run id (never a path that is no job
    folder: `folder_problem`)."""
    if problem := folder_problem(reference):
        raise SystemExit(f"error: {problem}")
    path = Path(reference).expanduser()
    if (path / RESULTS_FILE).is_file():
        return load_job_folder(path)
    return load_run(reference, tracking_uri)


def main(argv: Sequence[str] | None = None) -> int:
    """``compare A B [--tracking-uri URI] [--resamples N]``: print the paired comparison of two jobs."""
    parser = argparse.ArgumentParser(
        prog="python -m rtdlm_experiments.analysis.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("a", help="job folder or MLflow run id (A)")
    parser.add_argument("b", help="job folder or MLflow run id (B)")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow store of the run ids (default: the project's)"
    )
    parser.add_argument(
        "--resamples", type=int, default=RESAMPLES, help="bootstrap resamples (default %(default)s)"
    )
    args = parser.parse_args(argv)
    sides = (("A", args.a), ("B", args.b))
    for side, reference in sides:  # both paths checked before any run is looked up
        if problem := folder_problem(reference):
            print(f"error: {side} ({reference}): {problem}", file=sys.stderr)
            return 2
    jobs = []
    for side, reference in sides:
        try:
            jobs.append(load_either(reference, args.tracking_uri))
        except SystemExit as err:
            print(f"error: {side} ({reference}): {str(err.code).removeprefix('error: ')}", file=sys.stderr)
            return 2
    a, b = jobs
    try:
        lines = compare_jobs(a, b, args.resamples)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
