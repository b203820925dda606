"""The Optuna study of a search: where it is stored, how a killed search resumes, and how one trial's
job is told to it.

Resume: a trial left RUNNING by a killed search (its worker gone, `search/workers.py`) is marked FAIL
(user attr ``interrupted``) and its parameters are enqueued, so the next `ask` re-asks exactly that
config; COMPLETE, PRUNED and genuinely FAILED trials count towards ``n_trials`` and are never rerun. A
RUNNING trial of a search still alive is left to it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.search.objectives import Constraint, Objective
from rtdlm_experiments.search.racing import PROMPT_SCORES_FILE
from rtdlm_experiments.search.workers import INTERRUPTED_ATTR, excluded, owner_gone

SAMPLERS = ("auto", "tpe", "nsga2", "random")


def default_storage(output_root: Path) -> str:
    """The study store next to the MLflow one: an SQLite file under the output root."""
    output_root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{output_root / 'optuna.db'}"


def default_study_name(sweep: str, fingerprint: Sequence[str]) -> str:
    """``<sweep>-<hash of what defines the search>``: the same command resumes the same study, a changed
    one (other space, objectives or fixed overrides) starts a new one.

    >>> default_study_name("search_gsm8k", ["a", "b"]) == default_study_name("search_gsm8k", ["a", "b"])
    True
    """
    digest = hashlib.sha256(json.dumps(list(fingerprint)).encode()).hexdigest()[:10]
    return f"{sweep}-{digest}"


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A built-in sampler seeded afresh for each trial with ``seed + trial number``: reproducible for
    one search, and two searches sharing a study (each with the same seed) never draw the same startup
    configs, since trial numbers are unique. TPE, NSGA-II and random sampling keep no state of their own
    between trials (they read the study), so a fresh one per trial samples as one would."""

    def __init__(self, make: Any, seed: int) -> None:
        self._make, self._seed = make, seed
        self.inner: optuna.samplers.BaseSampler = make(seed)

    def __str__(self) -> str:
        return str(self.inner)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner = self._make(self._seed + trial.number)
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def make_sampler(name: Any, seed: int | None, objectives: int) -> optuna.samplers.BaseSampler:
    """``auto``: TPE for one objective, NSGA-II for several; or a config with ``_target_``. Constraints
    reach TPE and NSGA-II through each trial's ``set_constraint`` values (Optuna 5's way). TPE starts
    after 4 random trials, not Optuna's 10: searches here are a few trials long."""
    if not isinstance(name, str):
        from hydra.utils import instantiate

        return instantiate(name)
    if name == "auto":
        name = "tpe" if objectives == 1 else "nsga2"
    makers = {
        "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
        "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
        "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    }
    if name not in makers:
        raise ConfigError(f"hydra.sweeper.sampler={name!r} is invalid: one of {', '.join(SAMPLERS)}")
    return makers[name](None) if seed is None else TrialSeededSampler(makers[name], seed)


SCHEMA_RETRIES = 5


def connect_storage(url: str, pause: float = 0.5) -> optuna.storages.BaseStorage:
    """The study store at ``url``. Two searches starting at once on a fresh PostgreSQL database both
    create Optuna's tables; the loser of that race gets a duplicate-type/table error, so it retries
    (by then the tables exist and it just connects)."""
    import time

    import sqlalchemy.exc

    for attempt in range(1, SCHEMA_RETRIES + 1):
        try:
            return optuna.storages.RDBStorage(url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == SCHEMA_RETRIES:
                raise
            time.sleep(pause * attempt)
    raise AssertionError("unreachable")


def open_study(
    storage: str, study_name: str, objectives: Sequence[Objective], sampler: optuna.samplers.BaseSampler
) -> optuna.Study:
    """Create the study or load it (same name, same directions) to resume it."""
    directions = [objective.direction for objective in objectives]
    try:
        study = optuna.create_study(
            storage=connect_storage(storage),
            study_name=study_name,
            directions=directions,
            sampler=sampler,
            load_if_exists=True,
        )
    except ValueError as err:
        raise ConfigError(f"hydra.sweeper.study_name={study_name!r} is invalid: {err}") from None
    if [direction.name.lower() for direction in study.directions] != directions:
        raise ConfigError(
            f"hydra.sweeper.study_name={study_name!r} is invalid: it exists with other directions "
            f"({[d.name.lower() for d in study.directions]}); name a new study"
        )
    return study


def requeue_interrupted(study: optuna.Study, me: dict[str, object]) -> list[int]:
    """Mark trials a killed search left RUNNING (their worker gone) as failed and enqueue their params
    again; returns their numbers. A trial another live search is running is left alone (``me``: the
    search asking)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    interrupted = [trial for trial in running if owner_gone(trial, me)]
    for trial in interrupted:
        study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
    return [trial.number for trial in interrupted]


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: every finished one but those a kill interrupted and those
    asked beyond the target by searches racing for the last slot."""
    finished = study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    )
    return sum(1 for trial in finished if not excluded(trial))


GENERATIONS_ATTR = "generations"
"""Trial user attr: the rows (prompt × sample) its job generated, for ``search.max_generations``."""


def generations_of(metrics: Mapping[str, float], job_dir: Path) -> float | None:
    """The rows a trial's job generated: what its race used, else all it planned (``results.json``);
    None when neither is known."""
    used = metrics.get("race_generations_used")
    if used is not None and math.isfinite(used):
        return float(used)
    try:
        results = json.loads((job_dir / "results.json").read_text(encoding="utf-8"))
        return float(results["num_prompts"] * results["config"]["num_samples"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def generations_spent(study: optuna.Study) -> tuple[float, float]:
    """(rows generated by the counted trials, rows of the largest of them: one trial run to its end)."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    rows = [float(t.user_attrs.get(GENERATIONS_ATTR, 0.0)) for t in finished if not excluded(t)]
    return sum(rows), max(rows, default=0.0)


def prompt_scores(job_dir: Path) -> dict[int, float]:
    """The per-prompt objective values a raced job wrote (empty when it did not race)."""
    path = job_dir / PROMPT_SCORES_FILE
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {int(row["prompt_index"]): float(row["score"]) for row in rows}


def tell_job(
    study: optuna.Study,
    trial: Trial,
    metrics: Mapping[str, float],
    job_dir: Path,
    objectives: Sequence[Objective],
    constraints: Sequence[Constraint],
) -> TrialState:
    """Record a finished job as the trial's result: COMPLETE with its objective values, or PRUNED when
    racing stopped it (its last running value reported at the generations it used)."""
    values = [objective.value(metrics) for objective in objectives]
    trial.set_user_attr("job_dir", str(job_dir))
    trial.set_user_attr("prompt_scores", {str(k): v for k, v in prompt_scores(job_dir).items()})
    generations = generations_of(metrics, job_dir)
    if generations is not None:
        trial.set_user_attr(GENERATIONS_ATTR, generations)
    for objective in objectives:
        for suffix in ("_ci_low", "_ci_high"):
            bound = metrics.get(objective.metric.rpartition("/")[2] + suffix)
            if bound is not None and math.isfinite(bound):
                trial.set_user_attr(objective.metric + suffix, float(bound))
    for name in ("race_generations_used", "race_generations_saved", "race_looks", "race_upper_bound"):
        if name in metrics and math.isfinite(metrics[name]):
            trial.set_user_attr(name, float(metrics[name]))
    for constraint in constraints:
        trial.set_constraint(str(constraint), constraint.violation(metrics))
    if metrics.get("race_pruned"):
        trial.report(values[0], step=int(metrics.get("race_generations_used", 0)))
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    study.tell(trial, values)
    return TrialState.COMPLETE


def is_feasible(trial: FrozenTrial) -> bool:
    """Every constraint holds (Optuna: each value <= 0); a trial without constraints is feasible."""
    return all(value <= 0 for value in trial.constraints.values())


def incumbent(study: optuna.Study, objective: Objective) -> FrozenTrial | None:
    """The best COMPLETE feasible trial of a one-objective search (what later trials race against)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)]
    if not done:
        return None
    return max(done, key=lambda trial: objective.sign * trial.values[0])
