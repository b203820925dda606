"""A search's outcome from its study: the best config (one objective) or the Pareto front (several),
parameter importances, generations used and saved by racing, plots, and the files in
``<sweep dir>/search/`` (``outcome.txt``, ``result.json``, ``trials.csv``, PNGs)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from rtdlm_experiments.search.objectives import Objective
from rtdlm_experiments.search.study import is_feasible

MIN_TRIALS_FOR_IMPORTANCES = 5
"""Fewer COMPLETE trials than this give no importances: from 2 or 3 points they are noise."""


def chosen_trials(study: optuna.Study, objectives: Sequence[Objective]) -> list[FrozenTrial]:
    """The best feasible COMPLETE trial, or the feasible Pareto front (sorted by the first objective)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)]
    signed = {t.number: [o.sign * v for o, v in zip(objectives, t.values, strict=True)] for t in done}
    if len(objectives) == 1:
        return [max(done, key=lambda t: signed[t.number][0])] if done else []
    front = [
        t
        for t in done
        if not any(_dominates(signed[other.number], signed[t.number]) for other in done if other is not t)
    ]
    return sorted(front, key=lambda t: -signed[t.number][0])


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good everywhere and better somewhere (both maximized).

    >>> _dominates([1, 2], [1, 1]), _dominates([1, 2], [2, 1])
    (True, False)
    """
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def importances(study: optuna.Study, objective: Objective) -> dict[str, float]:
    """Optuna's default parameter importances (PED-ANOVA in Optuna 5: which params matter for reaching
    the best trials; it ranks low targets best, hence the sign) of the first objective over COMPLETE
    trials; empty when fewer than `MIN_TRIALS_FOR_IMPORTANCES` finished."""
    import warnings

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < MIN_TRIALS_FOR_IMPORTANCES:
        return {}

    def target(trial: FrozenTrial) -> float:
        return -objective.sign * trial.values[0]

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            found = optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}
    return {key: float(value) for key, value in found.items()}


def trial_rows(study: optuna.Study, objectives: Sequence[Objective]) -> list[dict[str, Any]]:
    """One row per trial: number, state, objective values (with CIs), feasibility, racing counts, params."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        for index, objective in enumerate(objectives):
            value = trial.values[index] if trial.values else None
            if value is None and trial.state == TrialState.PRUNED and trial.intermediate_values:
                value = trial.intermediate_values[max(trial.intermediate_values)]
            row[objective.metric] = value
            for suffix in ("_ci_low", "_ci_high"):
                row[objective.metric + suffix] = trial.user_attrs.get(objective.metric + suffix)
        row["feasible"] = is_feasible(trial)
        for name in ("race_generations_used", "race_generations_saved"):
            row[name] = trial.user_attrs.get(name)
        row["job_dir"] = trial.user_attrs.get("job_dir")
        rows.append(row | {f"param:{key}": value for key, value in trial.params.items()})
    return rows


