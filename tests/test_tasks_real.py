"""Every benchmark task end to end through the CLI with a real model (qwen2.5-coder-0.5b, greedy, 3 problems
each): the job's headline metric with its CI, the per-sample records file, and both in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from rtdlm_experiments.results.record import RESULTS_FILE

CASES = {
    "gsm8k": (["max_new_tokens=128"], "accuracy"),  # short of a whole CoT: the last number is scored
    "mbpp": (["max_new_tokens=128", "eval.allow_code_execution=true"], "pass_at_1"),
    "triviaqa": (["max_new_tokens=24"], "exact_match"),
    "nq_open": (["max_new_tokens=24"], "exact_match"),
}


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("task", ["triviaqa", "nq_open", "mbpp", "gsm8k"])  # cheapest first
def test_three_problems_of_each_task_through_the_cli(task: str, run_cli, tmp_path: Path):
    overrides, metric = CASES[task]
    done = run_cli("model=qwen2.5-coder-0.5b", "sampling=deterministic", f"prompts={task}", "prompts.limit=3",
                   *overrides, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (job_dir,) = [path.parent for path in (tmp_path / "outputs" / "runs").rglob(RESULTS_FILE)]
    record = json.loads((job_dir / RESULTS_FILE).read_text())
    metrics = record["metrics"]
    assert 0.0 <= metrics[f"{metric}_ci_low"] <= metrics[metric] <= metrics[f"{metric}_ci_high"] <= 1.0
    samples = f"{task}_samples.jsonl"
    assert record["artifacts"] == [samples]
    rows = [json.loads(line) for line in (job_dir / samples).read_text().splitlines()]
    assert len(rows) == 3 and len({row["task_id"] for row in rows}) == 3
    if task == "mbpp":
        assert all("def " in row["extracted"] for row in rows)  # code came out of the replies
    else:  # an answer came out of each reply (a number for GSM8K, a line for the QA sets)
        assert sum(bool(row["extracted"]) for row in rows) >= 2
    tracked = json.loads((job_dir / "mlflow_run.json").read_text())
    client = MlflowClient(tracked["tracking_uri"])
    run = client.get_run(tracked["run_id"])
    logged_metrics = {name.rsplit("/", 1)[-1]: value for name, value in run.data.metrics.items()}
    assert logged_metrics[metric] == pytest.approx(metrics[metric])
    logged = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {samples, f"{task}_samples_table.json"} <= logged
