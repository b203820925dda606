"""The search (hydra/sweeper=optuna): its space parser, objectives and constraints, the loop with a fake
launcher (constraints respected, Pareto front, resume after an interruption), the saved preset loading
back with sampling=NAME, and a real search killed and resumed from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from rtdlm_experiments.schema import ConfigError
from rtdlm_experiments.search.driver import JobOutcome, SearchSettings, run_search
from rtdlm_experiments.search.objectives import parse_constraints, parse_objectives
from rtdlm_experiments.search.space import distribution, search_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

# --- space, objectives, constraints -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("interval(0.1, 1.5)", FloatDistribution(0.1, 1.5)),
        ("interval(0, 1)", FloatDistribution(0.0, 1.0)),  # as in Hydra: an interval is float unless int()
        ("int(interval(0, 100))", IntDistribution(0, 100)),
        ("tag(log, interval(0.001, 0.3))", FloatDistribution(0.001, 0.3, log=True)),
        ("tag(log, int(interval(1, 64)))", IntDistribution(1, 64, log=True)),
        ("choice(rtdlm, hf, vllm)", CategoricalDistribution(["rtdlm", "hf", "vllm"])),
        ("choice(0, 20, 50)", CategoricalDistribution([0, 20, 50])),
        ("0.9,1.0", CategoricalDistribution([0.9, 1.0])),
        ("range(0, 10, 3)", IntDistribution(0, 9, step=3)),
    ],
)
def test_space_syntax_of_the_official_sweeper(text: str, expected: object):
    assert distribution("sampling.x", text) == expected


@pytest.mark.parametrize(
    "text", ["interval(1.0, 0.5)", "tag(log, interval(0, 1.0))", "range(0, 10, -1)", "interval(0.1"]
)
def test_bad_space_entries_name_the_field(text: str):
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.params\.sampling\.x="):
        distribution("sampling.x", text)


def test_command_line_sweeps_win_over_the_preset_and_plain_values_are_fixed():
    space = search_space(
        {"sampling.temperature": "interval(0.1, 1.5)", "sampling.top_k": "choice(0, 20)", "num_samples": "2"},
        ["sampling.top_k=choice(5, 6)", "model=tiny-random"],
    )
    assert space.distributions == {
        "sampling.temperature": FloatDistribution(0.1, 1.5),
        "sampling.top_k": CategoricalDistribution([5, 6]),
    }
    assert sorted(space.fixed) == ["model=tiny-random", "num_samples=2"]
    with pytest.raises(ConfigError, match="names no interval"):
        search_space({"num_samples": "2"}, [])


def test_objectives_and_constraints_parse_and_reject_bad_input():
    assert [(o.metric, o.direction) for o in parse_objectives(["quality/accuracy:max", "loop_rate:min"])] == [
        ("quality/accuracy", "maximize"),
        ("loop_rate", "minimize"),
    ]
    for bad in (["accuracy"], ["accuracy:best"], [], ["a:max", "a:min"]):
        with pytest.raises(ConfigError, match=r"search\.objectives"):
            parse_objectives(bad)
    (constraint,) = parse_constraints(["diversity/distinct_2>=0.5"])
    assert constraint.violation({"distinct_2": 0.6}) < 0 < constraint.violation({"distinct_2": 0.4})
    (upper,) = parse_constraints(["repetition/loop_rate<=0.1"])
    assert upper.violation({"loop_rate": 0.05}) < 0 < upper.violation({"loop_rate": 0.2})
    for bad in ("distinct_2>0.5", "distinct_2>=x", ">=0.5"):
        with pytest.raises(ConfigError, match=r"search\.constraints"):
            parse_constraints([bad])
    with pytest.raises(ConfigError, match="no defined metric 'quality/accuracy'; it has: distinct_2"):
        parse_objectives(["quality/accuracy:max"])[0].value({"distinct_2": 0.5})


# --- the loop, with a fake launcher ------------------------------------------------------------------


def fake_metrics(params: dict[str, float]) -> dict[str, float]:
    """A known landscape: accuracy peaks at temperature 0.7; diversity grows with temperature."""
    temperature = params["sampling.temperature"]
    return {"accuracy": 1 - (temperature - 0.7) ** 2, "distinct_2": temperature / 2}


def parse_overrides(overrides: list[str]) -> dict[str, float]:
    return {
        key: float(value)
        for key, _, value in (o.partition("=") for o in overrides)
        if key.startswith("sampling.")
    }


class FakeLauncher:
    def __init__(self, tmp_path: Path, interrupt_at: int | None = None):
        self.tmp_path, self.interrupt_at, self.launched = tmp_path, interrupt_at, []

    def __call__(self, batch, first_number):
        outcomes = []
        for number, overrides in enumerate(batch, start=first_number):
            if number == self.interrupt_at:
                raise KeyboardInterrupt  # the search is killed while this trial runs
            self.launched.append((number, parse_overrides(overrides)))
            job_dir = self.tmp_path / "sweep" / str(number)
            job_dir.mkdir(parents=True, exist_ok=True)
            outcomes.append(JobOutcome(fake_metrics(parse_overrides(overrides)), job_dir))
        return outcomes


def search_config(objectives, constraints=()):
    return OmegaConf.create(
        {"objectives": list(objectives), "constraints": list(constraints), "racing": True, "chunk_prompts": 5,
         "confidence": 0.95}
    )  # fmt: skip


def settings(tmp_path: Path, n_trials: int, **extra) -> SearchSettings:
    params = {"sampling.temperature": "interval(0.1, 1.5)"}
    return SearchSettings(
        params=params, n_trials=n_trials, storage=f"sqlite:///{tmp_path / 'optuna.db'}", **extra
    )


def test_a_constrained_search_picks_the_best_feasible_config(tmp_path: Path):
    search = search_config(["quality/accuracy:max"], ["diversity/distinct_2>=0.45"])  # temperature >= 0.9
    study, files, text = run_search(
        settings(tmp_path, 12), search, [], tmp_path / "sweep", "test", tmp_path, FakeLauncher(tmp_path)
    )
    result = json.loads(files["json"].read_text())
    (best,) = result["chosen"]
    assert best["params"]["sampling.temperature"] >= 0.9
    feasible = [
        t for t in study.trials if t.state == TrialState.COMPLETE and t.params["sampling.temperature"] >= 0.9
    ]
    assert best["values"][0] == max(t.values[0] for t in feasible)
    assert "best config" in text and files["objective_plot"].is_file()


def test_several_objectives_give_a_pareto_front(tmp_path: Path):
    search = search_config(["quality/accuracy:max", "diversity/distinct_2:max"])
    study, files, text = run_search(
        settings(tmp_path, 10), search, [], tmp_path / "sweep", "test", tmp_path, FakeLauncher(tmp_path)
    )
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    front = {trial["trial"] for trial in json.loads(files["json"].read_text())["chosen"]}
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]

    def dominated(t):
        return any(
            all(o >= v for o, v in zip(other.values, t.values, strict=True)) and other.values != t.values
            for other in complete
        )

    assert front == {t.number for t in complete if not dominated(t)} and len(front) >= 2
    assert files["front_plot"].is_file() and "Pareto front" in text


def test_an_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path: Path):
    search = search_config(["quality/accuracy:max"])
    first = FakeLauncher(tmp_path, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_search(settings(tmp_path, 5), search, [], tmp_path / "sweep", "test", tmp_path, first)
    second = FakeLauncher(tmp_path)
    study, _, _ = run_search(settings(tmp_path, 5), search, [], tmp_path / "sweep", "test", tmp_path, second)
    states = {t.number: t.state for t in study.trials}
    assert states[2] == TrialState.FAIL and study.trials[2].user_attrs["interrupted"]
    assert [number for number, _ in second.launched] == [3, 4, 5]  # trials 0 and 1 are not rerun
    assert second.launched[0][1]["sampling.temperature"] == pytest.approx(
        study.trials[2].params["sampling.temperature"], abs=1e-6
    )
    assert sum(state == TrialState.COMPLETE for state in states.values()) == 5
    # the same command on a finished study runs nothing more
    third = FakeLauncher(tmp_path)
    run_search(settings(tmp_path, 5), search, [], tmp_path / "sweep", "test", tmp_path, third)
    assert third.launched == []
