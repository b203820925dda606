"""Two processes opening a fresh embedded MLflow store at the same moment: creating and migrating it is
serialized by a file lock, so neither crashes on the other's half-made tables."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import app_env

OPEN_AND_LOG = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rtdlm_experiments import tracking

    uri, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    while not go.exists():  # both start together, after their imports
        time.sleep(0.01)
    client = tracking.mlflow_client(uri)
    experiment_id = tracking.ensure_experiment(client, "shared")
    run = client.create_run(experiment_id, run_name=name)
    client.log_metric(run.info.run_id, "x", 1.0)
    client.set_terminated(run.info.run_id)
    print("ok", name)
    """
)


def test_two_processes_on_a_fresh_store_at_once_both_succeed(tmp_path: Path):
    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    go = tmp_path / "go"
    env = app_env(tmp_path / "outputs")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AND_LOG, uri, name, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("first", "second")
    ]
    go.touch()
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=300))
        finally:
            process.kill()
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert stdout.startswith("ok")
    assert (db.parent / "mlflow.db.lock").exists()

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [experiment for experiment in client.search_experiments() if experiment.name == "shared"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["first", "second"]
