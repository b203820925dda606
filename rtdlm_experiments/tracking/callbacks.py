"""The Hydra callback that owns a multirun (registered in ``conf/config.yaml``).

Before any job starts, in the launching process, it writes ``<sweep dir>/sweep.json`` (which every job
reads, whatever launcher runs it: joblib workers, submitit/Slurm jobs) and, with MLflow tracking, opens
the sweep's parent run. When the sweep ends, also when Hydra aborts it after a failed job, it writes the
summary table and plot (`rtdlm_experiments.analysis.report.summarize_sweep`), ends the parent FINISHED or
FAILED with them attached, and prints the table, each failed job's error and the UI link once.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rtdlm_experiments import terminal, tracking
from rtdlm_experiments.analysis.report import summarize_sweep
from rtdlm_experiments.results.record import (
    KEY_METRICS,
    RESULTS_FILE,
    job_dirs,
    load_job,
    read_sweep_info,
    sweep_failed,
    write_sweep_info,
)
from rtdlm_experiments.tracking import names
from rtdlm_experiments.tracking.names import SWEEP_DIR_TAG

log = logging.getLogger(__name__)


def sweep_info(config: DictConfig) -> dict[str, Any]:
    """The ``sweep.json`` of a multirun before its parent run exists: its name, its run name (what it
    sweeps and on which model, `names.sweep_run_name`) and the keys it sweeps over (from the command
    line and from the sweep preset)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task_overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    swept = {
        override.key_or_group: override.input_line.split("=", 1)[1]
        for override in task_overrides
        if override.is_sweep_override()
    }
    fixed = {override.key_or_group for override in task_overrides}  # the command line wins over a preset
    for key, values in (config.hydra.sweeper.get("params") or {}).items():
        if str(key) not in fixed:
            swept.setdefault(str(key), str(values))
    return {
        "name": config.hydra.runtime.choices.get("sweep") or "multirun",
        "run_name": names.sweep_run_name(swept, config.get("model", {}).get("name")),
        "swept_keys": list(swept),
        "mlflow": None,
    }


def open_parent_run(config: DictConfig, info: dict[str, Any], sweep_dir: Path) -> dict[str, Any]:
    """``info`` with the sweep's MLflow parent run: a resumed one (``tracking.parent_run_id``) with its
    finished jobs, or a new one; with ``mlflow_error`` instead when the store is unavailable."""
    overrides = " ".join(config.hydra.overrides.task)
    tags = {
        SWEEP_DIR_TAG: str(sweep_dir),
        "hydra.overrides": overrides,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": f"python -m rtdlm_experiments -m {overrides}",
    }
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
    """Write the sweep's summary, end its parent run (if any), FAILED when a job failed, and print the
    summary table, every failed job's error and where to see the sweep."""
    failed = job_failed or sweep_failed(sweep_dir)
    records = [load_job(job_dir)[0] for job_dir in job_dirs(sweep_dir)]
    try:
        summary = summarize_sweep(sweep_dir)
    except Exception as err:  # the parent run must still be ended below
        log.warning("could not summarize the sweep in %s (%s)", sweep_dir, tracking.first_line(err))
        summary = {}
    mlflow = (read_sweep_info(sweep_dir) or {}).get("mlflow")
    if mlflow:
        parent_run_id = mlflow["parent_run_id"]
        try:
            client = tracking.mlflow_client(mlflow["tracking_uri"])
            tracking.finish_sweep(client, parent_run_id, summary, failed, records)
            log.info("MLflow sweep run %s ended %s", parent_run_id, "FAILED" if failed else "FINISHED")
        except Exception as err:
            log.warning("could not end the MLflow sweep run %s (%s)", parent_run_id, tracking.first_line(err))
            mlflow = None
    print(sweep_end_text(records, sweep_dir, summary, mlflow, jobs_without_results(sweep_dir)), flush=True)


def jobs_without_results(sweep_dir: Path) -> list[str]:
    """The jobs Hydra started in ``sweep_dir`` that saved no ``results.json`` (their process died: killed,
    out of memory), as ``#<num> <its swept overrides>``, in job order."""
    from omegaconf import OmegaConf

    swept_keys = {
        names.override_key(key) for key in (read_sweep_info(sweep_dir) or {}).get("swept_keys") or []
    }
    lines = []
    for hydra_dir in sorted(sweep_dir.glob("*/.hydra"), key=lambda path: job_order(path.parent)):
        job_dir = hydra_dir.parent
        if (job_dir / RESULTS_FILE).is_file():
            continue
        overrides_file = hydra_dir / "overrides.yaml"
        overrides = [str(item) for item in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        swept = [item for item in overrides if names.override_key(item) in swept_keys]
        lines.append(f"#{job_dir.name} {' '.join(swept) or '(its overrides were not saved yet)'}")
    return lines


def job_order(job_dir: Path) -> tuple[int, str]:
    return (int(job_dir.name), "") if job_dir.name.isdigit() else (1 << 30, job_dir.name)


def sweep_end_text(
    records: list[dict[str, Any]],
    sweep_dir: Path,
    summary: dict[str, Path],
    mlflow: dict[str, str] | None,
    died: Sequence[str] = (),
) -> str:
    """What a sweep prints once at its end: the table of its jobs (metric [CI] where known), one line per
    failed job (also per job whose process died before saving anything, ``died``), where the files are and
    the link to its runs in the MLflow UI."""
    rows = [
        {"run": record["job"]["run_name"], "status": record.get("status", "?"), **record.get("metrics", {})}
        for record in records
    ]
    lines = ["", f"== sweep: {len(records)} jobs in {sweep_dir}", terminal.summary_text(rows, KEY_METRICS)]
    failures = [record for record in records if record.get("status") != "COMPLETED"]
    if failures or died:
        lines.append(f"{len(failures) + len(died)} job(s) failed:")
        lines += [
            f"  #{record['job'].get('num')} {record['job']['run_name']}: "
            + (str(record.get("error") or "no error recorded").strip().splitlines() or [""])[0][:300]
            for record in failures
        ]
        lines += [f"  {job}: died before saving its results (killed? out of memory?)" for job in died]
    if summary:
        lines.append(f"summary: {summary['md']}")
    if mlflow:
        uri, experiment_id = mlflow["tracking_uri"], mlflow["experiment_id"]
        lines.append(f"mlflow:  {tracking.runs_table_url(uri, experiment_id)}")
        lines.append(f"         sweep run: {tracking.run_url(uri, experiment_id, mlflow['parent_run_id'])}")
        if command := tracking.ui_command(uri):
            lines.append(f"         serve the store first: {command}")
    return "\n".join(lines)


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
