"""A team's setup, tested for real: an ``mlflow server`` whose store is a throwaway PostgreSQL cluster
(`tests/postgres_cluster.py`), sweeps on tiny-random logging to it over HTTP with one worker and with
many (joblib, submitit), read back by ``report`` and ``compare``. Resuming and faults are in
``test_postgres_faults.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_mlflow import PostgresMlflow, assert_each_job_finished_once, postgres_mlflow

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

FOUR_JOBS = "sampling=creative,balanced,precise,deterministic"


@pytest.fixture(scope="module")
def store(postgres_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresMlflow]:
    with postgres_mlflow(postgres_cluster, tmp_path_factory.mktemp("pg-mlflow")) as store:
        yield store


def run_sweep(launch_app, root: Path, args: list[str], timeout: float = 420) -> Path:
    result = launch_app(["-m", *args], root / "cwd", root / "outputs", timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "WARNING" not in result.stdout + result.stderr, result.stderr[-3000:]
    (sweep_dir,) = (root / "outputs" / "multirun").glob("*")
    return sweep_dir


def test_a_sweep_logs_to_mlflow_on_postgres_and_report_and_compare_read_it(
    store: PostgresMlflow, launch_app, tiny_job, tmp_path: Path
):
    experiment = "pg-one-worker"
    args = [
        "sampling=creative,balanced",
        *tiny_job,
        f"tracking.uri={store.uri}",
        f"experiment_name={experiment}",
    ]
    sweep_dir = run_sweep(launch_app, tmp_path, args)
    parent, (creative, balanced) = assert_each_job_finished_once(store, experiment, sweep_dir, jobs=2)
    assert store.count_rows("runs") >= 3 and store.count_rows("metrics") > 0  # in PostgreSQL itself
    assert not (tmp_path / "outputs" / "mlflow.db").exists()

    report = launch_app(
        ["--uri", store.uri, "--experiment", experiment, "--sweep", parent.info.run_id, "--out",
         str(tmp_path / "report")],
        tmp_path / "cwd", tmp_path / "outputs", module="rtdlm_experiments.analysis.report",
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert "creative" in report.stdout and "balanced" in report.stdout
    assert (tmp_path / "report").is_dir()

    compare = launch_app(
        [creative.info.run_id, balanced.info.run_id, "--tracking-uri", store.uri, "--resamples", "200"],
        tmp_path / "cwd", tmp_path / "outputs", module="rtdlm_experiments.analysis.compare",
    )  # fmt: skip
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "distinct_2" in compare.stdout


@pytest.mark.parametrize(
    "launcher",
    [("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), ("hydra/launcher=submitit_local",)],
    ids=["joblib-2-workers", "submitit-local"],
)
def test_many_workers_one_store_each_job_finished_once_under_one_parent(
    store: PostgresMlflow, launch_app, tiny_job, tmp_path: Path, launcher: tuple[str, ...]
):
    experiment = f"pg-{launcher[0].split('=')[1]}"
    args = [FOUR_JOBS, *tiny_job, *launcher, f"tracking.uri={store.uri}", f"experiment_name={experiment}"]
    sweep_dir = run_sweep(launch_app, tmp_path, args)
    _, children = assert_each_job_finished_once(store, experiment, sweep_dir, jobs=4)
    assert [child.info.run_name for child in children] == ["creative", "balanced", "precise", "deterministic"]


def test_postgres_url_is_a_fresh_database_of_a_server_that_runs_unprivileged_on_loopback(
    postgres_url: str, postgres_cluster
):
    """The fixture other tests (an Optuna storage) take: a SQLAlchemy URL of an empty database, on
    127.0.0.1, served by a postmaster that is not root."""
    import sqlalchemy

    assert postgres_url.startswith("postgresql+psycopg://") and "@127.0.0.1:" in postgres_url
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            count = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            tables = connection.execute(sqlalchemy.text(count)).scalar()
            listen = connection.execute(sqlalchemy.text("SHOW listen_addresses")).scalar()
    finally:
        engine.dispose()
    assert (tables, listen) == (0, "127.0.0.1")
    status = Path(f"/proc/{postgres_cluster.process.pid}/status").read_text()
    real_uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert real_uid != 0


def test_processes_creating_one_experiment_at_once_all_get_it(store: PostgresMlflow):
    """Jobs started together against a fresh store race to create the experiment: every one gets the
    same experiment, none fails (MLflow answers the losers RESOURCE_ALREADY_EXISTS)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    from rtdlm_experiments.tracking import ensure_experiment

    for attempt in range(5):
        name = f"pg-race-{attempt}"
        with ThreadPoolExecutor(max_workers=4) as pool:
            clients = [MlflowClient(store.uri) for _ in range(4)]
            ids = list(pool.map(ensure_experiment, clients, [name] * 4))
        assert len(set(ids)) == 1, ids
        assert store.client.get_experiment(ids[0]).name == name
