"""The search loop the Hydra sweeper runs: ask Optuna for trials, launch each as a job of the sweep, tell
the study what the job measured, and write the outcome. Launching is injected (``launch``), so the loop
runs the same under Hydra's launchers and in tests."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.search import outcome, workers
from rtdlm_experiments.search import study as studies
from rtdlm_experiments.search.objectives import Objective, parse_constraints, parse_objectives
from rtdlm_experiments.search.space import search_space, trial_overrides
from rtdlm_experiments.search.trial import SEARCH_DIR, write_incumbent

log = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 3
"""A search stops when this many trials in a row fail (a broken setup, not an unlucky config)."""
POLL_SECONDS = 2.0
"""How often a search whose share is done looks whether the other searches on its study finished."""
wait = time.sleep  # replaced in tests


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
    budget = search.get("max_generations")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ConfigError(f"search.max_generations={budget} is invalid: must be an integer >= 1, or null")
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
    me = workers.new_worker()
    requeued = studies.requeue_interrupted(study, me)
    done = studies.counted_trials(study)
    again = f"; re-asking interrupted trial(s) {requeued}" if requeued else ""
    log.info("search %s at %s: %d of %d trials done%s", name, storage, done, settings.n_trials, again)
    failures = 0
    while (remaining := open_slots(study, settings.n_trials, me)) is not None:
        if remaining == 0:  # the rest are being run by other searches sharing the study
            wait(POLL_SECONDS)
            continue
        room = trials_in_budget(study, search.get("max_generations"), settings.n_jobs)
        if room == 0:
            break
        asked = [study.ask(space.distributions) for _ in range(min(settings.n_jobs, remaining, room))]
        trials = workers.claim(study, asked, settings.n_trials, me)
        if trials:
            failures = run_batch(study, trials, search, space, objectives, constraints, sweep_dir, launch,
                                 failures)  # fmt: skip
    files, text = outcome.write_outcome(study, objectives, sweep_dir / SEARCH_DIR)
    return study, files, text


def trials_in_budget(study: Any, budget: int | None, wanted: int) -> int:
    """How many of ``wanted`` more trials ``search.max_generations`` leaves room for, each costing as
    much as the largest finished trial (one run to its end); all of them while nothing has finished."""
    spent, whole_trial = studies.generations_spent(study)
    if budget is None or whole_trial == 0:
        return wanted
    room = min(wanted, int((budget - spent) // whole_trial))
    if room <= 0:
        log.info("generation budget: %d of %d rows spent, a whole trial needs %d: no new trial",
                 spent, budget, whole_trial)  # fmt: skip
    return max(room, 0)


def open_slots(study: Any, n_trials: int, me: dict[str, object]) -> int | None:
    """How many more trials this search may ask; 0 while other live searches on this host run the last
    ones, None when the study is done (a trial whose search died is re-queued first)."""
    studies.requeue_interrupted(study, me)
    taken = len(workers.taking_slots(study.get_trials(deepcopy=False)))
    if taken < n_trials:
        return n_trials - taken
    elsewhere = workers.running_elsewhere(study, me)
    here = [t for t in elsewhere if t.user_attrs.get(workers.WORKER_ATTR, {}).get("host") == me["host"]]
    if len(here) < len(elsewhere):  # liveness on another host cannot be seen: do not wait on it forever
        log.warning("trial(s) %s still run on other hosts; this outcome has the finished ones",
                    [t.number for t in elsewhere if t not in here])  # fmt: skip
    return 0 if here else None


def run_batch(
    study: Any,
    trials: list[Any],
    search: Any,
    space: Any,
    objectives: Sequence[Objective],
    constraints: Sequence[Any],
    sweep_dir: Path,
    launch: Launch,
    failures: int,
) -> int:
    """Launch one batch of trials and tell the study each result; returns the failures in a row."""
    if bool(search.racing) and len(objectives) == 1:
        best = studies.incumbent(study, objectives[0])
        scores = {int(k): v for k, v in (best.user_attrs.get("prompt_scores", {}) if best else {}).items()}
        write_incumbent(sweep_dir, best.number if best else None, scores)
    jobs = launch([[*space.fixed, *trial_overrides(t.params)] for t in trials], trials[0].number)
    for trial, job in zip(trials, jobs, strict=True):
        if job.metrics is None:
            study.tell(trial, state=TrialState.FAIL)
            failures += 1
            log.warning("trial %d failed: %s", trial.number, job.error)
            if failures >= MAX_FAILURES_IN_A_ROW:
                raise RuntimeError(f"{failures} trials in a row failed; the last: {job.error}") from job.error
            continue
        failures = 0
        try:
            state = studies.tell_job(study, trial, job.metrics, job.job_dir, objectives, constraints)
        except ConfigError:
            study.tell(trial, state=TrialState.FAIL)
            raise
        log.info("trial %d %s", trial.number, state.name)
    return failures
