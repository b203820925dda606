"""A prompt set as a `Task`: the bundled sets (``prompts/<name>.jsonl``) or your own .txt/.jsonl file.

A ``.jsonl`` line may carry a reference: ``answer`` (a string or a list of acceptable strings) scores
``exact_match`` / ``contains_answer`` (`rtdlm_experiments.tasks.answers`), or with ``"scorer": "numeric"``
GSM8K's final-number rule, or with ``"scorer": "regex"`` a pattern search (``correct`` → ``accuracy``);
``tests`` (Python that raises when the code is wrong) runs the reply's code in the sandbox (``pass_at_k``).
Lines without either are generated and measured but not scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rtdlm_experiments.analysis.stats import SEED
from rtdlm_experiments.job import prompt_sets
from rtdlm_experiments.tasks import answers, humaneval, short_answers
from rtdlm_experiments.tasks.answer_tasks import accuracy, number_record
from rtdlm_experiments.tasks.base import Generation, Prompt, SampleRecord, mean_metric
from rtdlm_experiments.tasks.code_tasks import pass_at_k_metrics, score_tests

SCORERS = ("", "numeric", "regex")


@dataclass(frozen=True)
class PromptSetTask:
    """``name``: a bundled set, or ``file`` to read ``path``."""

    name: str = "default"
    path: str | None = None
    shuffle_by_default: bool = False

    @property
    def needs_code_execution(self) -> bool:
        return any(prompt.tests for prompt in self.problems(chat_template=True))

    def problems(self, chat_template: bool) -> list[Prompt]:
        return prompt_sets.read_set(self.name, self.path)

    def stop_strings(self, chat_template: bool) -> tuple[str, ...]:
        return ()

    def score(
        self, generations: Sequence[Generation], chat_template: bool, execution: Any
    ) -> list[SampleRecord]:
        records = [_answer_record(item) for item in generations if item.prompt.answer is not None]
        tested = [item for item in generations if item.prompt.tests]
        stops = humaneval.CHAT_STOP_SEQUENCES if chat_template else humaneval.STOP_SEQUENCES
        code_records = score_tests(tested, chat_template, stops, execution) if tested else []
        return sorted(records + code_records, key=lambda record: (record.prompt_index, record.sample))

    def aggregate(self, records: Sequence[SampleRecord], seed: int = SEED) -> dict[str, float]:
        code = [record for record in records if "pass" in record.values]
        metrics = mean_metric("exact_match", records, seed) | mean_metric("contains_answer", records, seed)
        return metrics | accuracy(records, seed) | (pass_at_k_metrics(code, seed) if code else {})


def _answer_record(item: Generation) -> SampleRecord:
    """The reply against the prompt's ``answer`` under its ``scorer``."""
    prompt = item.prompt
    if prompt.scorer == "numeric":
        return number_record(item)
    references = (prompt.answer,) if isinstance(prompt.answer, str) else tuple(prompt.answer)
    if prompt.scorer == "regex":
        score, matched = short_answers.regex_match(item.text, references)
        return SampleRecord(item.prompt_index, prompt.task_id, item.sample, "correct" if score else "wrong",
                            {"correct": score}, matched)  # fmt: skip
    exact, contained = (
        answers.exact_match(item.text, references),
        answers.contains_answer(item.text, references),
    )
    values = {"exact_match": exact, "contains_answer": contained}
    status = "correct" if exact else "wrong"
    reply = item.text.strip()[:200]
    return SampleRecord(item.prompt_index, prompt.task_id, item.sample, status, values, reply)
