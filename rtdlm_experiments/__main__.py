"""``python -m rtdlm_experiments [overrides]``: run one experiment job, or a sweep of them with ``-m``.

python -m rtdlm_experiments                                   # default model, balanced preset
python -m rtdlm_experiments sampling=creative sampling.min_p=0.1
python -m rtdlm_experiments -m sampling=creative,balanced     # one MLflow parent, two children
python -m rtdlm_experiments sweep=presets                     # a preset sweep from conf/sweep/
python -m rtdlm_experiments --cfg job                         # print the composed config
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rtdlm_experiments import app, results, tracking
from rtdlm_experiments.schema import ConfigError, config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> dict[str, float]:
    """Validate, generate, save the results to the job folder, then upload them (never the reverse)."""
    hydra_cfg = HydraConfig.get()
    job = job_meta(hydra_cfg)
    job_dir = Path(job.output_dir)
    sweep_dir = Path(job.sweep_dir) if job.sweep_dir else None
    tracked = cfg.tracking.backend == "mlflow"
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri) if tracked else None
    spec = None
    try:
        spec = app.prepare_job(cfg)
        if finished := _finished_earlier(cfg, spec, sweep_dir):
            return _reuse(cfg, spec, job, finished, tracking_uri)
        result = app.run_job(spec, progress_factory=_progress_bar)
    except Exception as err:
        if isinstance(err, ConfigError) and hydra_cfg.mode == RunMode.RUN:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        config = app.resolved_config(cfg, spec) if spec else OmegaConf.to_container(cfg, resolve=True)
        results.save_job(job_dir, results.failure_record(config, job, err, tracking_uri), [])
        if tracked:
            tracking.upload_job(job_dir, cfg.tracking.uri, cfg.experiment_name, sweep_dir)
        raise

    record = results.job_record(app.resolved_config(cfg, spec), result, job, tracking_uri)
    results.save_job(job_dir, record, results.generation_records(spec, result))
    run = tracking.upload_job(job_dir, cfg.tracking.uri, cfg.experiment_name, sweep_dir) if tracked else None
    print(format_summary(record, job_dir, run, cfg.experiment_name))
    return result.metrics


def _finished_earlier(cfg: DictConfig, spec: app.JobSpec, sweep_dir: Path | None) -> dict[str, Any] | None:
    """This job's FINISHED run from an earlier attempt, when its sweep resumes a parent run."""
    if sweep_dir is None:
        return None
    return results.finished_job_on_disk(sweep_dir, results.config_hash(app.resolved_config(cfg, spec)))


def _reuse(
    cfg: DictConfig,
    spec: app.JobSpec,
    job: results.JobMeta,
    finished: dict[str, Any],
    tracking_uri: str | None,
) -> dict[str, float]:
    """A resumed sweep's job that already FINISHED: record that (no new run) instead of generating."""
    record = results.reused_record(app.resolved_config(cfg, spec), job, tracking_uri, finished)
    job_dir = Path(job.output_dir)
    results.save_job(job_dir, record, [])
    tracking.upload_job(job_dir, cfg.tracking.uri, cfg.experiment_name, Path(job.sweep_dir))
    print(f"== {job.run_name} | already FINISHED as MLflow run {finished['run_id']}: not rerun")
    return record["metrics"]


def job_meta(hydra_cfg: DictConfig) -> results.JobMeta:
    """This job's place in its run or sweep. In a sweep its run name is its value of each swept key
    (``sampling=creative``, not ``sampling=creative model=tiny-random``); else all its overrides."""
    overrides = list(hydra_cfg.overrides.task)
    sweep_dir = None
    name_parts = overrides
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hydra_cfg.sweep.dir).resolve()
        if swept := (results.read_sweep_info(sweep_dir) or {}).get("swept_keys"):
            name_parts = [override for override in overrides if _override_key(override) in swept]
    return results.JobMeta(
        run_name=" ".join(name_parts) or "default",
        overrides=overrides,
        num=int(hydra_cfg.job.get("num") or 0),
        output_dir=str(Path(hydra_cfg.runtime.output_dir).resolve()),
        sweep_dir=str(sweep_dir) if sweep_dir else None,
        started_at_ms=int(time.time() * 1000),
    )


def _override_key(override: str) -> str:
    """``+sampling.top_p=0.9`` → ``sampling.top_p`` (Hydra hands jobs their overrides as ``key=value``)."""
    return override.split("=", 1)[0].lstrip("+~")


def format_summary(
    record: dict[str, Any], job_dir: Path, run: tracking.TrackedRun | None, experiment_name: str
) -> str:
    """The few lines printed after a job: key metrics, where the files are, where the MLflow run is."""
    config, metrics = record["config"], record["metrics"]
    lines = [
        f"== {record['job']['run_name']} | model={config['model']['name']} | "
        f"preset={config['sampling']['preset']} | decoder={config['decoder']['name']} | "
        f"{record['num_prompts']} prompts x {config['num_samples']} samples x "
        f"{config['max_new_tokens']} new tokens"
    ]
    shown = [name for name in results.KEY_METRICS if name in metrics]
    width = max(map(len, shown), default=0)
    lines += [f"  {name:<{width}}  {metrics[name]:.4g}" for name in shown]
    lines.append(f"results: {job_dir / results.RESULTS_FILE}")
    if run is not None:
        lines.append(f"mlflow:  run {run.run_id} in experiment {experiment_name!r} at {run.tracking_uri}")
        if run.tracking_uri.startswith("sqlite:"):
            lines.append(f"         browse: mlflow ui --backend-store-uri {run.tracking_uri} --workers 1")
    return "\n".join(lines)


def _progress_bar(total: int, description: str) -> Any:
    """A tqdm bar over generated sequences; silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="seq", disable=None, leave=False)


if __name__ == "__main__":
    main()
