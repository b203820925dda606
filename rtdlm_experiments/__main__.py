"""``python -m rtdlm_experiments [overrides]``: run one experiment job, or a sweep of them with ``-m``.

python -m rtdlm_experiments                                   # default model, balanced preset
python -m rtdlm_experiments sampling=creative sampling.min_p=0.1
python -m rtdlm_experiments -m sampling=creative,balanced     # one MLflow parent, two children
python -m rtdlm_experiments sweep=presets                     # a preset sweep from conf/sweep/
python -m rtdlm_experiments --cfg job                         # print the composed config
python -m rtdlm_experiments --help                            # groups, options, examples
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.rtdlm_search import register_plugins
from rtdlm_experiments import terminal, tracking
from rtdlm_experiments.config import override_types
from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.config.paths import config_dir, ensure_output_root
from rtdlm_experiments.config.validation import prepare_job, resolved_config
from rtdlm_experiments.job import app
from rtdlm_experiments.results import record as results
from rtdlm_experiments.results.environment import environment_info
from rtdlm_experiments.search import trial as search_trial
from rtdlm_experiments.tracking import names


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> dict[str, float]:
    """Validate, open the job's run, generate, save the results to the job folder, then fill and end the
    run (never the reverse). A config rejected before generating leaves nothing behind in a single run."""
    terminal.quiet_third_party_progress()
    hydra_cfg = HydraConfig.get()
    job = job_meta(hydra_cfg, cfg)
    job_dir = Path(job.output_dir)
    sweep_dir = Path(job.sweep_dir) if job.sweep_dir else None
    tracked = cfg.tracking.backend == "mlflow"
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri) if tracked else None
    started = config = None
    try:
        spec = prepare_job(cfg)
        config = resolved_config(cfg, spec)
        if finished := _finished_earlier(config, sweep_dir):
            return _reuse(cfg, config, job, finished, tracking_uri)
        if tracked:
            started = tracking.start_job_run(
                cfg.tracking.uri, cfg.experiment_name, _pending_record(config, job), sweep_dir
            )
        race = search_trial.race_for_job(cfg, sweep_dir)
        result = app.run_job(spec, progress_factory=terminal.progress_factory, race=race)
    except Exception as err:
        if isinstance(err, ConfigError) and hydra_cfg.mode == RunMode.RUN:
            _reject(job_dir, started, err)
        if config is None:
            config = OmegaConf.to_container(cfg, resolve=True)
        results.save_job(job_dir, results.failure_record(config, job, err, tracking_uri), [])
        if tracked:
            tracking.upload_job(job_dir, cfg.tracking.uri, cfg.experiment_name, sweep_dir, started)
        raise

    record = results.job_record(config, result, job, tracking_uri)
    results.save_job(job_dir, record, results.generation_records(spec, result), result.artifacts)
    run = None
    if tracked:
        run = tracking.upload_job(job_dir, cfg.tracking.uri, cfg.experiment_name, sweep_dir, started)
    print(format_summary(record, job_dir, run if sweep_dir is None else None))
    return result.metrics


def _pending_record(config: dict[str, Any], job: results.JobMeta) -> dict[str, Any]:
    """What is known of a job before it generates: enough to open its run (name, tags, params)."""
    return {
        "status": "RUNNING",
        "config": config,
        "config_hash": results.config_hash(config),
        "job": asdict(job),
        "environment": environment_info(),
    }


def _reject(job_dir: Path, started: tracking.TrackedRun | None, err: Exception) -> NoReturn:
    """A single run's config the app cannot run: one line, exit 2, and no run folder or run left."""
    if started is not None:
        tracking.discard_job_run(started)
    shutil.rmtree(job_dir, ignore_errors=True)  # Hydra made it (.hydra/, the log) before the job ran
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def _finished_earlier(config: dict[str, Any], sweep_dir: Path | None) -> dict[str, Any] | None:
    """This job's FINISHED run from an earlier attempt, when its sweep resumes a parent run."""
    if sweep_dir is None:
        return None
    return results.finished_job_on_disk(sweep_dir, results.config_hash(config))


def _reuse(
    cfg: DictConfig,
    config: dict[str, Any],
    job: results.JobMeta,
    finished: dict[str, Any],
    tracking_uri: str | None,
) -> dict[str, float]:
    """A resumed sweep's job that already FINISHED: record that (no new run) instead of generating."""
    record = results.reused_record(config, job, tracking_uri, finished)
    job_dir = Path(job.output_dir)
    results.save_job(job_dir, record, [])
    tracking.upload_job(job_dir, cfg.tracking.uri, cfg.experiment_name, Path(job.sweep_dir))
    print(f"== {job.run_name} | already FINISHED as MLflow run {finished['run_id']}: not rerun")
    return record["metrics"]


def job_meta(hydra_cfg: DictConfig, cfg: DictConfig) -> results.JobMeta:
    """This job's place in its run or sweep, and its run name (`rtdlm_experiments.tracking.names`): in a
    sweep its own values of the swept keys, else ``preset · decoder · model``."""
    overrides = list(hydra_cfg.overrides.task)
    sweep_dir = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hydra_cfg.sweep.dir).resolve()
        swept = (results.read_sweep_info(sweep_dir) or {}).get("swept_keys") or []
        run_name = names.child_run_name(overrides, swept)
    else:
        run_name = names.single_run_name(
            str(cfg.sampling.preset), str(cfg.decoder.name), str(cfg.model.name), overrides
        )
    return results.JobMeta(
        run_name=run_name,
        overrides=overrides,
        num=int(hydra_cfg.job.get("num") or 0),
        output_dir=str(Path(hydra_cfg.runtime.output_dir).resolve()),
        sweep_dir=str(sweep_dir) if sweep_dir else None,
        started_at_ms=int(time.time() * 1000),
    )


def format_summary(record: dict[str, Any], job_dir: Path, run: tracking.TrackedRun | None) -> str:
    """The few lines printed after a job: key metrics, where the files are and, for a single run, where
    to see it (a sweep prints its link once, at its end)."""
    config, metrics = record["config"], record["metrics"]
    lines = [
        f"== {record['job']['run_name']} | {record['num_prompts']} prompts x {config['num_samples']} "
        f"samples x {config['max_new_tokens']} new tokens"
    ]
    if engine := (config.get("model") or {}).get("engine"):
        lines.append(f"  engine  {engine} ({config['model'].get('name', '?')})")
    shown = [name for name in results.KEY_METRICS if terminal.with_interval(metrics, name)]
    width = max(map(len, shown), default=0)
    lines += [f"  {name:<{width}}  {terminal.with_interval(metrics, name, digits=4)}" for name in shown]
    lines.append(f"results: {job_dir / results.RESULTS_FILE}")
    if run is not None:
        url = tracking.runs_table_url(run.tracking_uri, run.experiment_id)
        lines.append(f"mlflow:  {url}  (run {run.run_id})")
        if command := tracking.ui_command(run.tracking_uri):
            lines.append(f"         serve the store first: {command}")
    return "\n".join(lines)


def cli() -> None:
    """``main`` behind a check of the numeric overrides' types and of the output folder, so that
    ``seed=abc`` or an uncreatable ``RTDLM_OUTPUT_DIR`` is rejected like every other bad value: one line,
    exit code 2."""
    try:
        override_types.check_overrides(sys.argv[1:])
        ensure_output_root()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    register_plugins()
    main()


if __name__ == "__main__":
    cli()
