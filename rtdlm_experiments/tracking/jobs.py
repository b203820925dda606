"""A job's run: opened RUNNING when the job starts, filled from its saved folder and ended when the job
has saved its results (`log_job`). The same code uploads a saved folder later (``sync``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from rtdlm_experiments.results.metric_names import metrics_to_log
from rtdlm_experiments.results.record import (
    GENERATIONS_FILE,
    LOGGED_FILE,
    RESULTS_FILE,
    flatten_config,
    load_job,
    read_sweep_info,
)
from rtdlm_experiments.tracking.contents import (
    flat_records_file,
    generation_rows,
    generations_html,
    job_tags,
    model_tags,
    prompt_set,
)
from rtdlm_experiments.tracking.runs import find_run
from rtdlm_experiments.tracking.store import (
    ensure_experiment,
    first_line,
    mlflow_client,
    resolve_tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

_AUTOREGRESSIVE = "autoregressive"

STARTED_FILE = "mlflow_run_started.json"
"""In a job's folder when its upload failed: the run `start_job_run` had opened, so that ``sync`` fills
that run rather than leaving it RUNNING beside a new one."""


@dataclass(frozen=True)
class TrackedRun:
    """Where a job was logged."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    parent_run_id: str | None = None


def start_job_run(
    tracking_uri: str | None, experiment_name: str, record: Mapping[str, Any], sweep_dir: Path | None
) -> TrackedRun | None:
    """Open the job's run RUNNING (name, tags, params of ``record``, a record without results yet), so the
    UI shows it while it generates. Never raises: None when the store is unavailable (the job's
    `upload_job` then tries again and says how to upload later)."""
    sweep = read_sweep_info(sweep_dir) if sweep_dir else None
    if sweep is not None and sweep.get("mlflow_error"):
        return None
    uri = resolve_tracking_uri(tracking_uri)
    try:
        client = mlflow_client(uri)
        parent = (sweep or {}).get("mlflow") or {}
        experiment_id = parent.get("experiment_id") or ensure_experiment(client, experiment_name)
        run_id = _create_run(client, experiment_id, record, parent.get("parent_run_id"))
    except Exception as err:
        log.info("could not open the MLflow run at %s yet (%s)", uri, first_line(err))
        return None
    started = TrackedRun(uri, experiment_id, run_id, parent.get("parent_run_id"))
    try:
        client.log_batch(run_id, params=_params(record))
    except Exception as err:  # the run exists: keep it, so the upload (or sync) fills it, not a second run
        log.info("could not log the params of run %s yet (%s)", run_id, first_line(err))
    return started


def _create_run(
    client: MlflowClient, experiment_id: str, record: Mapping[str, Any], parent_run_id: str | None
) -> str:
    run = client.create_run(
        experiment_id,
        start_time=record["job"].get("started_at_ms"),
        tags=job_tags(record, parent_run_id),
        run_name=record["job"]["run_name"],
    )
    return run.info.run_id


