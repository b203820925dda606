"""``hydra/sweeper=optuna``: the official Hydra Optuna sweeper's config shape on the current Optuna.

``hydra-optuna-sweeper`` 1.3.0 (its last release) requires ``optuna<3.0.0``; this project needs Optuna's
current API (``constraints_func`` on TPE, the SQLite study store it shares with MLflow's folder), so the
sweeper is this small plugin. The search itself is `rtdlm_experiments.search.driver`; this class only
connects it to Hydra's launcher, the sweep's ``sweep.json`` and its MLflow parent run.
"""


import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.rtdlm_search.optuna_sweeper.OptunaSweeper"
    sampler: Any = "auto"
    """``auto`` (TPE for one objective, NSGA-II for several), ``tpe``, ``nsga2``, ``random``, or a config
    with ``_target_`` (e.g. ``optuna.samplers.CmaEsSampler``)."""
    direction: Any = None
    """Direction of an objective written without ``:max``/``:min`` (``maximize`` or ``minimize``)."""
    n_trials: int = 20
    n_jobs: int = 1
    """Trials launched together (in parallel with a parallel launcher)."""
    seed: Any = 0
    storage: Any = None
    """An Optuna storage URL; null: ``sqlite:///<output root>/optuna.db``."""
    study_name: Any = None
    """null: ``<sweep preset>-<hash of the space, objectives and fixed overrides>``, so rerunning the same
    command resumes its study."""
    params: Any = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="rtdlm")


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from rtdlm_experiments.search.driver import SearchSettings

        params = settings.pop("params", None) or {}
        self.settings = SearchSettings(params={str(k): str(v) for k, v in params.items()}, **settings)
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from rtdlm_experiments import tracking
        from rtdlm_experiments.config.errors import ConfigError
        from rtdlm_experiments.config.paths import output_root
        from rtdlm_experiments.results.record import read_sweep_info
        from rtdlm_experiments.search.driver import run_search
        from rtdlm_experiments.search.outcome import parent_summary

        assert self.config is not None
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        sweep_name = self.config.hydra.runtime.choices.get("sweep") or "search"
        try:
            study, files, text = run_search(
                self.settings, self.config.search, arguments, sweep_dir, str(sweep_name).replace("/", "_"),
                output_root(), self._launch,
            )  # fmt: skip
        except ConfigError as err:  # bad search settings: one line and exit 2, as a single run's bad config
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        print(text, flush=True)
        mlflow = (read_sweep_info(sweep_dir) or {}).get("mlflow")
        if mlflow:
            try:
                tags, metrics = parent_summary(json.loads(files["json"].read_text(encoding="utf-8")))
                uri, parent_run_id = mlflow["tracking_uri"], mlflow["parent_run_id"]
                tracking.log_search_outcome(uri, parent_run_id, files, tags, metrics)
            except Exception as err:  # the files are on disk; the parent still ends in the callback
                log.warning("could not log the search outcome on the parent run (%s)", err)
        return study

    def _launch(self, overrides: Any, first_number: int) -> list[Any]:
        from rtdlm_experiments.search.driver import JobOutcome

        returns = self.launcher.launch([list(o) for o in overrides], initial_job_idx=first_number)
        outcomes = []
        for job in returns:
            job_dir = Path(job.hydra_cfg.hydra.runtime.output_dir) if job.hydra_cfg else Path(".")
            if job.status == JobStatus.COMPLETED:
                outcomes.append(JobOutcome(dict(job.return_value or {}), job_dir))
            else:
                outcomes.append(JobOutcome(None, job_dir, job._return_value))
        return outcomes
