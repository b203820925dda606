"""Connecting to the MLflow store: the URI, the client, safe creation of the embedded SQLite store, the
experiment (set up so the UI opens on its runs table) and the UI links printed after a job or sweep.

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
from pathlib import Path
from typing import TYPE_CHECKING

from rtdlm_experiments.config.paths import output_root
from rtdlm_experiments.results.metric_names import namespaced
from rtdlm_experiments.results.record import KEY_METRICS

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

_MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # no "View run ... at" line per run
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # an unreachable server fails in seconds, not minutes
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""Applied with ``setdefault``: a value in the environment wins."""

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""The MLflow 3 UI reads this experiment tag to choose between its GenAI pages and the classic runs
table; ``custom_model_development`` ("Machine learning") opens on the runs table."""
EXPERIMENT_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"
"""The experiment's description in the UI."""
EXPERIMENT_DESCRIPTION = (
    "Sampling experiments from rtdlm-experiments. Each sweep is a parent run (`sweep <what is swept> · "
    "<model>`, with the summary table attached) whose child runs are its jobs; single jobs are runs named "
    "`preset · decoder · model`. Metrics are grouped as diversity/, repetition/, quality/, likelihood/, "
    "speed/ and spec/ (draft-then-verify decoders only). Each run's artifacts hold generations.html "
    "(prompts and completions), results.json and the composed config."
)

RUNS_VIEW_KEY = "rtdlm"
"""The experiment's shared view of the runs table that the printed links open (``viewStateShareKey``):
MLflow 3 shows no metric column until one is picked, and nests a sweep's jobs under a collapsed parent;
this view shows the key metrics and configuration as columns and lists every run, best distinct-2 first."""
_SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
_VIEW_PARAMS = ("model.name", "sampling.preset", "decoder.name")

_STORE_INIT_ATTEMPTS = 5
_STORE_LOCK_TIMEOUT_S = 300


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message, at most 300 characters: enough for a one-line warning.

    >>> first_line(ValueError("bad value\\nlong details"))
    'bad value'
    """
    return (str(err).strip().splitlines() or [""])[0][:300]


def default_tracking_uri() -> str:
    """The embedded SQLite store under the output root (no server needed)."""
    return f"sqlite:///{output_root() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else `default_tracking_uri`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def mlflow_client(uri: str) -> MlflowClient:
    """A client for ``uri``; raises `TrackingUnavailable` at once when an HTTP server does not answer.

    An embedded SQLite store is created (or migrated) under a file lock, so processes started together
    (the jobs of a sweep, ``report``, ``mlflow ui`` opened right away) never migrate it at once.
    """
    for key, value in _MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    from mlflow import MlflowClient

    if db_path := sqlite_path(uri):
        return open_sqlite_store(uri, db_path)
    return MlflowClient(tracking_uri=uri)


def open_sqlite_store(uri: str, db_path: Path) -> MlflowClient:
    """A client of the SQLite store at ``db_path``, created or migrated (which MLflow does when the
    client is made) while holding ``<db>.lock``; a failed attempt is retried, since a program that
    does not take the lock (``mlflow ui``) may be migrating it at the same time."""
    from filelock import FileLock
    from mlflow import MlflowClient

    db_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db_path) + ".lock", timeout=_STORE_LOCK_TIMEOUT_S):
        for attempt in range(1, _STORE_INIT_ATTEMPTS + 1):
            try:
                client = MlflowClient(tracking_uri=uri)  # builds the store: tables, migrations
                client.search_experiments(max_results=1)
                return client
            except Exception as err:
                if attempt == _STORE_INIT_ATTEMPTS:
                    raise TrackingUnavailable(f"cannot open {db_path}: {first_line(err)}") from err
                log.info("opening %s failed (%s); retrying", db_path, first_line(err))
                time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def _check_server(uri: str, timeout: float = 3.0) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answered; whether /health exists behind a proxy does not matter
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnavailable(f"MLflow server {uri} is unreachable ({reason})") from err


def sqlite_path(uri: str) -> Path | None:
    """
    >>> sqlite_path("sqlite:////tmp/mlflow.db"), sqlite_path("http://host:5000")
    (PosixPath('/tmp/mlflow.db'), None)
    """
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if needed, tagged so the UI opens on its runs table and
    shows a description. With a SQLite store its artifacts go to ``mlartifacts/<name>`` beside the
    database (MLflow's default would be relative to the cwd)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        if db_path := sqlite_path(client.tracking_uri):
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
            artifact_location = (db_path.parent / "mlartifacts" / slug).resolve().as_uri()
        experiment_id, tags = _create_experiment(client, name, artifact_location)
    else:
        experiment_id, tags = experiment.experiment_id, dict(experiment.tags)
    if EXPERIMENT_KIND_TAG not in tags:  # a kind a user picked in the UI is kept
        _set_experiment_tag(client, experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if DESCRIPTION_TAG not in tags:
        _set_experiment_tag(client, experiment_id, DESCRIPTION_TAG, EXPERIMENT_DESCRIPTION)
    view = runs_view_state()
    if tags.get(_SHARED_VIEW_TAG_PREFIX + RUNS_VIEW_KEY) != view:
        _set_experiment_tag(client, experiment_id, _SHARED_VIEW_TAG_PREFIX + RUNS_VIEW_KEY, view)
    return experiment_id


def _set_experiment_tag(client: MlflowClient, experiment_id: str, key: str, value: str) -> None:
    """Set an experiment tag, once more after an error: MLflow's SQL store inserts a tag it did not find,
    so two processes setting a new tag at once collide on its key (the server answers 400, seen on
    PostgreSQL); the second try updates the row the other one inserted."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_experiment_tag(experiment_id, key, value)
    except MlflowException as err:
        log.info("setting tag %s of experiment %s failed (%s); retrying", key, experiment_id, first_line(err))
        client.set_experiment_tag(experiment_id, key, value)


