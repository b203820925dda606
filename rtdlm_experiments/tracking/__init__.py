"""Where results go: the job's output folder first, then MLflow.

Every job writes ``results.json`` and ``generations.jsonl`` to its output folder, and only then uploads
them, so an unreachable tracking server loses nothing: ``python -m rtdlm_experiments.tracking sync <dir>``
uploads saved results later, from the same files and with the same code as the live path.

A multirun is one parent run with one child run per job. `TrackingCallback` (registered in
``conf/config.yaml``) creates the store, the experiment and the parent run in the launching process
before any job starts, records them in ``<sweep dir>/sweep.json`` (which every job reads, whatever
launcher runs it: joblib workers, submitit/Slurm jobs) and ends the parent FINISHED or FAILED, with a
summary table and plot, when the sweep ends, also when Hydra aborts it after a failed job.

With ``tracking.parent_run_id=<id>`` a multirun resumes an existing parent instead: the jobs whose child
runs already FINISHED (same config hash) are not rerun, and the others are logged under that parent.

MLflow is imported lazily: its import costs seconds and starts its telemetry, which is switched off
first (see `_MLFLOW_ENV_DEFAULTS`).
"""

from __future__ import annotations

import argparse
import atexit
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

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rtdlm_experiments.schema import output_root

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
GENERATIONS_FILE = "generations.jsonl"
SWEEP_FILE = "sweep.json"
"""In a sweep's folder: its name, the keys it sweeps over and the MLflow parent run."""
LOGGED_FILE = "mlflow_run.json"
"""In a job's folder once uploaded: where to, so ``sync`` does not upload it twice."""
SUMMARY_STEM = "summary"
HYDRA_SWEEP_FILE = "multirun.yaml"
"""Written by Hydra into every sweep folder; how ``sync`` recognises one."""

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


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written."""


CONFIG_HASH_TAG = "config_hash"
"""Tag of every job run: `rtdlm_experiments.app.config_hash` of its resolved config."""


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


# --- job files ----------------------------------------------------------------------------------------


def save_job(job_dir: Path, record: Mapping[str, Any], generations: Sequence[Mapping[str, Any]]) -> None:
    """Write ``results.json`` and ``generations.jsonl`` to ``job_dir``."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / RESULTS_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    with open(job_dir / GENERATIONS_FILE, "w", encoding="utf-8") as file:
        for row in generations:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_job(job_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The record and generations `save_job` wrote."""
    record = json.loads((job_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    generations_file = job_dir / GENERATIONS_FILE
    generations = []
    if generations_file.is_file():
        with open(generations_file, encoding="utf-8") as file:
            generations = [json.loads(line) for line in file if line.strip()]
    return record, generations


def job_dirs(directory: Path) -> list[Path]:
    """Every folder under ``directory`` (itself included) holding a ``results.json``, in job order."""

    def job_order(path: Path) -> tuple[int, str]:
        return (int(path.name), "") if path.name.isdigit() else (1 << 30, str(path))

    return sorted((path.parent for path in directory.rglob(RESULTS_FILE)), key=job_order)


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
    from mlflow.entities import Metric, Param, RunStatus

    from rtdlm_experiments.app import flatten_config

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
        timestamp = record.get("ended_at_ms") or int(time.time() * 1000)
        params = [Param(key, _param_value(value)) for key, value in flatten_config(record["config"]).items()]
        metrics = [
            Metric(key, float(value), timestamp, 0) for key, value in record.get("metrics", {}).items()
        ]
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
    except Exception:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    status = RunStatus.FINISHED if record.get("status") == "COMPLETED" else RunStatus.FAILED
    client.set_terminated(run_id, RunStatus.to_string(status), end_time=record.get("ended_at_ms"))
    return _mark_logged(job_dir, TrackedRun(client.tracking_uri, experiment_id, run_id, parent_run_id))


def _mark_logged(job_dir: Path, tracked: TrackedRun) -> TrackedRun:
    (job_dir / LOGGED_FILE).write_text(json.dumps(tracked.__dict__, indent=2) + "\n", encoding="utf-8")
    return tracked


def _run_tags(record: Mapping[str, Any], parent_run_id: str | None) -> dict[str, str]:
    from rtdlm_experiments.report import JOB_TAG

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
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's limit on a param value


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
            uri, type(err).__name__, _first_line(err), job_dir, sweep_dir or job_dir,
        )  # fmt: skip
        return None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


# --- sweeps -------------------------------------------------------------------------------------------


def read_sweep_info(sweep_dir: Path) -> dict[str, Any] | None:
    """The sweep's ``sweep.json`` (written by `TrackingCallback` before its jobs start), if any."""
    path = sweep_dir / SWEEP_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_sweep_info(sweep_dir: Path, info: Mapping[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def start_sweep(client: MlflowClient, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
    """Create the parent run of a sweep; returns its id."""
    return client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """The live (not deleted) child runs of a sweep's parent run, oldest first."""
    filter_string = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    return _search_all(client, parent.info.experiment_id, filter_string)


def finished_jobs(client: MlflowClient, parent: Run) -> dict[str, dict[str, Any]]:
    """The FINISHED children of a sweep, by config hash: ``{hash: {"run_id", "run_name", "metrics"}}``.

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


def resume_sweep(
    client: MlflowClient, parent_run_id: str, tags: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Reopen an existing sweep parent for another attempt; returns its ``sweep.json`` ``mlflow`` entry
    and its finished jobs (`finished_jobs`).

    Children that did not finish (FAILED, or left RUNNING by a killed job) are soft-deleted: their job
    runs again in this attempt, and the parent keeps one child per job. A soft-deleted run stays in the
    store until someone runs ``mlflow gc``; ``MlflowClient.restore_run`` brings it back.
    """
    from rtdlm_experiments.report import JOB_TAG
    from rtdlm_experiments.schema import ConfigError

    parent = find_run(client, parent_run_id)
    if parent is None or parent.info.lifecycle_stage != "active":
        raise ConfigError(
            f"tracking.parent_run_id={parent_run_id!r} is invalid: no such run at {client.tracking_uri}"
        )
    if parent.data.tags.get(JOB_TAG) or parent.data.tags.get("mlflow.parentRunId"):
        raise ConfigError(
            f"tracking.parent_run_id={parent_run_id!r} is invalid: a job's run, not a sweep's parent"
        )
    finished = finished_jobs(client, parent)
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


def finished_job(sweep_dir: Path, config_hash: str) -> dict[str, Any] | None:
    """The earlier FINISHED run of a job with this config hash, when its sweep resumes a parent run."""
    return ((read_sweep_info(sweep_dir) or {}).get("finished_jobs") or {}).get(config_hash)


def find_run(client: MlflowClient, run_id: str) -> Run | None:
    """The run ``run_id``, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def search_runs_by_tag(
    client: MlflowClient, experiment_id: str, tags: Mapping[str, str], max_results: int = 100
) -> list[Run]:
    """Live runs of an experiment carrying every tag of ``tags`` (exact values), newest first."""
    if any("'" in value or "`" in key for key, value in tags.items()):
        raise ValueError(f"tags to search by cannot contain quotes: {dict(tags)}")
    filter_string = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs(
        [experiment_id], filter_string, max_results=max_results, order_by=["attributes.start_time DESC"]
    )
    return list(runs)


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Every live run matching ``filter_string``, oldest first."""
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, order_by=["attributes.start_time ASC"], page_token=page_token
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


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


def sweep_failed(sweep_dir: Path) -> bool:
    """Whether some job of the sweep failed: a FAILED record, or a job folder Hydra made without one."""
    launched = [path.parent for path in sweep_dir.glob("*/.hydra")]
    for job_dir in launched:
        if not (job_dir / RESULTS_FILE).is_file():
            return True
        if json.loads((job_dir / RESULTS_FILE).read_text(encoding="utf-8")).get("status") != "COMPLETED":
            return True
    return False


def summarize_sweep(sweep_dir: Path) -> dict[str, Path]:
    """Summary table (CSV, Markdown) and plot of every job of the sweep, from the saved records, written
    to the sweep folder; returns their paths (empty when no job saved a record)."""
    from rtdlm_experiments.report import records_frame, summary_table, write_report

    records = [load_job(job_dir)[0] for job_dir in job_dirs(sweep_dir)]
    if not records:
        return {}
    return write_report(summary_table(records_frame(records)), sweep_dir, stem=SUMMARY_STEM)


def finish_sweep(client: MlflowClient, parent_run_id: str, summary: Mapping[str, Path], failed: bool) -> None:
    """Attach the summary to the parent run and end it FINISHED, or FAILED when a job failed."""
    from mlflow.entities import RunStatus

    status = RunStatus.FAILED if failed else RunStatus.FINISHED
    try:
        for path in summary.values():
            client.log_artifact(parent_run_id, str(path))
    finally:  # a parent left RUNNING would look like a sweep still in progress
        client.set_terminated(parent_run_id, RunStatus.to_string(status))


class TrackingCallback(Callback):
    """Owns a multirun's parent run: created before the first job, ended after the last.

    Hydra 1.3 skips ``on_multirun_end`` when a job fails (the sweeper re-raises the job's error), so the
    end is also registered with `atexit`; whichever runs first ends the parent, with FAILED if any
    job failed. Single runs need nothing from here: the job logs its own run. With
    ``tracking.parent_run_id`` the parent is an existing one, reopened by `resume_sweep`.
    """

    def __init__(self) -> None:
        self._sweep_dir: Path | None = None
        self._job_failed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        task_overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        swept = [o.key_or_group for o in task_overrides if o.is_sweep_override()]
        name = config.hydra.runtime.choices.get("sweep") or "multirun"
        info: dict[str, Any] = {
            "name": name,
            "run_name": f"{name}-{sweep_dir.name}",
            "swept_keys": list(dict.fromkeys(swept + list(config.hydra.sweeper.get("params") or {}))),
            "mlflow": None,
        }
        tags = {"sweep_dir": str(sweep_dir), "hydra.overrides": " ".join(config.hydra.overrides.task)}
        if config.tracking.backend == "mlflow" and config.tracking.get("parent_run_id"):
            # No fallback to an untracked sweep here: resuming blind would rerun the finished jobs.
            client = mlflow_client(resolve_tracking_uri(config.tracking.uri))
            info["mlflow"], info["finished_jobs"] = resume_sweep(client, config.tracking.parent_run_id, tags)
        elif config.tracking.backend == "mlflow":
            uri = resolve_tracking_uri(config.tracking.uri)
            try:
                client = mlflow_client(uri)
                experiment_id = ensure_experiment(client, config.experiment_name)
                parent_run_id = start_sweep(client, experiment_id, info["run_name"], tags)
                info["mlflow"] = {
                    "tracking_uri": uri,
                    "experiment_id": experiment_id,
                    "parent_run_id": parent_run_id,
                }
            except Exception as err:
                info["mlflow_error"] = f"{type(err).__name__}: {_first_line(err)}"
                log.warning(
                    "MLflow at %s is unavailable (%s); the sweep runs and saves its results in %s; upload "
                    "them afterwards with: python -m rtdlm_experiments.tracking sync %s",
                    uri, info["mlflow_error"], sweep_dir, sweep_dir,
                )  # fmt: skip
        write_sweep_info(sweep_dir, info)
        self._sweep_dir = sweep_dir
        atexit.register(self._finish)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            self._job_failed = True

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._sweep_dir is None:
            return
        sweep_dir, self._sweep_dir = self._sweep_dir, None
        atexit.unregister(self._finish)
        failed = self._job_failed or sweep_failed(sweep_dir)
        try:
            summary = summarize_sweep(sweep_dir)
        except Exception as err:  # the parent run must still be ended below
            log.warning("could not summarize the sweep in %s (%s)", sweep_dir, _first_line(err))
            summary = {}
        info = read_sweep_info(sweep_dir) or {}
        if mlflow := info.get("mlflow"):
            try:
                finish_sweep(mlflow_client(mlflow["tracking_uri"]), mlflow["parent_run_id"], summary, failed)
                log.info(
                    "MLflow sweep run %s ended %s",
                    mlflow["parent_run_id"],
                    "FAILED" if failed else "FINISHED",
                )
            except Exception as err:
                log.warning(
                    "could not end the MLflow sweep run %s (%s)", mlflow["parent_run_id"], _first_line(err)
                )
        if summary:
            log.info("sweep summary: %s", summary["md"])


# --- sync ---------------------------------------------------------------------------------------------


def sync(
    directory: Path, tracking_uri: str | None = None, experiment_name: str | None = None, force: bool = False
) -> list[TrackedRun]:
    """Upload every saved job under ``directory`` (a job folder, a sweep folder or any folder above
    them) that is not in the store yet.

    Jobs of a sweep become children of its parent run: the original one when it exists in this store,
    else a new one, which is then ended FINISHED or FAILED like a live sweep's.
    """
    jobs_by_sweep: dict[Path | None, list[Path]] = {}
    for job_dir in job_dirs(directory.resolve()):
        sweep_dir = job_dir.parent if (job_dir.parent / HYDRA_SWEEP_FILE).is_file() else None
        jobs_by_sweep.setdefault(sweep_dir, []).append(job_dir)
    uploaded = []
    for sweep_dir, jobs in jobs_by_sweep.items():
        if sweep_dir is not None:
            uploaded += _sync_sweep(sweep_dir, jobs, tracking_uri, experiment_name, force)
            continue
        for job_dir in jobs:
            record = load_job(job_dir)[0]
            uri = resolve_tracking_uri(tracking_uri or record.get("tracking_uri"))
            if force or not is_logged(job_dir, uri):
                client = mlflow_client(uri)
                experiment_id = ensure_experiment(client, experiment_name or _experiment_of(record))
                uploaded.append(log_job(client, experiment_id, job_dir))
    return uploaded


def _experiment_of(record: Mapping[str, Any]) -> str:
    return record["config"]["experiment_name"]


def _sync_sweep(
    sweep_dir: Path, jobs: list[Path], tracking_uri: str | None, experiment_name: str | None, force: bool
) -> list[TrackedRun]:
    first_record = load_job(jobs[0])[0]
    uri = resolve_tracking_uri(tracking_uri or first_record.get("tracking_uri"))
    pending = [job_dir for job_dir in jobs if force or not is_logged(job_dir, uri)]
    if not pending:
        return []
    client = mlflow_client(uri)
    info = read_sweep_info(sweep_dir) or {}
    parent = info.get("mlflow") or {}
    if not (parent.get("tracking_uri") == uri and _run_exists(client, parent.get("parent_run_id"))):
        experiment_id = ensure_experiment(client, experiment_name or _experiment_of(first_record))
        run_name = info.get("run_name") or f"multirun-{sweep_dir.name}"
        parent = {
            "tracking_uri": uri,
            "experiment_id": experiment_id,
            "parent_run_id": start_sweep(client, experiment_id, run_name, {"sweep_dir": str(sweep_dir)}),
        }
        write_sweep_info(sweep_dir, {**info, "mlflow": parent, "mlflow_error": None})
    uploaded = [log_job(client, parent["experiment_id"], job, parent["parent_run_id"]) for job in pending]
    finish_sweep(client, parent["parent_run_id"], summarize_sweep(sweep_dir), sweep_failed(sweep_dir))
    return uploaded


def _run_exists(client: MlflowClient, run_id: str | None) -> bool:
    return bool(run_id) and find_run(client, run_id) is not None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtdlm_experiments.tracking")
    commands = parser.add_subparsers(dest="command", required=True)
    sync_parser = commands.add_parser("sync", help="upload saved results (a run folder or a multirun folder)")
    sync_parser.add_argument("directory", type=Path)
    sync_parser.add_argument("--uri", help="tracking URI (default: the one each job used)")
    sync_parser.add_argument("--experiment", help="experiment name (default: the one each job used)")
    sync_parser.add_argument("--force", action="store_true", help="upload again jobs already in the store")
    args = parser.parse_args(argv)

    if not args.directory.is_dir():
        parser.exit(2, f"error: {args.directory} is not a directory\n")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        uploaded = sync(args.directory, args.uri, args.experiment, args.force)
    except (TrackingUnavailable, OSError) as err:
        parser.exit(1, f"error: {err}\n")
    for run in uploaded:
        print(f"logged run {run.run_id} to {run.tracking_uri} (experiment {run.experiment_id})")
    print(f"{len(uploaded)} job(s) uploaded" if uploaded else f"nothing to upload under {args.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
