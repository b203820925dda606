"""The Hydra callback that owns a multirun (registered in ``conf/config.yaml``).

Before any job starts, in the launching process, it writes ``<sweep dir>/sweep.json`` (which every job
reads, whatever launcher runs it: joblib workers, submitit/Slurm jobs) and, with MLflow tracking, opens
the sweep's parent run. When the sweep ends, also when Hydra aborts it after a failed job, it writes the
summary table and plot (`rtdlm_experiments.report.summarize_sweep`) and ends the parent FINISHED or
FAILED with them attached.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rtdlm_experiments import tracking
from rtdlm_experiments.report import summarize_sweep
from rtdlm_experiments.results import read_sweep_info, sweep_failed, write_sweep_info

log = logging.getLogger(__name__)


def sweep_info(config: DictConfig) -> dict[str, Any]:
    """The ``sweep.json`` of a multirun before its parent run exists: its name, run name and the keys it
    sweeps over (from the command line and from the sweep preset)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep_dir = Path(config.hydra.sweep.dir).resolve()
    task_overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    swept = [override.key_or_group for override in task_overrides if override.is_sweep_override()]
    name = config.hydra.runtime.choices.get("sweep") or "multirun"
    return {
        "name": name,
        "run_name": f"{name}-{sweep_dir.name}",
        "swept_keys": list(dict.fromkeys(swept + list(config.hydra.sweeper.get("params") or {}))),
        "mlflow": None,
    }


def open_parent_run(config: DictConfig, info: dict[str, Any], sweep_dir: Path) -> dict[str, Any]:
    """``info`` with the sweep's MLflow parent run: a resumed one (``tracking.parent_run_id``) with its
    finished jobs, or a new one; with ``mlflow_error`` instead when the store is unavailable."""
    tags = {"sweep_dir": str(sweep_dir), "hydra.overrides": " ".join(config.hydra.overrides.task)}
    uri = tracking.resolve_tracking_uri(config.tracking.uri)
    if config.tracking.get("parent_run_id"):
        # No fallback to an untracked sweep here: resuming blind would rerun the finished jobs.
        mlflow, finished = tracking.resume_sweep(
            tracking.mlflow_client(uri), config.tracking.parent_run_id, tags
        )
        return {**info, "mlflow": mlflow, "finished_jobs": finished}
    try:
        client = tracking.mlflow_client(uri)
        experiment_id = tracking.ensure_experiment(client, config.experiment_name)
        parent_run_id = tracking.start_sweep(client, experiment_id, info["run_name"], tags)
    except Exception as err:
        error = f"{type(err).__name__}: {tracking.first_line(err)}"
        log.warning(
            "MLflow at %s is unavailable (%s); the sweep runs and saves its results in %s; upload "
            "them afterwards with: python -m rtdlm_experiments.tracking sync %s",
            uri, error, sweep_dir, sweep_dir,
        )  # fmt: skip
        return {**info, "mlflow_error": error}
    mlflow = {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent_run_id}
    return {**info, "mlflow": mlflow}


def finish_sweep(sweep_dir: Path, job_failed: bool) -> None:
    """Write the sweep's summary and end its parent run (if any), FAILED when a job failed."""
    failed = job_failed or sweep_failed(sweep_dir)
    try:
        summary = summarize_sweep(sweep_dir)
    except Exception as err:  # the parent run must still be ended below
        log.warning("could not summarize the sweep in %s (%s)", sweep_dir, tracking.first_line(err))
        summary = {}
    if mlflow := (read_sweep_info(sweep_dir) or {}).get("mlflow"):
        parent_run_id = mlflow["parent_run_id"]
        try:
            tracking.finish_sweep(
                tracking.mlflow_client(mlflow["tracking_uri"]), parent_run_id, summary, failed
            )
            log.info("MLflow sweep run %s ended %s", parent_run_id, "FAILED" if failed else "FINISHED")
        except Exception as err:
            log.warning("could not end the MLflow sweep run %s (%s)", parent_run_id, tracking.first_line(err))
    if summary:
        log.info("sweep summary: %s", summary["md"])


class TrackingCallback(Callback):
    """Owns a multirun's ``sweep.json``, parent run and summary: set up before the first job, finished
    after the last.

    Hydra 1.3 skips ``on_multirun_end`` when a job fails (the sweeper re-raises the job's error), so the
    end is also registered with `atexit`; whichever runs first finishes the sweep, FAILED if any job
    failed. Single runs need nothing from here: the job logs its own run.
    """

    def __init__(self) -> None:
        self._sweep_dir: Path | None = None
        self._job_failed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        info = sweep_info(config)
        if config.tracking.backend == "mlflow":
            info = open_parent_run(config, info, sweep_dir)
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
        finish_sweep(sweep_dir, self._job_failed)
