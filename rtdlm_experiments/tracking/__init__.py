"""MLflow: the store, job runs uploaded from their saved folders, and the parent runs of sweeps.

Every job first saves ``results.json`` and ``generations.jsonl`` to its output folder
(`rtdlm_experiments.results`) and only then uploads them here, so an unreachable tracking server loses
nothing: ``python -m rtdlm_experiments.tracking sync <dir>`` (`rtdlm_experiments.sync`) uploads saved
results later, from the same files and with the same code as the live path.

A multirun is one parent run with one child run per job; `rtdlm_experiments.callbacks` opens and ends
the parent. With ``tracking.parent_run_id=<id>`` a multirun resumes an existing parent instead
(`resume_sweep`).

MLflow is imported lazily: its import costs seconds and starts its telemetry, which is switched off
first (see `_MLFLOW_ENV_DEFAULTS`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from rtdlm_experiments.results import (
    CONFIG_HASH_TAG,
    GENERATIONS_FILE,
    JOB_TAG,
    LOGGED_FILE,
    RESULTS_FILE,
    flatten_config,
    load_job,
    read_sweep_info,
)
from rtdlm_experiments.schema import ConfigError, output_root

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

_MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # no "View run ... at" line per run
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # an unreachable server fails in seconds, not minutes
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""Applied with ``setdefault``: a value in the environment wins."""

_GENERATIONS_TABLE_COLUMNS = (
    "prompt_index", "sample_index", "category", "prompt", "output", "new_tokens", "finished_by_stop",
    "mean_logprob", "mean_entropy",
)  # fmt: skip

_SEARCH_PAGE_SIZE = 1000
"""MLflow's own default page size of ``search_runs``."""


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message, at most 300 characters: enough for a one-line warning.

    >>> first_line(ValueError("bad value\\nlong details"))
    'bad value'
    """
    return (str(err).strip().splitlines() or [""])[0][:300]


# --- connecting ---------------------------------------------------------------------------------------


def default_tracking_uri() -> str:
    """The embedded SQLite store under the output root (no server needed)."""
    return f"sqlite:///{output_root() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else `default_tracking_uri`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def mlflow_client(uri: str) -> MlflowClient:
    """A client for ``uri``; raises `TrackingUnavailable` at once when an HTTP server does not answer."""
    for key, value in _MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif db_path := _sqlite_path(uri):
        db_path.parent.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _check_server(uri: str, timeout: float = 3.0) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answered; whether /health exists behind a proxy does not matter
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnavailable(f"MLflow server {uri} is unreachable ({reason})") from err


def _sqlite_path(uri: str) -> Path | None:
    """
    >>> _sqlite_path("sqlite:////tmp/mlflow.db"), _sqlite_path("http://host:5000")
    (PosixPath('/tmp/mlflow.db'), None)
    """
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if needed. With a SQLite store its artifacts go to
    ``mlartifacts/<name>`` beside the database (MLflow's default would be relative to the cwd)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if db_path := _sqlite_path(client.tracking_uri):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        artifact_location = (db_path.parent / "mlartifacts" / slug).resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


# --- logging one job ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackedRun:
    """Where a job was logged."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    parent_run_id: str | None = None


def log_job(
    client: MlflowClient, experiment_id: str, job_dir: Path, parent_run_id: str | None = None
) -> TrackedRun:
    """Upload one job folder as a run: params (the flattened resolved config), tags, metrics, the
    generations as an MLflow table, the result files and the config (resolved + Hydra's) as artifacts.

    The run ends FINISHED for a completed job and FAILED for a failed one; on an upload error it is
    marked FAILED and the error propagates. A job a resumed sweep reused (``reused_run_id`` in its
    record) is already in the store: it is only marked as logged, never uploaded twice.
    """
    from mlflow.entities import RunStatus

    record, generations = load_job(job_dir)
    if reused_run_id := record.get("reused_run_id"):
        return _mark_logged(
            job_dir, TrackedRun(client.tracking_uri, experiment_id, reused_run_id, parent_run_id)
        )
    run = client.create_run(
        experiment_id,
        start_time=record["job"].get("started_at_ms"),
        tags=_run_tags(record, parent_run_id),
        run_name=record["job"]["run_name"],
    )
    run_id = run.info.run_id
    try:
        _log_run_contents(client, run_id, job_dir, record, generations)
    except Exception:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    status = RunStatus.FINISHED if record.get("status") == "COMPLETED" else RunStatus.FAILED
    client.set_terminated(run_id, RunStatus.to_string(status), end_time=record.get("ended_at_ms"))
    return _mark_logged(job_dir, TrackedRun(client.tracking_uri, experiment_id, run_id, parent_run_id))


