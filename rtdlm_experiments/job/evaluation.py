"""A job's quality metrics and error bars, computed from its generations (no model, no logging here):

- 95% bootstrap CIs over prompts for the generation metrics (`rtdlm_experiments.metrics.intervals`);
- ``judge_nll_per_token`` / ``judge_perplexity`` from a judge's per-generation NLL
  (`rtdlm_experiments.job.judge`);
- the task's own scores (`rtdlm_experiments.tasks.base.Task`: e.g. ``pass_at_<k>``, ``accuracy``,
  ``exact_match``), with one record per scored (problem, sample) for an artifact file and, when scoring ran
  code in the sandbox, its isolation as a tag.

Every mean over generations or prompts carries ``<metric>_ci_low`` / ``<metric>_ci_high``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rtdlm_experiments.analysis.stats import RESAMPLES, SEED, Interval, bootstrap_ratio_ci
from rtdlm_experiments.config.validation import ExecutionSettings, check_code_execution
from rtdlm_experiments.metrics.intervals import generation_intervals, interval_entries
from rtdlm_experiments.tasks.base import Generation, Prompt, Task, samples_file
from rtdlm_experiments.tasks.execution import sandbox_isolation
from rtdlm_experiments.tasks.prompt_file import PromptSetTask

HUMANEVAL_SAMPLES_FILE = "humaneval_samples.jsonl"
"""In a HumanEval job's folder: one row per (problem, sample) with its status, error line and code (every
task writes ``<task name>_samples.jsonl``: `rtdlm_experiments.tasks.base.samples_file`)."""
ISOLATION_TAG = "execution_isolation"


@dataclass
class Evaluation:
    """What `evaluate_job` adds to a job: metrics, artifact rows by file name, tags."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def judge_scores(
    nll_sums: Sequence[float], token_counts: Sequence[float], groups: Sequence[Hashable], seed: int = SEED
) -> dict[str, float]:
    """``judge_nll_per_token`` (pooled over tokens) and ``judge_perplexity`` with CIs; ``{}`` when no
    generation has a token.

    >>> scores = judge_scores([2.0, 4.0], [2.0, 2.0], groups=[0, 1])
    >>> scores["judge_nll_per_token"], round(scores["judge_perplexity"], 4)
    (1.5, 4.4817)
    >>> scores["judge_nll_per_token_ci_low"], scores["judge_nll_per_token_ci_high"]
    (1.0, 2.0)
    """
    if sum(token_counts) <= 0:
        return {}
    interval = bootstrap_ratio_ci(nll_sums, token_counts, groups, seed=seed)
    exp_interval = Interval(*(_exp(value) for value in (interval.estimate, interval.low, interval.high)))
    return _with_interval("judge_nll_per_token", interval) | _with_interval("judge_perplexity", exp_interval)


def _exp(value: float) -> float:
    return math.exp(value) if value < 700 else math.inf


def _with_interval(name: str, interval: Interval) -> dict[str, float]:
    return {name: interval.estimate} | interval_entries(name, interval)


def task_scores(
    task: Task, job: JobGenerations, chat_template: bool, settings: ExecutionSettings, seed: int = SEED
) -> Evaluation:
    """The task's score of every generation it can score: its metrics with CIs over problems, its
    per-sample records (``<task>_samples.jsonl``) and, when it ran code, the sandbox's isolation tag."""
    rows = zip(job.prompt_indices, job.sample_indices, job.texts, strict=True)
    generations = [Generation(index, sample, job.prompts[index], text) for index, sample, text in rows]
    if task.needs_code_execution:
        check_code_execution(task, settings)
    records = task.score(generations, chat_template, settings)
    if not records:
        return Evaluation()
    tags = {ISOLATION_TAG: sandbox_isolation().describe()} if task.needs_code_execution else {}
    return Evaluation(task.aggregate(records, seed), {samples_file(task): [r.row() for r in records]}, tags)


@dataclass(frozen=True)
class JobGenerations:
    """One job's generations as `evaluate_job` reads them (row i: prompt ``prompt_indices[i]``)."""

    prompts: Sequence[Prompt]
    prompt_indices: Sequence[int]
    sample_indices: Sequence[int]
    texts: Sequence[str]
    token_ids: Sequence[Sequence[int]]
    model_logprobs: Sequence[Sequence[float]] = ()
    entropies: Sequence[Sequence[float]] = ()
    num_kept: Sequence[Sequence[float]] = ()


def evaluate_job(
    job: JobGenerations,
    *,
    chat_template: bool,
    execution: ExecutionSettings,
    task: Task | None = None,
    judge_nll: tuple[Sequence[float], Sequence[float]] | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Evaluation:
    """Everything this module computes for one job (see the module docstring)."""
    groups = list(job.prompt_indices)
    metrics = generation_intervals(
        job.token_ids, job.texts, job.model_logprobs, job.entropies, job.num_kept, groups,
        resamples=resamples, seed=seed,
    )  # fmt: skip
    if judge_nll is not None:
        metrics |= judge_scores(*judge_nll, groups, seed=seed)
    scored = task_scores(task or PromptSetTask(), job, chat_template, execution, seed=seed)
    return Evaluation(metrics | scored.metrics, scored.artifacts, scored.tags)
