"""Finding runs in the store: pages of `search_runs`, by tag, a sweep's children and its finished jobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rtdlm_experiments.results.metric_names import plain_metrics
from rtdlm_experiments.tracking.names import CONFIG_HASH_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

_SEARCH_PAGE_SIZE = 1000
"""MLflow's own default page size of ``search_runs``."""


def search_runs(
    client: MlflowClient,
    experiment_id: str,
    filter_string: str = "",
    order_by: Sequence[str] = ("attributes.start_time ASC",),
    max_results: int | None = None,
) -> list[Run]:
    """Live runs of an experiment matching ``filter_string``, in ``order_by`` order: every page, or the
    first ``max_results`` runs."""
    page_size = min(max_results, _SEARCH_PAGE_SIZE) if max_results else _SEARCH_PAGE_SIZE
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string,
            max_results=page_size,
            order_by=list(order_by),
            page_token=page_token,
        )
        runs.extend(page)
        page_token = page.token
        if not page_token or (max_results is not None and len(runs) >= max_results):
            return runs[:max_results]


def search_runs_by_tag(
    client: MlflowClient, experiment_id: str, tags: Mapping[str, str], max_results: int | None = 100
) -> list[Run]:
    """Live runs of an experiment carrying every tag of ``tags`` (exact values), newest first."""
    if any("'" in value or "`" in key for key, value in tags.items()):
        raise ValueError(f"tags to search by cannot contain quotes: {dict(tags)}")
    filter_string = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    return search_runs(client, experiment_id, filter_string, ["attributes.start_time DESC"], max_results)


def find_run(client: MlflowClient, run_id: str) -> Run | None:
    """The run ``run_id``, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """The live (not deleted) child runs of a sweep's parent run, oldest first."""
    filter_string = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    return search_runs(client, parent.info.experiment_id, filter_string)


def finished_child_runs(client: MlflowClient, parent: Run) -> dict[str, dict[str, Any]]:
    """The FINISHED children of a sweep's parent run in the store, by config hash:
    ``{hash: {"run_id", "run_name", "metrics"}}``, metrics by plain name (`metric_names.plain_name`).

    What a resumed sweep skips and what a drift check compares; when a config ran twice, the latest wins.
    """
    return {
        run.data.tags[CONFIG_HASH_TAG]: {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "metrics": plain_metrics(run.data.metrics),
        }
        for run in child_runs(client, parent)
        if run.info.status == "FINISHED" and run.data.tags.get(CONFIG_HASH_TAG)
    }
