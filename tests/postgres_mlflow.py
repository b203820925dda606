"""An ``mlflow server`` on a database of the test PostgreSQL cluster, and the checks the team-setup tests
share: a sweep's runs read back from the server, each job FINISHED exactly once under one parent."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from rtdlm_experiments.results.metric_names import metrics_to_log
from rtdlm_experiments.tracking import SWEEP_TAG
from rtdlm_experiments.tracking.names import CONFIG_HASH_TAG
from rtdlm_experiments.tracking.server import serve_mlflow, server_args


@dataclass
class PostgresMlflow:
    """An ``mlflow server`` at ``uri`` whose backend store is database ``dsn`` of the test cluster."""

    uri: str
    dsn: str
    client: MlflowClient

    def count_rows(self, table: str) -> int:
        """Rows of an MLflow table, read from PostgreSQL itself (not through the server)."""
        with psycopg.connect(self.dsn, connect_timeout=10) as connection:
            return connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def all_runs(self, experiment: str) -> list[Run]:
        """Every run of ``experiment``, deleted ones included."""
        experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        return self.client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=1000)


@contextmanager
def postgres_mlflow(cluster, root: Path) -> Iterator[PostgresMlflow]:
    """A fresh database in ``cluster`` served by ``mlflow server`` (artifacts proxied into ``root``)."""
    database = f"mlflow_{uuid.uuid4().hex[:12]}"
    url = cluster.create_database(database)
    root.mkdir(parents=True, exist_ok=True)
    args = server_args(None, root / "artifacts")
    env = {"MLFLOW_BACKEND_STORE_URI": url}  # the password off the command line
    with serve_mlflow(args, root / "mlflow-server.log", env=env) as uri:
        yield PostgresMlflow(uri, cluster.dsn(database), MlflowClient(uri))


def assert_each_job_finished_once(
    store: PostgresMlflow, experiment: str, sweep_dir: Path, jobs: int, parents: int = 1
) -> tuple[Run, list[Run]]:
    """The runs of the sweep in ``sweep_dir``: its parent (the one in ``sweep.json``) FINISHED, and
    ``parents`` sweep parents in ``experiment`` in all (no duplicate parent); one FINISHED child per job,
    its metrics exactly those of the job's ``results.json``; no config with two FINISHED runs under the
    parent, deleted runs counted too. Returns the parent and its live children in job order."""
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["mlflow"]["parent_run_id"]
    runs = store.all_runs(experiment)
    sweep_parents = [run for run in runs if SWEEP_TAG in run.data.tags]
    assert len(sweep_parents) == parents, [run.info.run_name for run in sweep_parents]
    (parent,) = [run for run in sweep_parents if run.info.run_id == parent_id]
    assert parent.info.status == "FINISHED"
    mine = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent_id]
    per_config = Counter(run.data.tags[CONFIG_HASH_TAG] for run in mine if run.info.status == "FINISHED")
    assert set(per_config.values()) == {1} and len(per_config) == jobs, per_config
    live = [run for run in mine if run.info.lifecycle_stage == "active"]
    children = sorted(live, key=lambda run: int(run.data.tags["hydra.job_num"]))
    assert [run.info.status for run in children] == ["FINISHED"] * jobs
    for num, child in enumerate(children):
        record = json.loads((sweep_dir / str(num) / "results.json").read_text())
        speculative = record["config"]["decoder"]["name"] != "autoregressive"
        expected = metrics_to_log(record["metrics"], speculative)
        assert set(child.data.metrics) == set(expected), f"job {num}: metrics lost or extra"
        assert child.data.metrics == pytest.approx(expected, rel=1e-6, nan_ok=True), f"job {num}"
    return parent, children
