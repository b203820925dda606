"""MLflow: the store, job runs uploaded from their saved folders, and the parent runs of sweeps.

Every job first saves ``results.json`` and ``generations.jsonl`` to its output folder
(`rtdlm_experiments.results.record`) and only then fills its run here, so an unreachable tracking server loses
nothing: ``python -m rtdlm_experiments.tracking sync <dir>`` (`rtdlm_experiments.tracking.sync`) uploads saved
results later, from the same files and with the same code as the live path.

A multirun is one parent run with one child run per job; `rtdlm_experiments.tracking.callbacks` opens and ends
the parent. With ``tracking.parent_run_id=<id>`` a multirun resumes an existing parent instead
(`resume_sweep`).

Modules: `store` (URI, client, store creation under a lock, experiment, UI links), `names` (tag
names, run names), `contents` (what a run holds, built from a saved job), `jobs` (a job's run), `runs`
(finding runs), `sweeps` (parent runs), `scheduled` (the scheduler's parent runs and drift tags).
"""

from rtdlm_experiments.tracking.jobs import (
    TrackedRun,
    discard_job_run,
    is_logged,
    log_job,
    start_job_run,
    upload_job,
)
from rtdlm_experiments.tracking.names import BEST_JOB_DIR_TAG, SWEEP_TAG
from rtdlm_experiments.tracking.runs import (
    child_runs,
    find_run,
    finished_child_runs,
    search_runs,
    search_runs_by_tag,
)
from rtdlm_experiments.tracking.search import log_search_outcome, run_sampling_fields
from rtdlm_experiments.tracking.store import (
    TrackingUnavailable,
    default_tracking_uri,
    ensure_experiment,
    first_line,
    mlflow_client,
    resolve_tracking_uri,
    run_url,
    runs_table_url,
    ui_command,
)
from rtdlm_experiments.tracking.sweeps import (
    attach_files,
    common_params,
    end_if_running,
    finish_sweep,
    resume_sweep,
    start_sweep,
)
from rtdlm_experiments.tracking.tables import experiment_id, runs_frame, search_job_runs

__all__ = [
    "BEST_JOB_DIR_TAG",
    "SWEEP_TAG",
    "TrackedRun",
    "TrackingUnavailable",
    "attach_files",
    "child_runs",
    "common_params",
    "default_tracking_uri",
    "discard_job_run",
    "end_if_running",
    "ensure_experiment",
    "experiment_id",
    "find_run",
    "finish_sweep",
    "finished_child_runs",
    "first_line",
    "is_logged",
    "log_job",
    "log_search_outcome",
    "mlflow_client",
    "resolve_tracking_uri",
    "resume_sweep",
    "run_sampling_fields",
    "run_url",
    "runs_frame",
    "runs_table_url",
    "search_job_runs",
    "search_runs",
    "search_runs_by_tag",
    "start_job_run",
    "start_sweep",
    "ui_command",
    "upload_job",
]
