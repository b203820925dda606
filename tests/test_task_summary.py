"""A sweep's per-task verdict: the best job against the runner-up, paired on the task's per-row values,
and ``compare`` reading any task's ``<task>_samples.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from rtdlm_experiments.analysis import compare
from rtdlm_experiments.analysis.report import summarize_sweep
from rtdlm_experiments.analysis.task_summary import task_verdicts


def fake_job(folder: Path, task: str, preset: str, correct: list[float]) -> Path:
    """A saved job of ``len(correct)`` problems, one sample each, with its GSM8K-style records."""
    folder.mkdir(parents=True)
    mean = sum(correct) / len(correct)
    record = {
        "status": "COMPLETED",
        "job": {"run_name": f"{task}-{preset}"},
        "config": {"prompts": {"name": task}, "sampling": {"preset": preset}},
        "metrics": {"accuracy": mean, "accuracy_ci_low": 0.0, "accuracy_ci_high": 1.0},
        "artifacts": [f"{task}_samples.jsonl"],
    }
    (folder / "results.json").write_text(json.dumps(record))
    rows = [{"prompt_index": i, "sample_index": 0, "prompt": f"q{i}", "output": "", "token_ids": [1]}
            for i in range(len(correct))]  # fmt: skip
    (folder / "generations.jsonl").write_text("\n".join(map(json.dumps, rows)))
    records = [{"prompt_index": i, "task_id": f"t/{i}", "sample": 0, "status": "x", "correct": value,
                "detail": "", "extracted": "1"} for i, value in enumerate(correct)]  # fmt: skip
    (folder / f"{task}_samples.jsonl").write_text("\n".join(map(json.dumps, records)))
    return folder


def test_best_preset_beats_runner_up_only_beyond_paired_noise(tmp_path: Path):
    n = 40
    fake_job(tmp_path / "0", "gsm8k", "creative", [float(i % 4 == 0) for i in range(n)])  # 0.25
    fake_job(tmp_path / "1", "gsm8k", "precise", [float(i % 4 != 3) for i in range(n)])  # 0.75
    fake_job(tmp_path / "2", "gsm8k", "balanced", [float(i % 4 == 1) for i in range(n)])  # 0.25
    fake_job(tmp_path / "3", "triviaqa", "creative", [float(i % 2 == 0) for i in range(n)])  # 0.5
    fake_job(tmp_path / "4", "triviaqa", "precise", [float(i % 2 == 0 or i == 1) for i in range(n)])
    verdicts = {v.best.task: v for v in task_verdicts([tmp_path / str(i) for i in range(5)])}
    gsm8k, trivia = verdicts["gsm8k"], verdicts["triviaqa"]
    assert gsm8k.best.label == "gsm8k-precise" and gsm8k.runner_up is not None
    assert gsm8k.comparison is not None and not gsm8k.comparison.within_noise
    assert gsm8k.comparison.difference == 0.5 and gsm8k.row()[-1] == "beats it beyond noise"
    assert trivia.best.label == "triviaqa-precise" and trivia.comparison.within_noise  # one row differs
    summary = summarize_sweep(tmp_path)
    table = summary["tasks_md"].read_text()
    assert "gsm8k-precise" in table and "within noise" in table


def test_compare_pairs_on_the_task_values_not_the_generic_answer_checks(tmp_path: Path):
    a = compare.load_job_folder(fake_job(tmp_path / "a", "gsm8k", "x", [1.0, 0.0]))
    assert a.scored == {(0, 0): {"correct": 1.0}, (1, 0): {"correct": 0.0}}
    values = compare.per_row_values(a)
    assert values["correct"] == {(0, 0): 1.0, (1, 0): 0.0} and "exact_match" not in values