def log_job(
    client: MlflowClient,
    experiment_id: str,
    job_dir: Path,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> TrackedRun:
    """Upload one job folder into run ``run_id`` (opened by `start_job_run`), else the run the job opened
    before its upload failed (`STARTED_FILE`, still live in this store), else a new run: params (the
    flattened resolved config), tags, namespaced metrics, the prompt set as a dataset, the generations
    (table, HTML page), the result files, the record's extra artifacts and the config.

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
    if run_id is None and (started := _started_run(client, job_dir)) is not None:
        if started.info.status == "FINISHED":  # ended, but the job died before writing LOGGED_FILE
            tracked = TrackedRun(client.tracking_uri, experiment_id, started.info.run_id, parent_run_id)
            return _mark_logged(job_dir, tracked)
        run_id = started.info.run_id
    if run_id is None:
        run_id = _create_run(client, experiment_id, record, parent_run_id)
    else:
        for key, value in job_tags(record, parent_run_id).items():
            client.set_tag(run_id, key, value)
    try:
        _log_run_contents(client, run_id, job_dir, record, generations)
    except Exception:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    status = RunStatus.FINISHED if record.get("status") == "COMPLETED" else RunStatus.FAILED
    client.set_terminated(run_id, RunStatus.to_string(status), end_time=record.get("ended_at_ms"))
    return _mark_logged(job_dir, TrackedRun(client.tracking_uri, experiment_id, run_id, parent_run_id))


def _started_run(client: MlflowClient, job_dir: Path) -> Any:
    """The live run this job opened in this store before its upload failed (`STARTED_FILE`), if any."""
    marker = job_dir / STARTED_FILE
    if not marker.is_file():
        return None
    started = json.loads(marker.read_text(encoding="utf-8"))
    if started.get("tracking_uri") != client.tracking_uri:
        return None
    run = find_run(client, started["run_id"])
    return run if run is not None and run.info.lifecycle_stage == "active" else None


def _params(record: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(key, param_value(value)) for key, value in flatten_config(record["config"]).items()]


def _log_run_contents(
    client: MlflowClient,
    run_id: str,
    job_dir: Path,
    record: Mapping[str, Any],
    generations: Sequence[Mapping[str, Any]],
) -> None:
    from mlflow.entities import Metric

    timestamp = record.get("ended_at_ms") or int(time.time() * 1000)
    speculative = record["config"].get("decoder", {}).get("name", _AUTOREGRESSIVE) != _AUTOREGRESSIVE
    logged = metrics_to_log(record.get("metrics", {}), speculative)
    metrics = [Metric(key, value, timestamp, 0) for key, value in logged.items()]
    client.log_batch(run_id, metrics=metrics, params=_params(record))
    _log_model_and_prompts(client, run_id, record, generations)
    if generations:
        import pandas as pd

        rows = generation_rows(generations)
        client.log_table(run_id, pd.DataFrame(rows), "generations_table.json")
        client.log_text(run_id, generations_html(rows, record["job"]["run_name"]), "generations.html")
    for name in (RESULTS_FILE, GENERATIONS_FILE):
        if (job_dir / name).is_file():
            client.log_artifact(run_id, str(job_dir / name))
    _log_record_artifacts(client, run_id, job_dir, record.get("artifacts") or [])
    client.log_text(run_id, OmegaConf.to_yaml(record["config"]), "config.yaml")
    if (job_dir / ".hydra").is_dir():
        client.log_artifacts(run_id, str(job_dir / ".hydra"), "hydra")


def _log_model_and_prompts(
    client: MlflowClient, run_id: str, record: Mapping[str, Any], generations: Sequence[Mapping[str, Any]]
) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    model = record["config"].get("model") or {}
    environment = record.get("environment") or {}
    for key, value in model_tags(model, environment.get("dtype"), environment.get("weights_sha256")).items():
        client.set_tag(run_id, key, value)
    if dataset := prompt_set(record["config"], generations):
        context = InputTag(key="mlflow.data.context", value="eval")
        client.log_inputs(run_id, datasets=[DatasetInput(Dataset(**dataset), tags=[context])])


def _log_record_artifacts(client: MlflowClient, run_id: str, job_dir: Path, names: Sequence[str]) -> None:
    """The record's ``artifacts``: each file uploaded; a table file also as an MLflow table."""
    for name in names:
        path = (job_dir / name).resolve()
        if not path.is_file() or job_dir.resolve() not in path.parents:
            log.warning("artifact %s listed in %s is not a file of the job folder; skipped", name, job_dir)
            continue
        client.log_artifact(run_id, str(path))
        if (rows := flat_records_file(path)) is not None:
            import pandas as pd

            client.log_table(run_id, pd.DataFrame(rows), f"{path.stem}_table.json")


def _mark_logged(job_dir: Path, tracked: TrackedRun) -> TrackedRun:
    (job_dir / LOGGED_FILE).write_text(json.dumps(tracked.__dict__, indent=2) + "\n", encoding="utf-8")
    (job_dir / STARTED_FILE).unlink(missing_ok=True)
    return tracked


def param_value(value: Any) -> str:
    """A param as MLflow stores it, cut to MLflow's limit on a param value.

    >>> param_value([1, 2]), param_value(0.5), len(param_value("x" * 7000))
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
    job_dir: Path,
    tracking_uri: str | None,
    experiment_name: str,
    sweep_dir: Path | None = None,
    started: TrackedRun | None = None,
) -> TrackedRun | None:
    """Upload a job folder into the run `start_job_run` opened (``started``), else a new run, as a child
    of its sweep's parent run when ``sweep_dir`` has one.

    Never raises: a tracking failure is one warning saying how to upload later, and the job stays a
    success with its results on disk. Returns None when nothing was logged.
    """
    sweep = read_sweep_info(sweep_dir) if sweep_dir else None
    if sweep is not None and sweep.get("mlflow_error"):
        log.info("MLflow was unavailable when the sweep started; results stay in %s", job_dir)
        return None
    uri = started.tracking_uri if started else resolve_tracking_uri(tracking_uri)
    try:
        client = mlflow_client(uri)
        if started is not None:
            return log_job(client, started.experiment_id, job_dir, started.parent_run_id, started.run_id)
        parent = (sweep or {}).get("mlflow") or {}
        experiment_id = parent.get("experiment_id") or ensure_experiment(client, experiment_name)
        return log_job(client, experiment_id, job_dir, parent.get("parent_run_id"))
    except Exception as err:
        if started is not None:
            _remember_started(job_dir, started)
        log.warning(
            "MLflow logging to %s failed (%s: %s); results are saved in %s; upload them later with: "
            "python -m rtdlm_experiments.tracking sync %s",
            uri, type(err).__name__, first_line(err), job_dir, sweep_dir or job_dir,
        )  # fmt: skip
        return None


def _remember_started(job_dir: Path, started: TrackedRun) -> None:
    try:
        (job_dir / STARTED_FILE).write_text(json.dumps(started.__dict__, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        log.info("could not record run %s in %s (%s)", started.run_id, job_dir, err)


def discard_job_run(started: TrackedRun) -> None:
    """Delete a run `start_job_run` opened for a job that turned out to be a rejected config (nothing of
    it should remain). Never raises."""
    try:
        mlflow_client(started.tracking_uri).delete_run(started.run_id)
    except Exception as err:
        log.info("could not delete MLflow run %s (%s)", started.run_id, first_line(err))
