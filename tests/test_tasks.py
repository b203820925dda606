"""The `Task` protocol: HumanEval scores as before the move, every benchmark's counts, answer extraction
and normalisation on hand-written replies, file tasks (answer, scorer, tests) and the seeded subset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.config.validation import ExecutionSettings
from rtdlm_experiments.job.evaluation import JobGenerations, task_scores
from rtdlm_experiments.job.prompt_sets import build_task, load_prompts, stop_strings
from rtdlm_experiments.tasks import short_answers
from rtdlm_experiments.tasks.answer_tasks import GSM8KTask, QATask
from rtdlm_experiments.tasks.base import Generation, Prompt, Task
from rtdlm_experiments.tasks.code_tasks import HumanEvalTask, MBPPTask
from rtdlm_experiments.tasks.prompt_file import PromptSetTask

DATA = Path(__file__).parent / "data"
EXECUTION = ExecutionSettings(allow_code_execution=True, timeout_s=10.0, workers=2)
TARGETS = {
    "humaneval": "rtdlm_experiments.tasks.code_tasks.HumanEvalTask",
    "gsm8k": "rtdlm_experiments.tasks.answer_tasks.GSM8KTask",
    "mbpp": "rtdlm_experiments.tasks.code_tasks.MBPPTask",
    "triviaqa": "rtdlm_experiments.tasks.answer_tasks.QATask",
    "nq_open": "rtdlm_experiments.tasks.answer_tasks.QATask",
}


def config(name: str, **fields) -> dict:
    return {"_target_": TARGETS[name], "name": name, **fields}


@pytest.mark.parametrize("mode", ["chat", "raw"])
def test_humaneval_scores_the_same_generations_as_before_the_task_protocol(mode: str):
    """``humaneval_scores_before.json`` was written by the pre-protocol code (commit 021df74,
    ``evaluation.humaneval_scores``) on ``humaneval_generations.json``: correct, wrong, syntax error,
    raising, unclosed fence, own asserts, continuations with stop strings."""
    case = json.loads((DATA / "humaneval_generations.json").read_text())[mode]
    before = json.loads((DATA / "humaneval_scores_before.json").read_text())[mode]
    chat = mode == "chat"
    prompts = load_prompts(config("humaneval", limit=4, shuffle=False, chat_template=chat))
    job = JobGenerations(prompts, case["prompt_indices"], case["sample_indices"], case["texts"], [[1]] * 8)
    evaluation = task_scores(HumanEvalTask(), job, chat, EXECUTION)
    assert evaluation.metrics == before["metrics"]
    rows = evaluation.artifacts["humaneval_samples.jsonl"]
    assert [
        (r["prompt_index"], r["task_id"], r["sample"], r["status"], r["detail"], r["extracted"]) for r in rows
    ] == [
        (r["prompt_index"], r["task_id"], r["sample"], r["status"], r["detail"], r["completion"])
        for r in before["rows"]
    ]
    assert [r["pass"] for r in rows] == [float(r["status"] == "passed") for r in before["rows"]]


@pytest.mark.parametrize(
    ("name", "count"),
    [("gsm8k", 1319), ("mbpp", 500), ("triviaqa", 7993), ("nq_open", 3610), ("humaneval", 164)],
)
def test_each_task_has_its_published_problem_count_with_references(name: str, count: int):
    prompts = load_prompts(config(name))
    assert len(prompts) == count
    assert len({prompt.task_id for prompt in prompts}) == count
    assert all(prompt.answer or prompt.tests or name == "humaneval" for prompt in prompts)


def test_every_task_config_builds_a_task_through_its_target():
    for name in TARGETS:
        task = build_task(config(name))
        assert isinstance(task, Task) and task.name == name
    assert isinstance(build_task({"name": "default"}), PromptSetTask)


def test_limit_takes_a_fixed_seeded_subset_and_shuffle_false_keeps_the_file_order():
    first = [p.task_id for p in load_prompts(config("humaneval", limit=5))]
    assert first == [p.task_id for p in load_prompts(config("humaneval", limit=5))]  # fixed
    assert first != [f"HumanEval/{i}" for i in range(5)]
    assert set(first) <= {p.task_id for p in load_prompts(config("humaneval", limit=40))}  # nested
    assert [p.task_id for p in load_prompts(config("humaneval", limit=3, shuffle=False))] == [
        "HumanEval/0", "HumanEval/1", "HumanEval/2"
    ]  # fmt: skip
    assert [p.text for p in load_prompts({"name": "default", "limit": 2})] == [
        p.text for p in load_prompts({"name": "default"})[:2]
    ]  # prompt sets keep their order by default


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("16 - 3 - 4 = 9 eggs. 9 * 2 = 18 dollars. The final answer is 18", "18"),
        ("She pays $1,000.00 in total, so 1000 - 250 = 750 left.\nThe final answer is $1,000.00.", "1000"),
        ("First 3 boxes, then 12 more: 15 boxes.", "15"),  # no fixed form: the last number
        ("So the answer is 42.\n\nQuestion: Tom has 7 apples", "42"),  # the fixed form beats a later number
        ("#### 1,234", "1234"),
        ("The answer is \\boxed{-7.50}", "-7.5"),
        ("I cannot tell.", None),
    ],
)
def test_gsm8k_final_number_extraction(reply: str, expected: str | None):
    assert short_answers.final_number(reply) == expected


def test_gsm8k_scores_against_short_answers_with_thousands_commas():
    prompt = Prompt("q", answer="2,125", task_id="GSM8K/x", scorer="numeric")
    records = GSM8KTask().score(
        [Generation(0, 0, prompt, "Total: $2125.00\nThe final answer is 2125")], True, None
    )
    assert records[0].values == {"correct": 1.0} and records[0].extracted == "2125"
    wrong = GSM8KTask().score([Generation(0, 1, prompt, "12 + 3 = 15 and 2,125 - 5 = 2,120")], True, None)
    assert wrong[0].values == {"correct": 0.0} and wrong[0].status == "wrong"
    metrics = GSM8KTask().aggregate(records + wrong)
    assert metrics == {"accuracy": 0.5, "accuracy_ci_low": 0.5, "accuracy_ci_high": 0.5}  # one problem


@pytest.mark.parametrize(
    ("reply", "aliases", "em", "f1"),
    [
        ("The Beatles", ["Beatles"], 1.0, 1.0),  # an alias with an article
        ("Answer: the beatles.\nThey were a band from Liverpool.", ["The Beatles"], 1.0, 1.0),
        ("Sunset Boulevard musical", ["Sunset Blvd", "Sunset Boulevard"], 0.0, 0.8),
        ("Paris, France", ["Paris"], 0.0, 2 / 3),
        ("", ["x"], 0.0, 0.0),
    ],
)
def test_squad_exact_match_and_f1_over_aliases(reply: str, aliases: list[str], em: float, f1: float):
    record = QATask("triviaqa").score(
        [Generation(0, 0, Prompt("q", answer=tuple(aliases)), reply)], True, None
    )[0]
    assert record.values["exact_match"] == em and record.values["f1"] == pytest.approx(f1)


def test_mbpp_code_in_an_unclosed_fence_runs_against_its_tests():
    prompt = next(p for p in load_prompts(config("mbpp")) if p.task_id == "MBPP/11")
    good = (
        "Here:\n```python\ndef remove_Occ(s, ch):\n    s = s.replace(ch, '', 1)\n    i = s.rfind(ch)\n"
        "    return s if i < 0 else s[:i] + s[i + 1:]\n\nprint(remove_Occ('hello', 'l'))"
    )  # unclosed fence, a stray print
    bad = "```python\ndef remove_Occ(s, ch):\n    return s\n```"
    records = MBPPTask().score(
        [Generation(0, 0, prompt, good), Generation(0, 1, prompt, bad)], True, EXECUTION
    )
    assert [r.status for r in records] == ["passed", "failed"]
    assert "print" not in records[0].extracted
    assert MBPPTask().aggregate(records)["pass_at_1"] == 0.5


def test_mbpp_raw_continuation_stops_at_the_closing_fence():
    prompt = next(p for p in load_prompts(config("mbpp", chat_template=False)) if p.task_id == "MBPP/11")
    assert prompt.text.endswith("```python\n")
    continuation = "def remove_Occ(s, ch):\n    return s.strip(ch)\n```\nassert 1 == 2"
    record = MBPPTask().score([Generation(0, 0, prompt, continuation)], False, EXECUTION)[0]
    assert record.extracted.strip().endswith("return s.strip(ch)") and record.status == "failed"


def write_jsonl(path: Path, lines: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_file_task_scores_text_numeric_regex_and_tests(tmp_path: Path):
    path = write_jsonl(tmp_path / "own.jsonl", [
        {"text": "Capital of France?", "answer": ["Paris", "City of Light"]},
        {"text": "12 * 12?", "answer": "144", "scorer": "numeric"},
        {"text": "A prime above 10?", "answer": r"\b(11|13|17)\b", "scorer": "regex"},
        {"text": "Write double(x).", "tests": "assert double(2) == 4\nassert double(-1) == -2"},
        {"text": "Write a haiku."},
    ])  # fmt: skip
    cfg = {"name": "file", "path": path}
    task, prompts = build_task(cfg), load_prompts(cfg)
    assert task.needs_code_execution and stop_strings(cfg, task) == ()
    replies = [
        "Paris.",
        "12 * 12 = 144.",
        "13 is one.",
        "```python\ndef double(x):\n    return 2 * x\n```",
        "...",
    ]
    pairs = enumerate(zip(prompts, replies, strict=True))
    generations = [Generation(i, 0, prompt, reply) for i, (prompt, reply) in pairs]
    records = task.score(generations, True, EXECUTION)
    assert [(r.prompt_index, r.status) for r in records] == [
        (0, "correct"),
        (1, "correct"),
        (2, "correct"),
        (3, "passed"),
    ]
    metrics = task.aggregate(records)
    assert (
        metrics["exact_match"]
        == metrics["contains_answer"]
        == metrics["accuracy"]
        == metrics["pass_at_1"]
        == 1.0
    )


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ({"text": "x", "answer": "1", "scorer": "fuzzy"}, "scorer"),
        ({"text": "x", "scorer": "numeric"}, "needs an 'answer'"),
        ({"text": "x", "answer": "(", "scorer": "regex"}, "line 1"),
        ({"text": "x", "tests": ["assert 1"]}, "tests"),
    ],
)
def test_bad_file_task_lines_fail_with_one_line_naming_the_field(tmp_path: Path, line: dict, field: str):
    path = write_jsonl(tmp_path / "bad.jsonl", [line])
    with pytest.raises(ConfigError, match=re.escape(field)) as caught:
        load_prompts({"name": "file", "path": path})
    assert "\n" not in str(caught.value)


def test_file_task_without_tests_needs_no_code_execution(tmp_path: Path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"text": "2+2?", "answer": "4", "scorer": "numeric"}])
    assert not build_task({"name": "file", "path": path}).needs_code_execution
