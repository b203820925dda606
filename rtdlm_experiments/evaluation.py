"""A job's quality metrics and error bars, computed from its generations (no model, no logging here):

- 95% bootstrap CIs over prompts for the generation metrics (`rtdlm_experiments.metrics.intervals`);
- ``exact_match`` / ``contains_answer`` when prompts carry reference answers;
- ``judge_nll_per_token`` / ``judge_perplexity`` from a judge's per-generation NLL
  (`rtdlm_experiments.judge`);
- ``pass_at_<k>`` for HumanEval prompts, running the completions in the sandbox, with one row per
  (problem, sample) for an artifact file and the sandbox's isolation as a tag.

Every mean over generations or prompts carries ``<metric>_ci_low`` / ``<metric>_ci_high``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rtdlm_experiments.metrics.intervals import generation_intervals, interval_entries
from rtdlm_experiments.prompt_sets import Prompt, needs_code_execution
from rtdlm_experiments.schema import ConfigError
from rtdlm_experiments.stats import RESAMPLES, SEED, Interval, bootstrap_mean_ci, bootstrap_ratio_ci
from rtdlm_experiments.tasks import answers, humaneval
from rtdlm_experiments.tasks.execution import sandbox_isolation

HUMANEVAL_SAMPLES_FILE = "humaneval_samples.jsonl"
"""In a HumanEval job's folder: one row per (problem, sample) with its status, error line and code."""
ISOLATION_TAG = "execution_isolation"


@dataclass(frozen=True)
class ExecutionSettings:
    """The ``eval`` config: whether model-written code may run, and how."""

    allow_code_execution: bool = False
    timeout_s: float = 5.0
    workers: int | None = None


@dataclass
class Evaluation:
    """What `evaluate_job` adds to a job: metrics, artifact rows by file name, tags."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def check_code_execution(prompts: Sequence[Prompt], settings: ExecutionSettings) -> None:
    """Scoring that runs model-written code is opt-in: fail (before any model loads) unless allowed."""
    if settings.timeout_s <= 0:
        raise ConfigError(f"eval.timeout_s={settings.timeout_s} is invalid: must be > 0")
    if settings.workers is not None and settings.workers < 1:
        raise ConfigError(f"eval.workers={settings.workers} is invalid: must be >= 1, or null")
    if needs_code_execution(prompts) and not settings.allow_code_execution:
        raise ConfigError(
            "eval.allow_code_execution=false is invalid for these prompts: scoring them runs model-written "
            "code (sandboxed); pass eval.allow_code_execution=true to allow it"
        )


def answer_scores(
    prompts: Sequence[Prompt], prompt_indices: Sequence[int], texts: Sequence[str], seed: int = SEED
) -> dict[str, float]:
    """``exact_match`` and ``contains_answer`` (means over the generations whose prompt has an answer) with
    their CIs; ``{}`` when no prompt has one.

    >>> prompts = [Prompt("Capital of France?", answer="Paris"), Prompt("A story")]
    >>> scores = answer_scores(prompts, [0, 0, 1], ["Paris.", "It is Paris", "Once"])
    >>> scores["exact_match"], scores["contains_answer"], scores["exact_match_ci_low"]
    (0.5, 1.0, 0.5)
    """
    references = [prompts[index].answer for index in prompt_indices]
    if all(reference is None for reference in references):
        return {}
    scores: dict[str, float] = {}
    for name, score in (("exact_match", answers.exact_match), ("contains_answer", answers.contains_answer)):
        pairs = zip(texts, references, strict=True)
        values = [score(text, ref) if ref is not None else 0.0 for text, ref in pairs]
        weights = [float(ref is not None) for ref in references]
        scores |= _with_interval(name, bootstrap_ratio_ci(values, weights, prompt_indices, seed=seed))
    return scores


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


def humaneval_scores(
    prompts: Sequence[Prompt],
    prompt_indices: Sequence[int],
    sample_indices: Sequence[int],
    texts: Sequence[str],
    chat_template: bool,
    settings: ExecutionSettings,
    seed: int = SEED,
) -> Evaluation:
    """Run every HumanEval generation's code against its problem's tests; ``pass_at_<k>`` (k ≤ the samples
    per problem) with CIs over problems, the per-sample rows and the isolation tag."""
    check_code_execution(prompts, settings)
    problems = {problem.task_id: problem for problem in humaneval.load_problems()}
    scored = [
        (prompts[index].task_id, sample, humaneval.completion_from_generation(text, chat_template), index)
        for index, sample, text in zip(prompt_indices, sample_indices, texts, strict=True)
        if prompts[index].task_id in problems
    ]
    results = humaneval.score_samples(
        problems, [item[:3] for item in scored], timeout_s=settings.timeout_s, workers=settings.workers
    )
    metrics: dict[str, float] = {}
    for name, value in humaneval.pass_at_k(results).items():
        per_task = humaneval.pass_at_k_per_task(results, int(name.removeprefix("pass_at_")))
        interval = bootstrap_mean_ci(list(per_task.values()), list(per_task), seed=seed)
        metrics |= {name: value} | interval_entries(name, interval)
    rows = [{"prompt_index": item[3], **result.row()} for item, result in zip(scored, results, strict=True)]
    tags = {ISOLATION_TAG: sandbox_isolation().describe()}
    return Evaluation(metrics, {HUMANEVAL_SAMPLES_FILE: rows}, tags)


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
    metrics |= answer_scores(job.prompts, groups, job.texts, seed=seed)
    if judge_nll is not None:
        metrics |= judge_scores(*judge_nll, groups, seed=seed)
    evaluation = Evaluation(metrics)
    if needs_code_execution(job.prompts):
        scored = humaneval_scores(
            job.prompts, groups, job.sample_indices, job.texts, chat_template, execution, seed=seed
        )
        evaluation = Evaluation(metrics | scored.metrics, scored.artifacts, scored.tags)
    return evaluation


def execution_settings(cfg: Mapping[str, Any]) -> ExecutionSettings:
    """The ``eval`` config node as `ExecutionSettings`."""
    return ExecutionSettings(
        bool(cfg.get("allow_code_execution", False)), float(cfg.get("timeout_s", 5.0)), cfg.get("workers")
    )
