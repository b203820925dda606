"""Job runs of the store as one table (the layout of `mlflow.search_runs`), for reports."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rtdlm_experiments.results.metric_names import plain_metrics
from rtdlm_experiments.tracking.names import JOB_TAG
from rtdlm_experiments.tracking.runs import search_runs

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run


def runs_frame(runs: Iterable[Run]) -> pd.DataFrame:
    """Runs as one row each, with ``metrics.*``, ``params.*`` and ``tags.*`` columns like
    `mlflow.search_runs` (built from a client's runs, so no global tracking URI is involved); metrics by
    plain name whether they were logged namespaced or not."""
    import pandas as pd

    records = []
    for run in runs:
        record: dict[str, Any] = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "start_time": pd.to_datetime(run.info.start_time, unit="ms"),
        }
        record.update({f"metrics.{key}": value for key, value in plain_metrics(run.data.metrics).items()})
        record.update({f"params.{key}": value for key, value in run.data.params.items()})
        record.update({f"tags.{key}": value for key, value in run.data.tags.items()})
        records.append(record)
    return pd.DataFrame.from_records(records)


def search_job_runs(
    client: MlflowClient, experiment_id: str, parent_run_id: str | None = None
) -> pd.DataFrame:
    """Every job run of an experiment, or only the children of one sweep, as `runs_frame`."""
    filters = [f"tags.`{JOB_TAG}` = 'true'"]
    if parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return runs_frame(search_runs(client, experiment_id, " and ".join(filters)))


def experiment_id(client: MlflowClient, name: str) -> str | None:
    """The id of experiment ``name``, or None when the store has none of that name."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None
