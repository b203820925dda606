"""The `Task` protocol: one object holds everything a task knows (after lm-evaluation-harness's ``Task``).

A task loads its problems (as `Prompt` objects, in the file's order), knows its prompt for a problem
(a chat turn or raw text to continue), its stop strings, whether scoring runs model-written code, how to
score one generation (a `SampleRecord`: status, score, the extracted answer, a detail line) and how to
aggregate the records into metrics, each with a 95% bootstrap CI over problems. The app, the evaluation,
``compare`` and the report call these methods and never branch on a task's name.

``prompts.limit=N`` takes the first N of a fixed, seeded shuffle (`select_problems`): a file's first N
problems are not a random sample (HumanEval's first 80 are easier than the rest).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from rtdlm_experiments.analysis.stats import SEED, bootstrap_mean_ci
from rtdlm_experiments.metrics.intervals import interval_entries

SHUFFLE_SEED = 1234
"""Seed of the fixed shuffle behind ``prompts.limit`` (not the job's seed: every job of a sweep gets the
same problems)."""
SAMPLES_SUFFIX = "_samples.jsonl"
"""A job's per-sample records are saved as ``<task name>_samples.jsonl`` (and an MLflow table)."""


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str = ""
    answer: str | tuple[str, ...] | None = None
    """Reference answer(s) for short-answer scoring; None when the prompt has none."""
    task_id: str = ""
    """The problem the prompt poses (e.g. ``HumanEval/0``), for scoring that needs more than the text."""
    scorer: str = ""
    """How ``answer`` is compared (a prompt file's ``scorer``: ``numeric`` or ``regex``; empty: text)."""
    tests: str = ""
    """Python that raises when the generated code is wrong (a prompt file's ``tests``)."""


@dataclass(frozen=True)
class Generation:
    """One generated row as a task scores it."""

    prompt_index: int
    sample: int
    prompt: Prompt
    text: str


@dataclass(frozen=True)
class SampleRecord:
    """One scored generation: ``status`` (e.g. ``passed`` / ``failed`` or ``correct`` / ``wrong``), its
    per-row ``values`` (e.g. ``{"pass": 1.0}``, ``{"exact_match": 0.0, "f1": 0.5}``: what ``compare``
    pairs), what was extracted from the generation and a detail line."""

    prompt_index: int
    task_id: str
    sample: int
    status: str
    values: dict[str, float]
    extracted: str
    detail: str = ""

    def row(self) -> dict[str, Any]:
        return {"prompt_index": self.prompt_index, "task_id": self.task_id, "sample": self.sample,
                "status": self.status, **self.values, "detail": self.detail,
                "extracted": self.extracted}  # fmt: skip


@runtime_checkable
class Task(Protocol):
    """What a task knows. ``name`` names its records file; ``shuffle_by_default`` is whether
    ``prompts.limit`` samples (benchmarks) or keeps the file's order (prompt files) when
    ``prompts.shuffle`` is null."""

    name: str
    needs_code_execution: bool
    shuffle_by_default: bool

    def problems(self, chat_template: bool) -> list[Prompt]:
        """Every problem in the file's order, its text the chat turn (``chat_template``) or raw prompt."""
        ...

    def stop_strings(self, chat_template: bool) -> tuple[str, ...]: ...

    def score(
        self, generations: Sequence[Generation], chat_template: bool, execution: Any
    ) -> list[SampleRecord]:
        """One record per generation that has something to score (``execution``: `ExecutionSettings`)."""
        ...

    def aggregate(self, records: Sequence[SampleRecord], seed: int = SEED) -> dict[str, float]:
        """The task's metrics, each with ``_ci_low`` / ``_ci_high`` over problems."""
        ...


def select_problems(problems: Sequence[Prompt], limit: int | None, shuffle: bool) -> list[Prompt]:
    """All problems (no ``limit``), or the first ``limit`` of a fixed shuffle (``SHUFFLE_SEED``) kept in
    the file's order, or the file's first ``limit`` (``shuffle`` false). A larger limit keeps a smaller
    one's problems.

    >>> items = [Prompt(str(i)) for i in range(10)]
    >>> [p.text for p in select_problems(items, 3, shuffle=False)]
    ['0', '1', '2']
    >>> small, large = select_problems(items, 3, True), select_problems(items, 6, True)
    >>> set(small) <= set(large), len(select_problems(items, None, True))
    (True, 10)
    """
    if limit is None:
        return list(problems)
    if not shuffle:
        return list(problems[:limit])
    order = list(range(len(problems)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    return [problems[index] for index in sorted(order[:limit])]


def mean_metric(name: str, records: Sequence[SampleRecord], seed: int = SEED) -> dict[str, float]:
    """``name``: the mean of the records' value ``name`` with its bootstrap CI over problems (records of
    one problem are resampled together); ``{}`` when no record has that value.

    >>> records = [SampleRecord(i, str(i), 0, "", {"correct": float(i == 0)}, "") for i in range(2)]
    >>> mean_metric("correct", records)
    {'correct': 0.5, 'correct_ci_low': 0.0, 'correct_ci_high': 1.0}
    """
    scored = [record for record in records if name in record.values]
    if not scored:
        return {}
    values = [record.values[name] for record in scored]
    interval = bootstrap_mean_ci(values, [record.prompt_index for record in scored], seed=seed)
    return {name: interval.estimate} | interval_entries(name, interval)


def samples_file(task: Task) -> str:
    """The file name of a task's per-sample records.

    >>> samples_file(type("T", (), {"name": "gsm8k"})())
    'gsm8k_samples.jsonl'
    """
    return f"{task.name}{SAMPLES_SUFFIX}"