def _log_run_contents(
    client: MlflowClient,
    run_id: str,
    job_dir: Path,
    record: Mapping[str, Any],
    generations: Sequence[Mapping[str, Any]],
) -> None:
    from mlflow.entities import Metric, Param

    timestamp = record.get("ended_at_ms") or int(time.time() * 1000)
    params = [Param(key, _param_value(value)) for key, value in flatten_config(record["config"]).items()]
    metrics = [Metric(key, float(value), timestamp, 0) for key, value in record.get("metrics", {}).items()]
    client.log_batch(run_id, metrics=metrics, params=params)
    if generations:
        import pandas as pd

        table = pd.DataFrame(
            [{key: row.get(key) for key in _GENERATIONS_TABLE_COLUMNS} for row in generations]
        )
        client.log_table(run_id, table, "generations_table.json")
    for name in (RESULTS_FILE, GENERATIONS_FILE):
        if (job_dir / name).is_file():
            client.log_artifact(run_id, str(job_dir / name))
    client.log_text(run_id, OmegaConf.to_yaml(record["config"]), "config.yaml")
    if (job_dir / ".hydra").is_dir():
        client.log_artifacts(run_id, str(job_dir / ".hydra"), "hydra")


def _mark_logged(job_dir: Path, tracked: TrackedRun) -> TrackedRun:
    (job_dir / LOGGED_FILE).write_text(json.dumps(tracked.__dict__, indent=2) + "\n", encoding="utf-8")
    return tracked


def _run_tags(record: Mapping[str, Any], parent_run_id: str | None) -> dict[str, str]:
    job, environment = record["job"], record.get("environment", {})
    tags = {
        JOB_TAG: "true",
        "hydra.overrides": " ".join(job.get("overrides", [])),
        "hydra.job_num": str(job.get("num", "")),
        "output_dir": str(job.get("output_dir", "")),
        CONFIG_HASH_TAG: str(record.get("config_hash", "")),
        "device": str(environment.get("device", "")),
        "dtype": str(environment.get("dtype", "")),
        "git_sha": str(environment.get("git_sha", "")),
    }
    if environment.get("git_sha"):
        tags["mlflow.source.git.commit"] = environment["git_sha"]
    if record.get("error"):
        tags["error"] = str(record["error"])[:4000]
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def _param_value(value: Any) -> str:
    """A param as MLflow stores it, cut to MLflow's limit on a param value.

    >>> _param_value([1, 2]), _param_value(0.5), len(_param_value("x" * 7000))
    ('[1, 2]', '0.5', 6000)
    """
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def is_logged(job_dir: Path, tracking_uri: str) -> bool:
    """Whether ``job_dir`` was already uploaded to ``tracking_uri``."""
    marker = job_dir / LOGGED_FILE
    return (
        marker.is_file()
        and json.loads(marker.read_text(encoding="utf-8")).get("tracking_uri") == tracking_uri
    )


def upload_job(
    job_dir: Path, tracking_uri: str | None, experiment_name: str, sweep_dir: Path | None = None
) -> TrackedRun | None:
    """Upload a job folder, as a child of its sweep's parent run when ``sweep_dir`` has one.

    Never raises: a tracking failure is one warning saying how to upload later, and the job stays a
    success with its results on disk. Returns None when nothing was logged.
    """
    sweep = read_sweep_info(sweep_dir) if sweep_dir else None
    if sweep is not None and sweep.get("mlflow_error"):
        log.info("MLflow was unavailable when the sweep started; results stay in %s", job_dir)
        return None
    uri = resolve_tracking_uri(tracking_uri)
    try:
        client = mlflow_client(uri)
        parent = (sweep or {}).get("mlflow") or {}
        experiment_id = parent.get("experiment_id") or ensure_experiment(client, experiment_name)
        return log_job(client, experiment_id, job_dir, parent.get("parent_run_id"))
    except Exception as err:
        log.warning(
            "MLflow logging to %s failed (%s: %s); results are saved in %s; upload them later with: "
            "python -m rtdlm_experiments.tracking sync %s",
            uri, type(err).__name__, first_line(err), job_dir, sweep_dir or job_dir,
        )  # fmt: skip
        return None


# --- finding runs -------------------------------------------------------------------------------------


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
    ``{hash: {"run_id", "run_name", "metrics"}}``.

    What a resumed sweep skips and what a drift check compares; when a config ran twice, the latest wins.
    """
    return {
        run.data.tags[CONFIG_HASH_TAG]: {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "metrics": dict(run.data.metrics),
        }
        for run in child_runs(client, parent)
        if run.info.status == "FINISHED" and run.data.tags.get(CONFIG_HASH_TAG)
    }


# --- sweep parent runs --------------------------------------------------------------------------------


def start_sweep(client: MlflowClient, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
    """Create the parent run of a sweep; returns its id."""
    return client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id


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


def finish_sweep(client: MlflowClient, parent_run_id: str, summary: Mapping[str, Path], failed: bool) -> None:
    """Attach the summary to the parent run and end it FINISHED, or FAILED when a job failed."""
    from mlflow.entities import RunStatus

    status = RunStatus.FAILED if failed else RunStatus.FINISHED
    try:
        for path in summary.values():
            client.log_artifact(parent_run_id, str(path))
    finally:  # a parent left RUNNING would look like a sweep still in progress
        client.set_terminated(parent_run_id, RunStatus.to_string(status))
