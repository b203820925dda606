"""The search (hydra/sweeper=optuna): its space parser, objectives and constraints, the loop with a fake
launcher (constraints respected, Pareto front, resume after an interruption), the saved preset loading
back with sampling=NAME, and a real search killed and resumed from the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from rtdlm_experiments.config import preset_files, presets
from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.config.paths import config_dir
from rtdlm_experiments.search.driver import JobOutcome, SearchSettings, run_search
from rtdlm_experiments.search.objectives import parse_constraints, parse_objectives
from rtdlm_experiments.search.space import distribution, search_space, trial_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)
CONF = config_dir()

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
    assert isinstance(study.sampler.inner, optuna.samplers.NSGAIISampler)
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
    # the resumed sampler does not replay the first run's draws (trial 4 is the first new ask)
    first_run = {round(study.trials[n].params["sampling.temperature"], 6) for n in range(3)}
    assert round(study.trials[4].params["sampling.temperature"], 6) not in first_run
    # the same command on a finished study runs nothing more
    third = FakeLauncher(tmp_path)
    run_search(settings(tmp_path, 5), search, [], tmp_path / "sweep", "test", tmp_path, third)
    assert third.launched == []


class RacedLauncher(FakeLauncher):
    """Trials of 40 rows each; racing stops those far from the peak (|temperature - 0.7| > 0.15) after 10."""

    def __call__(self, batch, first_number):
        outcomes = super().__call__(batch, first_number)
        for outcome, (_, params) in zip(outcomes, self.launched[-len(outcomes) :], strict=True):
            pruned = abs(params["sampling.temperature"] - 0.7) > 0.15
            outcome.metrics["race_pruned"] = float(pruned)
            outcome.metrics["race_generations_used"] = 10.0 if pruned else 40.0
        return outcomes


@pytest.mark.parametrize("n_jobs", [1, 3])
def test_a_generation_budget_buys_more_trials_when_racing_saves_and_is_never_exceeded(
    tmp_path: Path, n_jobs: int
):
    search = search_config(["quality/accuracy:max"])
    search.max_generations = 200  # five whole trials
    launcher = RacedLauncher(tmp_path)
    study, _, _ = run_search(
        settings(tmp_path, 50, n_jobs=n_jobs), search, [], tmp_path / "sweep", "test", tmp_path, launcher
    )
    spent = sum(t.user_attrs["generations"] for t in study.trials)
    pruned = sum(t.state == TrialState.PRUNED for t in study.trials)
    assert spent <= 200 and spent + 40 > 200  # stopped only when no whole trial fitted
    assert pruned >= 1 and len(study.trials) > 5  # racing's savings bought more trials than the grid's 5
    search.max_generations = 0
    with pytest.raises(ConfigError, match=r"search.max_generations=0 is invalid: must be an integer >= 1"):
        run_search(settings(tmp_path, 5), search, [], tmp_path / "sweep", "test", tmp_path, launcher)


def test_an_unraced_trial_counts_every_row_it_planned(tmp_path: Path):
    from rtdlm_experiments.search.study import generations_of

    (tmp_path / "results.json").write_text(json.dumps({"num_prompts": 40, "config": {"num_samples": 3}}))
    assert generations_of({}, tmp_path) == 120
    assert generations_of({"race_generations_used": 30.0}, tmp_path) == 30
    assert generations_of({}, tmp_path / "missing") is None


# --- the saved preset ---------------------------------------------------------------------------------


def test_a_saved_preset_loads_back_with_sampling_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hydra import compose, initialize_config_dir

    from rtdlm_experiments.config.paths import config_dir
    from rtdlm_experiments.config.validation import sampling_config

    monkeypatch.setenv("RTDLM_OUTPUT_DIR", str(tmp_path / "outputs"))
    job_dir = tmp_path / "sweep" / "3"
    job_dir.mkdir(parents=True)
    sampling = {
        "preset": "balanced",
        "temperature": 0.83,
        "top_p": 0.91,
        "min_p": 0.05,
        "top_k": 20,
        "repetition_penalty": 1.07,
        "order": ["penalties", "temperature", "top_k", "top_p", "min_p"],
    }
    (job_dir / "results.json").write_text(json.dumps({"config": {"sampling": sampling}}))
    assert presets.main(["save", "tuned", "--from-run", str(job_dir)]) == 0
    assert (tmp_path / "outputs" / "conf" / "sampling" / "tuned.yaml").is_file()

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["sampling=tuned"])
    loaded = sampling_config(cfg.sampling)
    expected = {key: value for key, value in sampling.items() if key != "preset"}
    assert {key: getattr(loaded, key) for key in expected} == expected | {"order": tuple(sampling["order"])}

    for name, message in (("balanced", "bundled preset"), ("tuned", "exists"), ("bad name", "letters")):
        with pytest.raises(SystemExit) as stop:
            presets.main(["save", name, "--from-run", str(job_dir)])
        assert stop.value.code == 2, message


def test_a_search_folder_saves_its_best_trial(tmp_path: Path):
    job_dir = tmp_path / "sweep" / "1"
    job_dir.mkdir(parents=True)
    (job_dir / "results.json").write_text(
        json.dumps({"config": {"sampling": {"preset": "precise", "top_k": 7}}})
    )
    (tmp_path / "sweep" / "search").mkdir()
    (tmp_path / "sweep" / "search" / "result.json").write_text(
        json.dumps({"chosen": [{"job_dir": str(job_dir)}]})
    )
    assert preset_files.sampling_from_run(str(tmp_path / "sweep")) == {"preset": "precise", "top_k": 7}


# --- a real search from the CLI: killed during a trial, resumed, finished -----------------------------

SEARCH_ARGS = [
    "-m", "hydra/sweeper=optuna", "model=tiny-random", "prompts.limit=4", "num_samples=2", "max_new_tokens=8",
    "search.objectives=[diversity/distinct_2:max]", "search.chunk_prompts=2", "hydra.sweeper.n_trials=3",
    "sampling.temperature=interval(0.1,1.5)", "sampling.top_k=choice(0,20)",
]  # fmt: skip


def study_states(storage: Path) -> list[str]:
    if not storage.is_file():
        return []
    try:
        (name,) = optuna.get_all_study_names(f"sqlite:///{storage}")
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage}")
        return [trial.state.name for trial in study.get_trials(deepcopy=False)]
    except (ValueError, RuntimeError, Exception):
        return []  # the store is being created


@pytest.mark.slow
def test_a_killed_search_resumes_from_the_cli(
    start_app, launch_app, tmp_path: Path, empty_mlflow_store: Path
):
    import shutil

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    shutil.copy(empty_mlflow_store, outputs / "mlflow.db")
    storage = outputs / "optuna.db"
    process = start_app(SEARCH_ARGS, tmp_path / "cwd", outputs)
    deadline = time.monotonic() + 300
    try:
        while not ("COMPLETE" in (states := study_states(storage)) and "RUNNING" in states):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, states
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    killed_states = study_states(storage)
    assert killed_states.count("COMPLETE") == 1 and killed_states[-1] == "RUNNING"

    result = launch_app(SEARCH_ARGS, tmp_path / "cwd", outputs, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(
        study_name=optuna.get_all_study_names(f"sqlite:///{storage}")[0], storage=f"sqlite:///{storage}"
    )
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["interrupted"] and trials[2].params == trials[1].params  # re-asked as it was
    assert (
        "best config" in result.stdout
        and "save it: python -m rtdlm_experiments.config.presets save" in result.stdout
    )
    sweep_dirs = [p.parent.parent for p in (outputs / "multirun").glob("*/search/result.json")]
    assert len(sweep_dirs) == 1  # the resumed run wrote the outcome; trial 0 was not rerun in it
    assert (
        not (sweep_dirs[0] / "0").exists() and (sweep_dirs[0] / "2" / "search_prompt_scores.jsonl").is_file()
    )


def test_bad_search_settings_exit_2_with_one_line_before_any_trial(run_cli):
    result = run_cli(
        "-m", "hydra/sweeper=optuna", "model=tiny-random", "tracking=none", "search.objectives=[distinct_2]",
        "sampling.temperature=interval(0.1,1.5)",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: search.objectives: 'distinct_2' is invalid: use METRIC:max or METRIC:min" in result.stderr
    assert "Launching" not in result.stdout + result.stderr


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF / "sweep").glob("search_*.yaml")))
def test_every_search_preset_validates_at_the_corners_of_its_space(sweep: str):
    from hydra import compose, initialize_config_dir

    from rtdlm_experiments.config import validation

    prompts = yaml.safe_load((CONF / "sweep" / f"{sweep}.yaml").read_text())["defaults"][0][
        "override /prompts"
    ]
    if not (CONF / "prompts" / f"{prompts}.yaml").is_file():
        pytest.skip(f"prompts={prompts} is not in this checkout yet")
    base = [f"sweep={sweep}", "eval.allow_code_execution=true"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=base, return_hydra_config=True)
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
        parse_objectives(list(cfg.search.objectives))
        space = search_space(dict(cfg.hydra.sweeper.params), [])
        assert float(space.distributions["sampling.temperature"].low) > 0  # greedy is outside the space
        corners = {
            key: list(d.choices) if hasattr(d, "choices") else [d.low, d.high]
            for key, d in space.distributions.items()
        }
        for index in range(max(map(len, corners.values()))):
            point = {key: values[index % len(values)] for key, values in corners.items()}
            overrides = trial_overrides(point)
            spec = validation.prepare_job(compose("config", overrides=[*base, *overrides]))
            assert spec.sampling.temperature == pytest.approx(point["sampling.temperature"])
            assert spec.sampling.order == point["sampling.order"]


def test_a_raced_job_generates_what_an_unraced_one_does_and_stops_when_it_loses():
    """Common random numbers: chunked generation gives the rows an unchunked job gives; a trial far
    below the incumbent stops after its first look, its metrics over the rows it generated."""
    from hydra import compose, initialize_config_dir

    from rtdlm_experiments.config import validation
    from rtdlm_experiments.job import app
    from rtdlm_experiments.search.racing import Race

    overrides = ["model=tiny-random", "max_new_tokens=6", "prompts.limit=6", "num_samples=2"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        spec = validation.prepare_job(
            compose("config", overrides=[*overrides, "prompts.chat_template=false"])
        )
    plain = app.run_job(spec)
    race = Race("diversity/distinct_2", 1.0, {}, chunk_prompts=2)
    raced = app.run_job(spec, race=race)
    assert raced.output.token_ids == plain.output.token_ids
    assert raced.metrics["distinct_2"] == plain.metrics["distinct_2"]
    assert sorted(race.scores) == list(range(6)) and not race.pruned
    assert raced.artifacts["search_prompt_scores.jsonl"][0] == {"prompt_index": 0, "score": race.scores[0]}

    unbeatable = Race("diversity/distinct_2", 1.0, {p: 2.0 + p / 100 for p in range(6)}, chunk_prompts=2)
    lost = app.run_job(spec, race=unbeatable)
    assert unbeatable.pruned and unbeatable.looks == 1
    assert lost.output.token_ids == plain.output.token_ids[:4] and len(lost.rows) == 4
    assert lost.metrics["race_generations_used"] == 4 and lost.metrics["race_generations_saved"] == 8


# --- several searches on one study: whose RUNNING trial is interrupted, the last slot ----------------


def test_a_running_trial_is_re_asked_only_when_its_search_is_gone(tmp_path: Path):
    import subprocess
    import sys

    from rtdlm_experiments.search import study as studies
    from rtdlm_experiments.search import workers
    from rtdlm_experiments.search.driver import open_slots

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    try:
        me = workers.new_worker()
        owners = {
            "alive": {**me, "pid": alive.pid, "search": "a"},
            "dead": {**me, "pid": dead.pid, "search": "b"},
            "other host": {**me, "host": me["host"] + "-elsewhere", "search": "c"},
            "ended search of this process": {**me, "search": "d"},
        }
        numbers = {}
        for name, owner in owners.items():
            trial = study.ask({"x": FloatDistribution(0, 1)})
            trial.set_user_attr(workers.WORKER_ATTR, owner)
            numbers[name] = trial.number
        requeued = studies.requeue_interrupted(study, me)
        assert requeued == [numbers["dead"], numbers["ended search of this process"]]
        running = {t.number for t in study.get_trials(states=(TrialState.RUNNING,))}
        assert running == {numbers["alive"], numbers["other host"]}
        assert [t.number for t in workers.running_elsewhere(study, me)] == sorted(running)
        # the two live trials take the 2 slots: wait for the one on this host, not for the other host's
        assert open_slots(study, 2, me) == 0
        alive.kill()
        alive.wait(timeout=60)
        assert open_slots(study, 2, me) == 1  # its trial re-asked: one slot free again
        assert open_slots(study, 1, me) is None
    finally:
        alive.kill()
        alive.wait(timeout=60)


def test_searches_racing_for_the_last_slot_run_exactly_n_trials(tmp_path: Path):
    from rtdlm_experiments.search import workers

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s")
    first, second = workers.new_worker(), workers.new_worker()
    done = study.ask({"x": FloatDistribution(0, 1)})
    study.tell(done, 1.0)
    # both saw one open slot of 2 and asked at once: the lower trial number wins it
    mine, theirs = (study.ask({"x": FloatDistribution(0, 1)}) for _ in range(2))
    assert workers.claim(study, [theirs], 2, second) == []
    assert workers.claim(study, [mine], 2, first) == [mine]
    surplus = study.trials[theirs.number]
    assert surplus.state == TrialState.FAIL and surplus.user_attrs[workers.SURPLUS_ATTR]
    from rtdlm_experiments.search.study import counted_trials

    study.tell(mine, 0.5)
    assert counted_trials(study) == 2


def test_seeded_searches_on_one_study_draw_each_trial_from_its_number(tmp_path: Path):
    from rtdlm_experiments.search.study import make_sampler

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    studies_ = [
        optuna.create_study(
            storage=storage, study_name="s", sampler=make_sampler("tpe", 0, 1), load_if_exists=True
        )
        for _ in range(2)
    ]
    draws = [s.ask({"x": FloatDistribution(0, 1)}).params["x"] for s in (*studies_, *studies_)]
    assert len(set(draws)) == 4  # the same seed, but never the same draw for two trials
    alone = optuna.create_study(sampler=make_sampler("tpe", 0, 1))
    assert [alone.ask({"x": FloatDistribution(0, 1)}).params["x"] for _ in range(4)] == draws  # reproducible


def test_search_presets_compose_outside_the_checkout(tmp_path: Path):
    """Installed with ``pip install -e .`` and run from elsewhere, Hydra's plugin scan cannot list our
    ``hydra_plugins`` folder (an editable path hook): the app and the scheduler register it themselves."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    code = (
        "from rtdlm_experiments.schedule import compose_sweep\n"
        "print(compose_sweep('search_humaneval', []).hydra.sweeper._target_)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    if "No module named 'rtdlm_experiments'" in done.stderr:
        pytest.skip("rtdlm-experiments is not installed (only importable from the checkout)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OptunaSweeper" in done.stdout
