"""The scheduler's runs (`rtdlm_experiments.schedule`): a sweep's parent found by its idempotency key,
started, claimed by the host that resumes it, its drift baseline found and the drift check attached.

The scheduler sees a run as a `ScheduledRun` (plain values), so MLflow's entities stay in here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtdlm_experiments.tracking.names import (
    DRIFT_BASELINE_TAG,
    DRIFT_DETAILS_TAG,
    DRIFT_TAG,
    HOST_TAG,
    LEGACY_SCHEDULE_HOST_TAG,
    LEGACY_SCHEDULE_SWEEP_TAG,
    SCHEDULE_KEY_TAG,
    SCHEDULE_OVERRIDES_TAG,
    SWEEP_DIR_TAG,
    SWEEP_TAG,
)
from rtdlm_experiments.tracking.runs import finished_child_runs, search_runs_by_tag
from rtdlm_experiments.tracking.sweeps import attach_files, start_sweep

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

_DRIFT_DETAILS_LIMIT = 5000


@dataclass(frozen=True)
class ScheduledRun:
    """A scheduled sweep's parent run as the scheduler needs it."""

    run_id: str
    run_name: str
    status: str
    host: str | None
    """The host whose scheduler runs it (older runs: their ``rtdlm.schedule.host``)."""
    sweep_dir: str | None


def _scheduled_run(run: Run) -> ScheduledRun:
    tags = run.data.tags
    return ScheduledRun(
        run_id=run.info.run_id,
        run_name=run.info.run_name,
        status=run.info.status,
        host=tags.get(LEGACY_SCHEDULE_HOST_TAG) or tags.get(HOST_TAG),
        sweep_dir=tags.get(SWEEP_DIR_TAG),
    )


def find_key_run(client: MlflowClient, experiment_id: str, key: str) -> ScheduledRun | None:
    """The latest parent run of ``key``, or None."""
    runs = search_runs_by_tag(client, experiment_id, {SCHEDULE_KEY_TAG: key}, max_results=1)
    return _scheduled_run(runs[0]) if runs else None


def start_scheduled_sweep(
    client: MlflowClient, experiment_id: str, key: str, sweep: str, host: str, overrides: Sequence[str]
) -> str:
    """A new parent run for ``key``, named after it; returns its id."""
    tags = {
        SCHEDULE_KEY_TAG: key,
        SWEEP_TAG: sweep,
        HOST_TAG: host,
        SCHEDULE_OVERRIDES_TAG: " ".join(overrides),
    }
    return start_sweep(client, experiment_id, key, tags)


def claim_scheduled_run(client: MlflowClient, run_id: str, host: str) -> None:
    """Mark ``host`` as the one running ``run_id`` now (an older run's ``rtdlm.schedule.host`` is dropped,
    so that `HOST_TAG` alone names the host from here on)."""
    client.set_tag(run_id, HOST_TAG, host)
    if LEGACY_SCHEDULE_HOST_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, LEGACY_SCHEDULE_HOST_TAG)


def run_status(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.status


def scheduled_jobs(client: MlflowClient, run_id: str) -> tuple[ScheduledRun, dict[str, dict[str, Any]]]:
    """The parent run ``run_id`` and its finished jobs (`finished_child_runs`)."""
    run = client.get_run(run_id)
    return _scheduled_run(run), finished_child_runs(client, run)


def find_baseline(
    client: MlflowClient, parent_run_id: str, sweep: str, config_hashes: set[str]
) -> tuple[ScheduledRun, dict[str, dict[str, Any]]] | None:
    """The latest scheduled run of ``sweep`` started before ``parent_run_id`` with a FINISHED job of one of
    ``config_hashes``, and its finished jobs. Runs of the same sweep with other overrides (another
    model, say) share no config hash with the parent and are passed over."""
    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    runs = {
        run.info.run_id: run
        for tag in (SWEEP_TAG, LEGACY_SCHEDULE_SWEEP_TAG)
        for run in search_runs_by_tag(client, experiment_id, {tag: sweep})
    }
    for run in sorted(runs.values(), key=lambda run: run.info.start_time, reverse=True):
        if run.info.run_id == parent_run_id or run.info.start_time >= parent.info.start_time:
            continue
        jobs = finished_child_runs(client, run)
        if jobs.keys() & config_hashes:
            return _scheduled_run(run), jobs
    return None


def attach_drift(
    client: MlflowClient,
    parent_run_id: str,
    verdict: str,
    files: Sequence[Path] = (),
    baseline_run_id: str | None = None,
    drifted: Sequence[str] = (),
) -> None:
    """The drift check on the parent: ``verdict`` (``ok``, ``drift`` or ``no_baseline``), the baseline run,
    the drifted metrics (shortened to what a tag holds) and the report ``files`` under ``drift/``."""
    tags: Mapping[str, str] = {DRIFT_TAG: verdict}
    if baseline_run_id:
        tags = {**tags, DRIFT_BASELINE_TAG: baseline_run_id}
    if drifted:
        tags = {**tags, DRIFT_DETAILS_TAG: "; ".join(drifted)[:_DRIFT_DETAILS_LIMIT]}
    attach_files(client, parent_run_id, list(files), tags, artifact_path="drift" if files else None)