def racing_totals(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Generations used and saved by racing, summed over trials that ran (interrupted ones excluded).

    >>> racing_totals([{"race_generations_used": 4, "race_generations_saved": 6}, {}])
    {'generations_used': 4.0, 'generations_saved': 6.0}
    """
    used = sum(float(row.get("race_generations_used") or 0) for row in rows)
    saved = sum(float(row.get("race_generations_saved") or 0) for row in rows)
    return {"generations_used": used, "generations_saved": saved}


def outcome_text(
    study: optuna.Study,
    objectives: Sequence[Objective],
    chosen: Sequence[FrozenTrial],
    found_importances: dict[str, float],
    totals: dict[str, float],
) -> str:
    """What the search prints at its end."""
    states = [trial.state.name for trial in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(name)} {name.lower()}" for name in dict.fromkeys(states))
    title = "best config" if len(objectives) == 1 else f"Pareto front ({len(chosen)} configs)"
    lines = ["", f"== search {study.study_name}: {len(states)} trials ({counts}); {title}:"]
    if not chosen:
        lines.append("  no feasible COMPLETE trial")
    for trial in chosen:
        values = []
        for objective, value in zip(objectives, trial.values, strict=True):
            low, high = (trial.user_attrs.get(objective.metric + s) for s in ("_ci_low", "_ci_high"))
            interval = f" [{low:.4g}, {high:.4g}]" if low is not None and high is not None else ""
            values.append(f"{objective.metric}={value:.4g}{interval}")
        params = " ".join(f"{key}={_short(value)}" for key, value in trial.params.items())
        lines.append(f"  trial {trial.number}: {', '.join(values)}  <- {params}")
        if job_dir := trial.user_attrs.get("job_dir"):
            lines.append(
                f"    save it: python -m rtdlm_experiments.config.presets save NAME --from-run {job_dir}"
            )
    if found_importances:
        lines.append("  " + importances_text(found_importances))
    used, saved = totals["generations_used"], totals["generations_saved"]
    if used:
        lines.append(
            f"  racing: {used:.0f} generations used, {saved:.0f} saved ({saved / (used + saved):.0%})"
        )
    return "\n".join(lines)


def importances_text(found: dict[str, float]) -> str:
    """One line: the params by importance.

    >>> importances_text({"sampling.temperature": 0.91, "sampling.top_k": 0.09})
    'importances: sampling.temperature 0.91, sampling.top_k 0.09'
    """
    return "importances: " + ", ".join(f"{key} {value:.2f}" for key, value in found.items()) if found else ""


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_outcome(
    study: optuna.Study, objectives: Sequence[Objective], out_dir: Path
) -> tuple[dict[str, Path], str]:
    """Write the outcome files; returns them by kind, and the text to print."""
    from rtdlm_experiments.search import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = chosen_trials(study, objectives)
    rows = trial_rows(study, objectives)
    found = importances(study, objectives[0])
    text = outcome_text(study, objectives, chosen, found, racing_totals(rows))
    result = {
        "study_name": study.study_name,
        "objectives": [f"{o.metric}:{o.direction}" for o in objectives],
        "chosen": [
            {"trial": t.number, "values": t.values, "params": t.params, **t.user_attrs} for t in chosen
        ],
        "importances": found,
        "racing": racing_totals(rows),
        "trials": rows,
    }
    files = {"json": out_dir / "result.json", "txt": out_dir / "outcome.txt", "csv": out_dir / "trials.csv"}
    files["json"].write_text(json.dumps(result, indent=2, default=_json_default) + "\n", encoding="utf-8")
    files["txt"].write_text(text + "\n", encoding="utf-8")
    _write_csv(files["csv"], rows)
    files |= plots.draw(rows, objectives, [t.number for t in chosen], out_dir)
    return files, text


def _json_default(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    import pandas as pd

    pd.DataFrame(list(rows)).to_csv(path, index=False)


def parent_summary(result: dict[str, Any]) -> tuple[dict[str, str], dict[str, float]]:
    """Tags and metrics of the search's parent run from ``result.json``'s content: the best trial's params
    and job folder as tags (one objective), racing totals and the best values as metrics. The tags' names
    are short; `rtdlm_experiments.tracking.log_search_outcome` prefixes them (``rtdlm.search.``).

    >>> result = {"objectives": ["quality/accuracy:maximize"], "racing": {"generations_saved": 3.0},
    ...           "chosen": [{"trial": 2, "values": [0.5], "params": {"t": 0.7}, "job_dir": "/x/2"}]}
    >>> tags, metrics = parent_summary(result)
    >>> tags["best.t"], tags["best_job_dir"]
    ('0.7', '/x/2')
    >>> metrics
    {'search/generations_saved': 3.0, 'search/best/quality/accuracy': 0.5}
    """
    tags: dict[str, str] = {}
    metrics = {f"search/{name}": float(value) for name, value in result["racing"].items()}
    importances = result.get("importances", {})
    metrics |= {f"search/importance/{key}": float(value) for key, value in importances.items()}
    chosen = result["chosen"]
    if len(result["objectives"]) == 1 and chosen:
        best = chosen[0]
        tags["best_trial"] = str(best["trial"])
        tags |= {f"best.{key}": str(value) for key, value in best["params"].items()}
        if best.get("job_dir"):
            tags["best_job_dir"] = str(best["job_dir"])
        metric = result["objectives"][0].rpartition(":")[0]
        metrics[f"search/best/{metric}"] = float(best["values"][0])
    else:
        tags["front_trials"] = ",".join(str(trial["trial"]) for trial in chosen)
    return tags, metrics
