"""A logged job's files, downloaded from its run (what ``compare`` reads when given a run id)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rtdlm_experiments.tracking.store import resolve_tracking_uri


def download_job_files(
    run_id: str, tracking_uri: str | None, folder: Path, required: str, optional: Sequence[str], suffix: str
) -> None:
    """Download the run's ``required`` file, each of ``optional`` it has and its top-level artifacts ending
    in ``suffix`` into ``folder``; exits with a one-line error when ``required`` is missing."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    artifacts = MlflowClient(tracking_uri=uri).list_artifacts(run_id)
    by_suffix = [item.path for item in artifacts if item.path.endswith(suffix)]
    for name in [*optional, required, *by_suffix]:
        try:
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=str(folder), tracking_uri=uri
            )
        except Exception as err:  # a missing optional file; a missing required one ends here
            if name == required:
                raise SystemExit(f"error: run {run_id} at {uri} has no {name}: {err}") from None
