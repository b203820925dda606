"""A search's outcome on its sweep's parent run (files under ``search/``, the chosen trial's params as
tags, racing totals and the best values as metrics), and the sampling fields of a logged job run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rtdlm_experiments.tracking.names import SEARCH_TAG_PREFIX
from rtdlm_experiments.tracking.store import mlflow_client
from rtdlm_experiments.tracking.sweeps import attach_files


def log_search_outcome(
    tracking_uri: str,
    run_id: str,
    files: Mapping[str, Path],
    summary: Mapping[str, str],
    metrics: Mapping[str, float],
) -> None:
    """Attach a search's files to its parent run, its ``summary`` (`search.outcome.parent_summary`) as
    ``rtdlm.search.*`` tags and its metrics."""
    client = mlflow_client(tracking_uri)
    tags = {f"{SEARCH_TAG_PREFIX}{key}": value for key, value in summary.items()}
    attach_files(client, run_id, list(files.values()), tags, artifact_path="search")
    for name, value in metrics.items():
        client.log_metric(run_id, name, value)


def run_sampling_fields(tracking_uri: str, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """A run's ``sampling.*`` params (values as logged, strings) and its tags."""
    run = mlflow_client(tracking_uri).get_run(run_id)
    params = {key.removeprefix("sampling."): value for key, value in run.data.params.items()}
    sampling = {key: value for key, value in params.items() if f"sampling.{key}" in run.data.params}
    return sampling, dict(run.data.tags)


def run_tags(tracking_uri: str, run_id: str) -> dict[str, Any]:
    return dict(mlflow_client(tracking_uri).get_run(run_id).data.tags)
