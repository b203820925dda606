"""Scale-out on Hydra's own launchers: a sweep run by the joblib launcher (worker processes) or by submitit
(one process per job, as on Slurm) is still one MLflow parent run with one child per job, because the
parent is created in the launching process and every job finds it in ``<sweep dir>/sweep.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

SWEEP = ("-m", "sampling=creative,balanced")


def launch_sweep(launch_app, tiny_job, empty_mlflow_store: Path, root: Path, *launcher: str):
    output_dir = root / "outputs"
    output_dir.mkdir(parents=True)
    shutil.copy(empty_mlflow_store, output_dir / "mlflow.db")
    result = launch_app([*SWEEP, *tiny_job, *launcher], root / "cwd", output_dir, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sweep_dir,) = (output_dir / "multirun").iterdir()
    return result, sweep_dir, MlflowClient(f"sqlite:///{output_dir / 'mlflow.db'}")


def assert_one_parent_with_a_child_per_job(client: MlflowClient, sweep_dir: Path) -> list[Run]:
    """The sweep's runs are its parent from ``sweep.json`` and a FINISHED child per job folder; returns the
    children in job order."""
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["mlflow"]["parent_run_id"]
    experiment_id = client.get_experiment_by_name("rtdlm-experiments").experiment_id
    runs = {run.info.run_id: run for run in client.search_runs([experiment_id])}
    assert runs.pop(parent_id).info.status == "FINISHED"
    children = sorted(runs.values(), key=lambda run: int(run.data.tags["hydra.job_num"]))
    assert [child.info.run_name for child in children] == ["creative", "balanced"]
    assert [child.info.status for child in children] == ["FINISHED", "FINISHED"]
    assert {child.data.tags["mlflow.parentRunId"] for child in children} == {parent_id}
    for num, child in enumerate(children):
        logged = json.loads((sweep_dir / str(num) / "mlflow_run.json").read_text())
        assert (logged["run_id"], logged["parent_run_id"]) == (child.info.run_id, parent_id)
        assert "diversity/distinct_2" in child.data.metrics
    return children


def test_joblib_launcher_runs_jobs_in_parallel_workers_under_one_parent(
    launch_app, tiny_job, empty_mlflow_store: Path, tmp_path: Path
):
    result, sweep_dir, client = launch_sweep(
        launch_app, tiny_job, empty_mlflow_store, tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
    )
    assert "Joblib.Parallel(n_jobs=2,backend=loky,prefer=processes" in result.stdout + result.stderr
    assert_one_parent_with_a_child_per_job(client, sweep_dir)
    records = [json.loads((sweep_dir / job / "results.json").read_text()) for job in ("0", "1")]
    spans = [(record["job"]["started_at_ms"], record["ended_at_ms"]) for record in records]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], f"jobs did not overlap: {spans}"


def test_submitit_local_launcher_runs_each_job_as_a_submitted_process_under_one_parent(
    launch_app, tiny_job, empty_mlflow_store: Path, tmp_path: Path
):
    result, sweep_dir, client = launch_sweep(
        launch_app, tiny_job, empty_mlflow_store, tmp_path, "hydra/launcher=submitit_local"
    )
    children = assert_one_parent_with_a_child_per_job(client, sweep_dir)
    # Each job's own output is in its submitit log, as it would be in a Slurm job's.
    logs = "".join(path.read_text() for path in (sweep_dir / ".submitit").glob("*/*_log.out"))
    for child in children:
        assert f"== {child.info.run_name} |" in logs
    assert "== creative |" not in result.stdout
    assert result.stdout.count("?workflowType=machine_learning") == 1  # the sweep's link, printed once


def test_the_documented_slurm_command_composes():
    """The README's Slurm sweep, composed without a cluster: the launcher, its resources and the shared
    MLflow server all land where the jobs will read them."""
    from hydra import compose, initialize_config_dir

    from rtdlm_experiments.config.paths import config_dir

    overrides = [
        "sweep=nightly", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=1", "hydra.launcher.timeout_min=180", "tracking.uri=http://mlflow:5000",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 180)
    assert "/multirun/" in launcher.submitit_folder and launcher.submitit_folder.endswith("/.submitit/%j")
    assert cfg.tracking.uri == "http://mlflow:5000"


def test_a_job_whose_process_died_before_saving_is_listed_as_failed_in_one_line(tmp_path: Path):
    """A worker SIGKILLed mid-job leaves its Hydra folder without ``results.json``: the sweep's end counts
    it among the failures, named like its run (the swept values only)."""
    from rtdlm_experiments.results.record import write_sweep_info
    from rtdlm_experiments.tracking import callbacks

    write_sweep_info(tmp_path, {"name": "presets", "swept_keys": ["max_new_tokens"], "mlflow": None})
    for num, tokens in ((0, 4), (1, 160)):
        (tmp_path / str(num) / ".hydra").mkdir(parents=True)
        overrides = f"- model=tiny-random\n- max_new_tokens={tokens}\n- tracking.parent_run_id=abc\n"
        (tmp_path / str(num) / ".hydra" / "overrides.yaml").write_text(overrides)
    (tmp_path / "0" / "results.json").write_text("{}")
    assert callbacks.jobs_without_results(tmp_path) == ["#1 max_new_tokens=160"]
    text = callbacks.sweep_end_text([], tmp_path, {}, None, callbacks.jobs_without_results(tmp_path))
    assert "1 job(s) failed:\n  #1 max_new_tokens=160: died before saving its results" in text
