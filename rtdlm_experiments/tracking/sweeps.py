"""Sweep parent runs: opened before the first job, resumed by a scheduled rerun, given the summary and
the params every job shares, and ended after the last job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.results.environment import environment_info
from rtdlm_experiments.results.record import flatten_config
from rtdlm_experiments.tracking.contents import environment_tags
from rtdlm_experiments.tracking.jobs import param_value
from rtdlm_experiments.tracking.names import JOB_TAG, SWEEP_TAG
from rtdlm_experiments.tracking.runs import child_runs, find_run, finished_child_runs

if TYPE_CHECKING:
    from mlflow import MlflowClient


def start_sweep(client: MlflowClient, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
    """Create the parent run of a sweep (RUNNING, tagged with this host's versions and git state);
    returns its id."""
    all_tags = {**environment_tags(environment_info()), SWEEP_TAG: "true", **tags}
    return client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def resume_sweep(
    client: MlflowClient, parent_run_id: str, tags: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Reopen an existing sweep parent for another attempt; returns its ``sweep.json`` ``mlflow`` entry
    and its finished jobs (`finished_child_runs`).

    Children that did not finish (FAILED, or left RUNNING by a killed job) are soft-deleted: their job
    runs again in this attempt, and the parent keeps one child per job. A soft-deleted run stays in the
    store until someone runs ``mlflow gc``; ``MlflowClient.restore_run`` brings it back.
    """
    parent = find_run(client, parent_run_id)
    if parent is None or parent.info.lifecycle_stage != "active":
        raise ConfigError(
            f"tracking.parent_run_id={parent_run_id!r} is invalid: no such run at {client.tracking_uri}"
        )
    if parent.data.tags.get(JOB_TAG) or parent.data.tags.get("mlflow.parentRunId"):
        raise ConfigError(
            f"tracking.parent_run_id={parent_run_id!r} is invalid: a job's run, not a sweep's parent"
        )
    finished = finished_child_runs(client, parent)
    for child in child_runs(client, parent):
        if child.info.status != "FINISHED":
            client.delete_run(child.info.run_id)
    client.update_run(parent_run_id, status="RUNNING")
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    mlflow = {
        "tracking_uri": client.tracking_uri,
        "experiment_id": parent.info.experiment_id,
        "parent_run_id": parent_run_id,
    }
    return mlflow, finished


def end_if_running(client: MlflowClient, run_id: str) -> bool:
    """End ``run_id`` FAILED if it is still RUNNING (its sweep was killed before it could end it); returns
    whether it was."""
    from mlflow.entities import RunStatus

    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    return True


def attach_files(
    client: MlflowClient,
    run_id: str,
    paths: Sequence[Path],
    tags: Mapping[str, str],
    artifact_path: str | None = None,
) -> None:
    """Add tags and artifacts to a run, also an ended one (a sweep's parent after its jobs)."""
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def finish_sweep(
    client: MlflowClient,
    parent_run_id: str,
    summary: Mapping[str, Path],
    failed: bool,
    records: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Attach the summary (files, and the CSV as an MLflow table) and the params every job shares to the
    parent run, then end it FINISHED, or FAILED when a job failed."""
    from mlflow.entities import RunStatus

    status = RunStatus.FAILED if failed else RunStatus.FINISHED
    try:
        _log_common_params(client, parent_run_id, records)
        for path in summary.values():
            client.log_artifact(parent_run_id, str(path))
        if "csv" in summary:
            import pandas as pd

            client.log_table(parent_run_id, pd.read_csv(summary["csv"]), "summary_table.json")
    finally:  # a parent left RUNNING would look like a sweep still in progress
        client.set_terminated(parent_run_id, RunStatus.to_string(status))


def common_params(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The flattened config values every record shares (what the sweep kept fixed).

    >>> common_params([{"config": {"a": 1, "b": 2}}, {"config": {"a": 1, "b": 3}}])
    {'a': '1'}
    """
    configs = [flatten_config(record["config"]) for record in records if record.get("config")]
    if not configs:
        return {}
    first, *others = configs
    return {
        key: param_value(value)
        for key, value in first.items()
        if all(key in other and other[key] == value for other in others)
    }


def _log_common_params(client: MlflowClient, run_id: str, records: Sequence[Mapping[str, Any]]) -> None:
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params  # a resumed parent keeps what it has
    params = [Param(key, value) for key, value in common_params(records).items() if key not in logged]
    for start in range(0, len(params), 100):  # MLflow's limit of params per batch
        client.log_batch(run_id, params=params[start : start + 100])
