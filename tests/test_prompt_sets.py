"""Prompt sets: reference answers in .jsonl files, the bundled default set's answers, HumanEval prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.job.prompt_sets import Prompt, load_prompts
from rtdlm_experiments.tasks.answers import contains_answer


def write_jsonl(path: Path, records: list[object]) -> str:
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_prompts_carry_string_or_list_answers(tmp_path: Path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"text": "Capital of France?", "category": "factual", "answer": "Paris"},
            {"text": "2 + 2?", "answer": ["4", "four"]},
            {"text": "Tell a story."},
        ],
    )
    assert load_prompts({"name": "file", "path": path}) == [
        Prompt("Capital of France?", "factual", "Paris"),
        Prompt("2 + 2?", "", ("4", "four")),
        Prompt("Tell a story."),
    ]


@pytest.mark.parametrize("answer", [3, [], ["ok", 2], {"a": 1}])
def test_an_answer_that_is_not_text_is_a_config_error_naming_the_line(tmp_path: Path, answer: object):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "q", "answer": answer}])
    with pytest.raises(ConfigError, match=r"line 2 .*'answer'"):
        load_prompts({"name": "file", "path": path})


def test_prompts_without_answers_compare_as_before():
    assert Prompt("a", "x") == Prompt("a", "x", None, "")
    assert Prompt("a").answer is None and Prompt("a").task_id == ""


def test_every_factual_prompt_of_the_default_set_has_an_answer_a_correct_reply_contains():
    prompts = {prompt.text: prompt for prompt in load_prompts({"name": "default"})}
    factual = [prompt for prompt in prompts.values() if prompt.category == "factual"]
    assert len(factual) == 4 and all(prompt.answer for prompt in factual)
    assert all(prompt.answer is None for prompt in prompts.values() if prompt.category != "factual")
    replies = {
        "What causes the seasons on Earth?": "The tilt of Earth's axis, about 23.4 degrees.",
        "Explain how a hash table works and why lookups are fast on average.":
            "A hash function maps each key to a bucket index, so a lookup checks one bucket.",
        "What is the difference between a virus and a bacterium?":
            "Bacteria are living cells; a virus can only replicate inside a host cell.",
        "Why is the sky blue?": "Air molecules scatter blue light more than red: Rayleigh scattering.",
    }  # fmt: skip
    for text, reply in replies.items():
        assert contains_answer(reply, prompts[text].answer) == 1.0, text
    assert (
        contains_answer("Because the ocean reflects onto it.", prompts["Why is the sky blue?"].answer) == 0.0
    )


@pytest.mark.parametrize("chat_template", [True, False])
def test_humaneval_set_has_164_code_prompts_with_task_ids(chat_template: bool):
    prompts = load_prompts({**HUMANEVAL, "chat_template": chat_template})
    assert len(prompts) == 164
    assert [prompt.task_id for prompt in prompts[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert {prompt.category for prompt in prompts} == {"code"}
    first = prompts[0].text
    assert first.startswith("Complete the following") if chat_template else first.startswith("from typing")


def test_humaneval_limit_without_shuffle_keeps_the_first_problems():
    prompts = load_prompts({**HUMANEVAL, "limit": 3, "shuffle": False, "chat_template": False})
    assert [prompt.task_id for prompt in prompts] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


HUMANEVAL = {"_target_": "rtdlm_experiments.tasks.code_tasks.HumanEvalTask", "name": "humaneval"}


def test_unknown_set_error_names_humaneval():
    with pytest.raises(ConfigError, match="'humaneval'"):
        load_prompts({"name": "nope"})
