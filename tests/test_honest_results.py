"""Results and comparisons that stay honest: ``sync`` uploads every good job past corrupt ones and names
each, a paired comparison over too few prompts calls no difference, and a missing job folder is named as
the side (A or B) it was given for."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from rtdlm_experiments.analysis import compare
from rtdlm_experiments.analysis.compare import LoadedJob, compare_jobs
from rtdlm_experiments.analysis.stats import MIN_PAIRED_PROMPTS
from rtdlm_experiments.tracking import sync

CORRUPT = {
    "truncated": '{"status": "COMPLETED", "config": {',
    "a-list": "[]",
    "missing-keys": '{"status": "x"}',
}


def test_sync_uploads_every_good_job_and_names_each_corrupt_one(
    run_cli: Callable, tiny_job: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture
):
    result = run_cli(*tiny_job, "tracking.backend=none")
    assert result.returncode == 0, result.stderr[-2000:]
    (job_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    root = tmp_path / "to-sync"
    for name in ("good-1", "good-2"):
        shutil.copytree(job_dir, root / name)
    for name, text in CORRUPT.items():
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(text)
    store = f"sqlite:///{tmp_path / 'store.db'}"

    assert sync.main(["sync", str(root), "--uri", store]) == 1
    out, err = capsys.readouterr()
    assert "2 job(s) uploaded" in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # MLflow logs its own lines
    assert len(errors) == len(CORRUPT)
    for name, line in zip(sorted(CORRUPT), sorted(errors), strict=True):
        assert line.startswith(f"error: not uploaded: {root / name / 'results.json'}: ")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("rtdlm-experiments")
    assert len(client.search_runs([experiment.experiment_id])) == 2


def generations(num_prompts: int, samples: int, new_tokens: int) -> list[dict]:
    return [
        {"prompt_index": p, "sample_index": s, "prompt": f"p{p}", "output": "x", "new_tokens": new_tokens + s}
        for p in range(num_prompts)
        for s in range(samples)
    ]


def test_one_prompt_is_too_few_to_call_a_difference():
    """Two one-prompt runs differing only in seed: the bootstrap over one prompt has no variance."""
    a = LoadedJob("a", generations(1, 8, new_tokens=10), {})
    b = LoadedJob("b", generations(1, 8, new_tokens=8), {})
    (line,) = [line for line in compare_jobs(a, b, resamples=200) if line.startswith("new_tokens")]
    assert (
        line == "new_tokens: B - A = -2 (8 pairs over 1 prompt): too few prompts to tell (at least 10 needed)"
    )


def test_enough_prompts_get_a_verdict():
    a = LoadedJob("a", generations(MIN_PAIRED_PROMPTS, 2, new_tokens=10), {})
    b = LoadedJob("b", generations(MIN_PAIRED_PROMPTS, 2, new_tokens=8), {})
    (line,) = [line for line in compare_jobs(a, b, resamples=200) if line.startswith("new_tokens")]
    assert line.endswith(": B is lower")


def test_a_missing_job_folder_is_named_with_its_side(tmp_path: Path, capsys: pytest.CaptureFixture):
    job = tmp_path / "job"
    job.mkdir()
    (job / "results.json").write_text(json.dumps({"status": "COMPLETED"}))
    (job / "generations.jsonl").write_text("")
    assert compare.main([str(job), "/path/that/does/not/exist"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: B (/path/that/does/not/exist): /path/that/does/not/exist is not a job folder: no such folder"
    )
    assert compare.main(["run-0", str(tmp_path)]) == 2  # B is checked as a folder before A is looked up
    assert capsys.readouterr().err.strip() == (
        f"error: B ({tmp_path}): {tmp_path} is not a job folder: no results.json in it"
    )
