"""Two searches sharing one Optuna study on PostgreSQL (the same ``hydra.sweeper.storage`` and
``study_name``), started at once and logging to one ``mlflow server`` on PostgreSQL: the trials split
between them, together exactly ``n_trials``, none run twice, none left RUNNING."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from postgres_mlflow import PostgresMlflow, postgres_mlflow

from rtdlm_experiments.search.workers import SURPLUS_ATTR, WORKER_ATTR
from rtdlm_experiments.tracking import SWEEP_TAG

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

N_TRIALS = 6
STUDY = "shared-study"


@pytest.fixture(scope="module")
def store(postgres_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresMlflow]:
    with postgres_mlflow(postgres_cluster, tmp_path_factory.mktemp("pg-mlflow-search")) as store:
        yield store


def search_args(storage: str, tracking_uri: str) -> list[str]:
    return [
        "-m", "hydra/sweeper=optuna", "model=tiny-random", "prompts.limit=4", "num_samples=2",
        "max_new_tokens=8", "search.objectives=[diversity/distinct_2:max]", "search.racing=false",
        f"hydra.sweeper.n_trials={N_TRIALS}", "sampling.temperature=interval(0.1,1.5)",
        f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={STUDY}",
        f"tracking.uri={tracking_uri}", "experiment_name=pg-shared-search",
    ]  # fmt: skip


def run_two_searches(start_app, args: list[str], roots: list[Path], timeout: float = 540) -> list[str]:
    """Start both searches at once, wait for both (killing both past ``timeout``); their outputs."""
    processes = [start_app(args, root / "cwd", root / "outputs") for root in roots]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
            outputs.append(stdout + stderr)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return outputs


def test_two_searches_share_one_study_on_postgres_and_split_its_trials(
    store: PostgresMlflow, start_app, postgres_url: str, tmp_path: Path
):
    roots = [tmp_path / "worker-a", tmp_path / "worker-b"]
    run_two_searches(start_app, search_args(postgres_url, store.uri), roots)

    study = optuna.load_study(study_name=STUDY, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    states = Counter(trial.state.name for trial in trials)
    assert "RUNNING" not in states and "WAITING" not in states, states
    run = [trial for trial in trials if not trial.user_attrs.get(SURPLUS_ATTR)]
    assert all(trial.state.name == "FAIL" for trial in trials if trial.user_attrs.get(SURPLUS_ATTR))
    # exactly n_trials run, every one COMPLETE: no trial marked interrupted while its search still ran it
    assert [trial.state.name for trial in run] == ["COMPLETE"] * N_TRIALS, states
    assert not any(trial.user_attrs.get("interrupted") for trial in trials)
    assert len({trial.number for trial in trials}) == len(trials)
    temperatures = [trial.params["sampling.temperature"] for trial in run]
    assert len(set(temperatures)) == N_TRIALS, temperatures  # the two seeded samplers never drew alike

    # split: each search ran some trials, each in its own sweep folder, each job exactly once
    by_worker = Counter(trial.user_attrs[WORKER_ATTR]["pid"] for trial in run)
    assert len(by_worker) == 2 and min(by_worker.values()) >= 1, by_worker
    sweep_dirs = [next((root / "outputs" / "multirun").glob("*/search")).parent for root in roots]
    job_dirs = [Path(trial.user_attrs["job_dir"]) for trial in run]
    assert len(set(job_dirs)) == N_TRIALS and all(d.parent in sweep_dirs for d in job_dirs)
    folders = [d for sweep in sweep_dirs for d in sweep.iterdir() if d.name.isdigit()]
    assert sorted(folders) == sorted(job_dirs)  # no job folder outside a counted trial (none for surplus)
    for trial in run:
        record = json.loads((Path(trial.user_attrs["job_dir"]) / "results.json").read_text())
        assert record["config"]["sampling"]["temperature"] == pytest.approx(
            trial.params["sampling.temperature"],
            abs=1e-6,  # overrides carry 6 decimals
        )

    # MLflow on PostgreSQL: one parent per search, one FINISHED child per trial it ran, none twice
    runs = store.all_runs("pg-shared-search")
    parents = {run.info.run_id for run in runs if run.data.tags.get(SWEEP_TAG) == "true"}
    assert len(parents) == 2
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") in parents]
    assert [run.info.status for run in children] == ["FINISHED"] * N_TRIALS
    per_parent = Counter(run.data.tags["mlflow.parentRunId"] for run in children)
    assert sorted(per_parent.values()) == sorted(by_worker.values())
