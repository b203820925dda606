"""Upload saved results to MLflow later: ``python -m rtdlm_experiments.tracking sync <dir>``.

A job folder, a sweep folder or any folder above them: every job not yet in the store is uploaded with
the same code as the live path (`rtdlm_experiments.tracking.log_job`), and a sweep's jobs become
children of its parent run, recreated when the store does not have it. A job whose ``results.json`` is
corrupt (truncated, not an object, missing keys) is named in one line and skipped: every good job is still
uploaded, and the command exits 1 at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtdlm_experiments import tracking
from rtdlm_experiments.analysis.report import summarize_sweep
from rtdlm_experiments.results.record import (
    HYDRA_SWEEP_FILE,
    RESULTS_FILE,
    job_dirs,
    load_job,
    read_sweep_info,
    sweep_failed,
    write_sweep_info,
)
from rtdlm_experiments.tracking import TrackedRun
from rtdlm_experiments.tracking.names import SWEEP_DIR_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient


RECORD_KEYS = {"config": ("experiment_name",), "job": ("run_name",), "status": ()}
"""What a job's record must hold to be uploaded: these keys, the first two objects with these keys."""


@dataclass
class SyncResult:
    uploaded: list[TrackedRun] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    """One line per job whose ``results.json`` could not be uploaded, naming the file and why."""


def record_problem(job_dir: Path) -> str | None:
    """Why the job's ``results.json`` cannot be uploaded (one line naming it), or None when it can."""
    path = job_dir / RESULTS_FILE
    try:
        record = load_job(job_dir)[0]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{path}: unreadable ({type(err).__name__}: {_first_line(err)})"
    if not isinstance(record, dict):
        return f"{path}: not a JSON object but {type(record).__name__}"
    for key, inner in RECORD_KEYS.items():
        if key not in record or (inner and not isinstance(record[key], dict)):
            return f"{path}: no {key!r} object" if inner else f"{path}: no {key!r}"
        if missing := [name for name in inner if name not in record[key]]:
            return f"{path}: {key!r} has no {missing[0]!r}"
    return None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def sync(
    directory: Path, tracking_uri: str | None = None, experiment_name: str | None = None, force: bool = False
) -> SyncResult:
    """Upload every saved job under ``directory`` that is not in the store yet (all of them with
    ``force``); returns the runs logged and a line for each job that could not be.

    Jobs of a sweep become children of its parent run: the original one when it exists in this store,
    else a new one, which is then ended FINISHED or FAILED like a live sweep's (FAILED when one of its
    jobs is corrupt).
    """
    result = SyncResult()
    jobs_by_sweep: dict[Path | None, list[Path]] = {}
    for job_dir in job_dirs(directory.resolve()):
        if problem := record_problem(job_dir):
            result.bad.append(problem)
            continue
        sweep_dir = job_dir.parent if (job_dir.parent / HYDRA_SWEEP_FILE).is_file() else None
        jobs_by_sweep.setdefault(sweep_dir, []).append(job_dir)
    for sweep_dir, jobs in jobs_by_sweep.items():
        if sweep_dir is not None:
            result.uploaded += _sync_sweep(sweep_dir, jobs, tracking_uri, experiment_name, force, result)
        else:
            result.uploaded += [
                run for job_dir in jobs if (run := _sync_job(job_dir, tracking_uri, experiment_name, force))
            ]
    return result


def _sync_job(
    job_dir: Path, tracking_uri: str | None, experiment_name: str | None, force: bool
) -> TrackedRun | None:
    """A single run's job: uploaded on its own, into its own experiment unless told otherwise."""
    record = load_job(job_dir)[0]
    uri = tracking.resolve_tracking_uri(tracking_uri or record.get("tracking_uri"))
    if not force and tracking.is_logged(job_dir, uri):
        return None
    client = tracking.mlflow_client(uri)
    experiment_id = tracking.ensure_experiment(client, experiment_name or _experiment_of(record))
    return tracking.log_job(client, experiment_id, job_dir)


def _experiment_of(record: Mapping[str, Any]) -> str:
    return record["config"]["experiment_name"]


def _sync_sweep(
    sweep_dir: Path,
    jobs: list[Path],
    tracking_uri: str | None,
    experiment_name: str | None,
    force: bool,
    result: SyncResult,
) -> list[TrackedRun]:
    first_record = load_job(jobs[0])[0]
    uri = tracking.resolve_tracking_uri(tracking_uri or first_record.get("tracking_uri"))
    pending = [job_dir for job_dir in jobs if force or not tracking.is_logged(job_dir, uri)]
    if not pending:
        return []
    client = tracking.mlflow_client(uri)
    parent = _sweep_parent(client, sweep_dir, experiment_name or _experiment_of(first_record))
    uploaded = [
        tracking.log_job(client, parent["experiment_id"], job, parent["parent_run_id"]) for job in pending
    ]
    corrupt = any(line.startswith(str(sweep_dir) + "/") for line in result.bad)
    summary = {} if corrupt else summarize_sweep(sweep_dir)  # the summary reads every job's record
    records = [load_job(job_dir)[0] for job_dir in jobs]
    failed = corrupt or sweep_failed(sweep_dir)
    tracking.finish_sweep(client, parent["parent_run_id"], summary, failed, records)
    return uploaded


def _sweep_parent(client: MlflowClient, sweep_dir: Path, experiment_name: str) -> dict[str, str]:
    """The sweep's parent run in this store (its ``sweep.json`` ``mlflow`` entry), created and recorded
    in ``sweep.json`` when the store does not have it."""
    info = read_sweep_info(sweep_dir) or {}
    parent = info.get("mlflow") or {}
    run_id = parent.get("parent_run_id")
    if parent.get("tracking_uri") == client.tracking_uri and run_id and tracking.find_run(client, run_id):
        return parent
    experiment_id = tracking.ensure_experiment(client, experiment_name)
    run_name = info.get("run_name") or f"multirun-{sweep_dir.name}"
    parent = {
        "tracking_uri": client.tracking_uri,
        "experiment_id": experiment_id,
        "parent_run_id": tracking.start_sweep(
            client, experiment_id, run_name, {SWEEP_DIR_TAG: str(sweep_dir)}
        ),
    }
    write_sweep_info(sweep_dir, {**info, "mlflow": parent, "mlflow_error": None})
    return parent


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rtdlm_experiments.tracking sync DIR [--uri URI] [--experiment NAME] [--force]``."""
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
        result = sync(args.directory, args.uri, args.experiment, args.force)
    except (tracking.TrackingUnavailable, OSError) as err:
        parser.exit(1, f"error: {err}\n")
    for run in result.uploaded:
        print(f"logged run {run.run_id} to {run.tracking_uri} (experiment {run.experiment_id})")
    uploaded = result.uploaded
    print(f"{len(uploaded)} job(s) uploaded" if uploaded else f"nothing to upload under {args.directory}")
    for problem in result.bad:
        print(f"error: not uploaded: {problem}", file=sys.stderr)
    return 1 if result.bad else 0