def _create_experiment(
    client: MlflowClient, name: str, artifact_location: str | None
) -> tuple[str, dict[str, str]]:
    """Create experiment ``name``; when another process created it first (jobs or sweeps started together
    against a fresh store), that one, with its tags."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location), {}
    except MlflowException as err:
        found = client.get_experiment_by_name(name) if err.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if found is None:
            raise
        return found.experiment_id, dict(found.tags)


_VIEW_ORDER_METRIC = "distinct_2"
"""Every job has it (quality metrics exist only for task-scored prompt sets), so sorting by it lists all."""


def runs_view_state() -> str:
    """The JSON of `RUNS_VIEW_KEY`: columns (attributes, the configuration params, the key metrics under
    their logged names) and the order (a metric, so runs are listed flat rather than nested)."""
    columns = ["attributes.`Source`", "attributes.`Dataset`"]
    columns += [f"params.`{name}`" for name in _VIEW_PARAMS]
    columns += [f"metrics.`{namespaced(name)}`" for name in KEY_METRICS]
    order = f"metrics.`{namespaced(_VIEW_ORDER_METRIC)}`"
    return json.dumps({"selectedColumns": columns, "orderByKey": order, "orderByAsc": False})


# --- where to look --------------------------------------------------------------------------------------

DEFAULT_UI = "http://127.0.0.1:5000"


def ui_base(tracking_uri: str) -> str:
    """The web UI serving ``tracking_uri``: the server itself, or where ``mlflow ui`` listens by default.

    >>> ui_base("http://host:5000/"), ui_base("sqlite:////tmp/mlflow.db")
    ('http://host:5000', 'http://127.0.0.1:5000')
    """
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI


def runs_table_url(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's classic runs table (not MLflow 3's GenAI overview) in `RUNS_VIEW_KEY`'s view.

    >>> runs_table_url("http://h:5000", "3")
    'http://h:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=rtdlm'
    """
    return (
        f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_KEY}"
    )


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """One run's page.

    >>> run_url("http://h:5000", "3", "abc")
    'http://h:5000/#/experiments/3/runs/abc'
    """
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves an embedded store's UI (None for a server, which already has one)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    return f"mlflow ui --backend-store-uri {tracking_uri} --workers 1"
