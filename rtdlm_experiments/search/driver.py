"""The search loop the Hydra sweeper runs: ask Optuna for trials, launch each as a job of the sweep, tell
the study what the job measured, and write the outcome. Launching is injected (``launch``), so the loop
runs the same under Hydra's launchers and in tests."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.search import outcome
from rtdlm_experiments.search import study as studies
from rtdlm_experiments.search.objectives import Objective, parse_constraints, parse_objectives
from rtdlm_experiments.search.space import search_space, trial_overrides
from rtdlm_experiments.search.trial import SEARCH_DIR, write_incumbent

log = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 3
"""A search stops when this many trials in a row fail (a broken setup, not an unlucky config)."""


@dataclass(frozen=True)
class SearchSettings:
    """The sweeper's config (the official Hydra Optuna sweeper's fields)."""

    params: Mapping[str, Any]
    n_trials: int = 20
    n_jobs: int = 1
    sampler: Any = "auto"
    direction: str | None = None
    seed: int | None = 0
    storage: str | None = None
    study_name: str | None = None


@dataclass(frozen=True)
class JobOutcome:
    """What the launcher reports of one job: its metrics (None when it failed) and folder."""

    metrics: Mapping[str, float] | None
    job_dir: Path
    error: BaseException | None = None


Launch = Callable[[Sequence[Sequence[str]], int], list[JobOutcome]]


def check_settings(settings: SearchSettings, search: Any) -> tuple[list[Objective], list[Any]]:
    """Every check that needs no model: objectives, constraints, counts, racing settings."""
    if settings.n_trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={settings.n_trials} is invalid: must be >= 1")
    if settings.n_jobs < 1:
        raise ConfigError(f"hydra.sweeper.n_jobs={settings.n_jobs} is invalid: must be >= 1")
    if search.chunk_prompts < 2:
        raise ConfigError(f"search.chunk_prompts={search.chunk_prompts} is invalid: must be >= 2")
    if not 0.5 <= search.confidence < 1:
        raise ConfigError(f"search.confidence={search.confidence} is invalid: must be in [0.5, 1)")
    objectives = parse_objectives(list(search.objectives), settings.direction)
    return objectives, parse_constraints(list(search.constraints))


def run_search(
    settings: SearchSettings,
    search: Any,
    arguments: Sequence[str],
    sweep_dir: Path,
    sweep_name: str,
    storage_root: Path,
    launch: Launch,
) -> tuple[Any, dict[str, Path], str]:
    """Run (or resume) the study to ``n_trials`` counted trials; returns the study, the outcome files and
    the printed outcome text."""
    objectives, constraints = check_settings(settings, search)
    space = search_space(settings.params, arguments)
    fingerprint = [*space.fixed, *map(repr, space.distributions.items()), *map(str, search.objectives)]
    fingerprint += [str(c) for c in constraints]
    name = settings.study_name or studies.default_study_name(sweep_name, fingerprint)
    storage = settings.storage or studies.default_storage(storage_root)
    sampler = studies.make_sampler(settings.sampler, settings.seed, len(objectives))
    study = studies.open_study(storage, name, objectives, sampler)
    if study.trials and settings.seed is not None:  # a resumed study: a fresh seeded sampler would replay
        # the first run's draws and ask trial 0's config again
        study.sampler = studies.make_sampler(
            settings.sampler, settings.seed + len(study.trials), len(objectives)
        )
    requeued = studies.requeue_interrupted(study)
    done = studies.counted_trials(study)
    again = f"; re-asking interrupted trial(s) {requeued}" if requeued else ""
    log.info("search %s at %s: %d of %d trials done%s", name, storage, done, settings.n_trials, again)
    racing = bool(search.racing) and len(objectives) == 1
    failures = 0
    while (remaining := settings.n_trials - studies.counted_trials(study)) > 0:
        trials = [study.ask(space.distributions) for _ in range(min(settings.n_jobs, remaining))]
        if racing:
            best = studies.incumbent(study, objectives[0])
            scores = {
                int(k): v for k, v in (best.user_attrs.get("prompt_scores", {}) if best else {}).items()
            }
            write_incumbent(sweep_dir, best.number if best else None, scores)
        jobs = launch([[*space.fixed, *trial_overrides(t.params)] for t in trials], trials[0].number)
        for trial, job in zip(trials, jobs, strict=True):
            if job.metrics is None:
                study.tell(trial, state=TrialState.FAIL)
                failures += 1
                log.warning("trial %d failed: %s", trial.number, job.error)
                if failures >= MAX_FAILURES_IN_A_ROW:
                    raise RuntimeError(
                        f"{failures} trials in a row failed; the last: {job.error}"
                    ) from job.error
                continue
            failures = 0
            try:
                state = studies.tell_job(study, trial, job.metrics, job.job_dir, objectives, constraints)
            except ConfigError:
                study.tell(trial, state=TrialState.FAIL)
                raise
            log.info("trial %d %s", trial.number, state.name)
    files, text = outcome.write_outcome(study, objectives, sweep_dir / SEARCH_DIR)
    return study, files, text
