"""HumanEval end to end with a real model: qwen2.5-coder-0.5b, greedy, the first 3 problems, sandboxed."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from rtdlm_experiments.config import validation
from rtdlm_experiments.config.paths import config_dir
from rtdlm_experiments.job import app
from rtdlm_experiments.job.evaluation import HUMANEVAL_SAMPLES_FILE, ISOLATION_TAG
from rtdlm_experiments.tasks.execution import STATUSES


@pytest.mark.real_model
@pytest.mark.slow
def test_greedy_humaneval_on_three_problems_with_qwen_coder():
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["model=qwen2.5-coder-0.5b", "sampling=deterministic", "prompts=humaneval",
                       "prompts.limit=3", "prompts.shuffle=false", "max_new_tokens=128",
                       "eval.allow_code_execution=true"],
        )  # fmt: skip
    result = app.run_job(validation.prepare_job(cfg))
    rows = result.artifacts[HUMANEVAL_SAMPLES_FILE]
    assert [row["task_id"] for row in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert {row["status"] for row in rows} <= set(STATUSES)
    assert all("def " in row["extracted"] for row in rows)  # code was extracted from the chat replies
    assert result.metrics["pass_at_1"] == sum(row["status"] == "passed" for row in rows) / 3
    # An instruct coder solves at least one of these three easy problems greedily.
    assert result.metrics["pass_at_1"] > 0
    assert result.tags[ISOLATION_TAG]
