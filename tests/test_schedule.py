"""Scheduled sweeps end to end on tiny-random: one at a time, once per key, resumed after a failure, and
checked for drift against the previous scheduled run. The tolerance arithmetic and the lock are also
tested on their own, in-process."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from rtdlm_experiments import schedule, tracking
from rtdlm_experiments.analysis import drift
from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.tracking import names

# --- one history of scheduled sweeps, run once for the module -----------------------------------------


@dataclass
class History:
    """What each scheduled invocation returned, and the store they all logged to."""

    client: MlflowClient
    output_dir: Path
    results: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    loser_exited_while_winner_ran: bool = False
    runs_after: dict[str, list[Run]] = field(default_factory=dict)
    planted: float = math.nan

    def parent(self, key: str) -> Run:
        (run,) = self.client.search_runs(
            [self.experiment_id], f"tags.`{names.SCHEDULE_KEY_TAG}` = '{key}'", run_view_type=ViewType.ALL
        )
        return run

    @property
    def experiment_id(self) -> str:
        return self.client.get_experiment_by_name("rtdlm-experiments").experiment_id

    def children(self, key: str, view: int = ViewType.ACTIVE_ONLY) -> list[Run]:
        parent_id = self.parent(key).info.run_id
        filter_string = f"tags.`mlflow.parentRunId` = '{parent_id}'"
        return self.client.search_runs([self.experiment_id], filter_string, run_view_type=view)


def all_runs(client: MlflowClient) -> list[Run]:
    experiment = client.get_experiment_by_name("rtdlm-experiments")
    return client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL) if experiment else []


@pytest.fixture(scope="module")
def history(
    start_app: Callable[..., subprocess.Popen],
    empty_mlflow_store: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> History:
    """Five scheduled invocations of a two-job sweep (one prompt file per job), in order:

    1. ``day1`` twice at once: one runs the sweep, the other finds the lock taken.
    2. ``day1`` again: already FINISHED.
    3. ``day2`` with the second job's prompt file missing: that job fails, the sweep fails.
    4. ``day2`` again with the file back: resumes the failed parent.
    5. ``day3``, the first job only, after a planted change in ``day2``'s metrics, ``--fail-on-drift``.
    """
    root = tmp_path_factory.mktemp("schedule")
    output_dir = root / "outputs"
    output_dir.mkdir()
    shutil.copy(empty_mlflow_store, output_dir / "mlflow.db")
    first, second = root / "first.txt", root / "second.txt"
    first.write_text("Once upon a time\n")
    second.write_text("def add(a, b):\n")
    job = ["model=tiny-random", "prompts=file", "prompts.chat_template=false", "max_new_tokens=4"]
    # Wall-clock speed on a shared 2-core runner varies by far more than any useful tolerance.
    options = ["--tolerance", "tokens_per_second=off"]
    sweep = ["presets", "sampling=balanced", f"prompts.path={first},{second}", *job, *options]
    client = MlflowClient(f"sqlite:///{output_dir / 'mlflow.db'}")
    history = History(client, output_dir)

    def start(*args: str) -> subprocess.Popen:
        return start_app(args, root / "cwd", output_dir, module="rtdlm_experiments.schedule")

    def run(step: str, *args: str) -> None:
        stdout, stderr = (process := start(*args)).communicate(timeout=180)
        history.results[step] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        history.runs_after[step] = all_runs(client)

    both = [start(*sweep, "--key", "day1"), start(*sweep, "--key", "day1")]
    deadline = time.monotonic() + 180
    while any(process.poll() is None for process in both) and time.monotonic() < deadline:
        codes = [process.poll() for process in both]
        if schedule.EXIT_LOCKED in codes and None in codes:
            history.loser_exited_while_winner_ran = True
        time.sleep(0.05)
    for index, process in enumerate(both):
        stdout, stderr = process.communicate(timeout=10)
        history.results[f"day1-{index}"] = subprocess.CompletedProcess(
            process.args, process.returncode, stdout, stderr
        )
    history.runs_after["day1"] = all_runs(client)

    run("day1-again", *sweep, "--key", "day1")
    os.rename(second, root / "second.txt.away")
    run("day2-failed", *sweep, "--key", "day2")
    os.rename(root / "second.txt.away", second)
    run("day2-resumed", *sweep, "--key", "day2")

    # Plant a change: pretend day2's first job had a far lower distinct-2 than today's will be.
    for child in history.children("day2"):
        if child.info.run_name.endswith(f"path={first}"):
            history.planted = child.data.metrics["diversity/distinct_2"] - 0.5
            client.log_metric(child.info.run_id, "diversity/distinct_2", history.planted, step=1)
    run("day3", *sweep, f"prompts.path={first}", "--key", "day3", "--fail-on-drift")
    return history


def outcome(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


# --- lock and idempotency -----------------------------------------------------------------------------


def test_two_scheduled_sweeps_at_once_one_runs_the_other_exits_at_once(history: History):
    runs = [history.results["day1-0"], history.results["day1-1"]]
    winner, loser = sorted(runs, key=lambda result: result.returncode == schedule.EXIT_LOCKED)
    assert winner.returncode == 0, outcome(winner)
    assert loser.returncode == schedule.EXIT_LOCKED, outcome(loser)
    assert "another scheduled sweep is running" in loser.stderr
    assert "sweep=presets key=day1" in loser.stderr  # names the holder and what was not started
    assert "running sweep=presets" not in loser.stdout
    assert history.loser_exited_while_winner_ran
    parent = history.parent("day1")  # exactly one parent for the key
    assert parent.info.status == "FINISHED"
    assert sorted(child.info.status for child in history.children("day1")) == ["FINISHED", "FINISHED"]


def test_a_key_that_finished_is_not_run_again(history: History):
    result = history.results["day1-again"]
    assert result.returncode == 0, outcome(result)
    assert f"key day1 already FINISHED as run {history.parent('day1').info.run_id}" in result.stdout
    before = {run.info.run_id for run in history.runs_after["day1"]}
    assert {run.info.run_id for run in history.runs_after["day1-again"]} == before


# --- resume -------------------------------------------------------------------------------------------


def test_a_failed_sweep_fails_its_parent_and_exits_1(history: History):
    result = history.results["day2-failed"]
    assert result.returncode == schedule.EXIT_FAILED, outcome(result)
    assert "prompts.path=" in result.stderr and "no such file" in result.stderr
    assert "the same command resumes it" in result.stdout
    day2 = [
        run
        for run in history.runs_after["day2-failed"]
        if run.data.tags.get(names.SCHEDULE_KEY_TAG) == "day2"
    ]
    assert [run.info.status for run in day2] == ["FAILED"]


def test_rerunning_a_failed_key_reruns_only_the_failed_job_under_the_same_parent(history: History):
    result = history.results["day2-resumed"]
    assert result.returncode == 0, outcome(result)
    assert "resuming run" in result.stdout
    assert result.stdout.count("already FINISHED as MLflow run") == 1  # the first job is not rerun
    new_runs = {run.info.run_id for run in history.runs_after["day2-resumed"]} - {
        run.info.run_id for run in history.runs_after["day2-failed"]
    }
    (rerun,) = [run for run in history.runs_after["day2-resumed"] if run.info.run_id in new_runs]
    assert rerun.info.run_name == f"path={history.output_dir.parent / 'second.txt'}"  # sampling is fixed

    parent = history.parent("day2")
    assert parent.info.status == "FINISHED"
    assert rerun.data.tags["mlflow.parentRunId"] == parent.info.run_id
    children = history.children("day2")
    assert sorted(child.info.status for child in children) == ["FINISHED", "FINISHED"]
    assert len({child.data.tags["config_hash"] for child in children}) == 2  # no job twice
    assert {child.data.tags["config_hash"] for child in children} == {
        child.data.tags["config_hash"] for child in history.children("day1")
    }
    # The failed attempt's run is kept, soft-deleted, out of the parent's children.
    (superseded,) = [run for run in history.children("day2", ViewType.DELETED_ONLY)]
    assert superseded.info.status == "FAILED" and "no such file" in superseded.data.tags["error"]


# --- drift --------------------------------------------------------------------------------------------


def test_drift_check_passes_an_unchanged_rerun(history: History, tmp_path: Path):
    assert "drift: none, 2 jobs compared with day1" in history.results["day2-resumed"].stdout
    parent = history.parent("day2")
    assert parent.data.tags[names.DRIFT_TAG] == "ok"
    assert parent.data.tags[names.DRIFT_BASELINE_TAG] == history.parent("day1").info.run_id
    table = pd.read_csv(
        history.client.download_artifacts(parent.info.run_id, "drift/drift.csv", str(tmp_path))
    )
    assert set(table["metric"]) == {"distinct_2", "perplexity"}  # tokens_per_second=off; AR has no α
    assert len(table) == 4 and not table["drifted"].any()
    assert (table["previous"] == table["current"]).all()  # same config, same seed: same generations
    assert history.parent("day1").data.tags[names.DRIFT_TAG] == "no_baseline"


def test_drift_check_flags_a_planted_change_and_exits_3(history: History, tmp_path: Path):
    result = history.results["day3"]
    assert result.returncode == schedule.EXIT_DRIFT, outcome(result)
    assert "drift: DRIFT in 1 metrics, 1 jobs compared with day2" in result.stdout
    parent = history.parent("day3")
    assert parent.info.status == "FINISHED"  # the sweep itself succeeded
    assert parent.data.tags[names.DRIFT_TAG] == "drift"
    assert parent.data.tags[names.DRIFT_BASELINE_TAG] == history.parent("day2").info.run_id
    assert "distinct_2" in parent.data.tags[names.DRIFT_DETAILS_TAG]
    table = pd.read_csv(
        history.client.download_artifacts(parent.info.run_id, "drift/drift.csv", str(tmp_path))
    )
    drifted = table[table["drifted"]]
    assert list(drifted["metric"]) == ["distinct_2"]
    assert drifted["previous"].item() == pytest.approx(history.planted)
    assert (
        "**DRIFT** in 1 of 2 comparisons"
        in Path(
            history.client.download_artifacts(parent.info.run_id, "drift/drift.md", str(tmp_path))
        ).read_text()
    )


# --- units --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0.02", drift.Tolerance(absolute=0.02)),
        ("25%", drift.Tolerance(relative=0.25)),
        ("0.01+5%", drift.Tolerance(0.01, 0.05)),
        (0.5, drift.Tolerance(absolute=0.5)),
        ("off", None),
        (False, None),  # YAML's reading of a bare `off`
    ],
)
def test_tolerance_specs(spec: str, expected: drift.Tolerance | None):
    assert drift.parse_tolerance(spec) == expected


@pytest.mark.parametrize("spec", ["", "x", "-1", "5%+5%", "nan", "1+2"])
def test_bad_tolerance_specs_are_rejected(spec: str):
    with pytest.raises(ValueError, match="invalid tolerance"):
        drift.parse_tolerance(spec)


def test_compare_flags_only_changes_beyond_tolerance():
    tolerances = {"distinct_2": drift.Tolerance(absolute=0.02), "speedup": drift.Tolerance(relative=0.1)}
    previous = {
        "a": {"run_name": "job a", "metrics": {"distinct_2": 0.50, "speedup": 2.0}},
        "b": {"run_name": "job b", "metrics": {"distinct_2": 0.50}},
        "gone": {"run_name": "job gone", "metrics": {"distinct_2": 0.9}},
    }
    current = {
        "a": {"run_name": "job a", "metrics": {"distinct_2": 0.515, "speedup": 1.75}},  # speedup -12.5%
        "b": {"run_name": "job b", "metrics": {"distinct_2": 0.45, "speedup": 1.5}},  # both drift
        "new": {"run_name": "job new", "metrics": {"distinct_2": 0.1}},
    }
    report = drift.compare(previous, current, tolerances)
    flagged = set(zip(report.drifted["run"], report.drifted["metric"], strict=True))
    assert flagged == {("job a", "speedup"), ("job b", "distinct_2"), ("job b", "speedup")}
    assert len(report.table) == 4 and report.matched_jobs == 2
    assert report.unmatched == ["job new"]
    unchanged = drift.compare(previous, previous, tolerances)
    assert not unchanged.has_drift and unchanged.matched_jobs == 3


def test_tolerances_layer_over_the_defaults(tmp_path: Path):
    path = tmp_path / "tolerances.yaml"
    path.write_text("distinct_2: 0.05\ntokens_per_second: off\nself_bleu_4: 10%\n")
    merged = drift.resolve_tolerances(drift.load_tolerances(path), {"distinct_2": drift.Tolerance(0.1)})
    assert merged["distinct_2"] == drift.Tolerance(0.1)  # the command line wins over the file
    assert merged["self_bleu_4"] == drift.Tolerance(relative=0.1)
    assert "tokens_per_second" not in merged
    assert merged["perplexity"] == drift.DEFAULT_TOLERANCES["perplexity"]


def test_the_lock_is_exclusive_until_released(tmp_path: Path):
    path = tmp_path / "schedule.lock"
    with schedule.exclusive_lock(path, "first holder"):
        with pytest.raises(schedule.LockBusy) as busy, schedule.exclusive_lock(path, "second holder"):
            pass
        assert busy.value.holder == "first holder"
    with schedule.exclusive_lock(path, "after release"):
        assert path.read_text().strip() == "after release"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["presets", "--key", "it's"], '--key "it\'s": use letters'),
        (["presets", "tracking.parent_run_id=abc"], "tracking.parent_run_id is set by the scheduler"),
        (["presets", "--tolerance", "distinct_2"], "--tolerance takes METRIC=TOL"),
        (["presets", "--tolerance", "distinct_2=lots"], "distinct_2: invalid tolerance"),
    ],
)
def test_bad_arguments_exit_2_before_anything_runs(
    argv: list[str], message: str, capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("RTDLM_OUTPUT_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        schedule.main(argv)
    assert exit_.value.code == schedule.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / schedule.LOCK_FILE).exists()


def test_resuming_needs_an_existing_sweep_parent(empty_mlflow_store: Path, tmp_path: Path):
    shutil.copy(empty_mlflow_store, tmp_path / "mlflow.db")
    client = tracking.mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = tracking.ensure_experiment(client, "resume")
    with pytest.raises(ConfigError, match=r"parent_run_id='0+' is invalid: no such run"):
        tracking.resume_sweep(client, "0" * 32, {})
    parent_id = tracking.start_sweep(client, experiment_id, "sweep", {})
    job = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent_id, names.JOB_TAG: "true"})
    with pytest.raises(ConfigError, match="a job's run, not a sweep's parent"):
        tracking.resume_sweep(client, job.info.run_id, {})


def test_help_lists_the_default_tolerances_and_exit_codes(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_:
        schedule.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "tokens_per_second=25%" in text and "75 another scheduled sweep is running" in text


def test_default_key_is_the_sweep_and_the_date():
    import datetime

    assert schedule.default_key("nightly", datetime.date(2025, 3, 9)) == "nightly-2025-03-09"


def test_runs_with_the_old_tag_spellings_are_still_resumed_and_compared(
    empty_mlflow_store: Path, tmp_path: Path
):
    """Parents written before ``rtdlm.schedule.sweep``/``rtdlm.schedule.host`` became ``rtdlm.sweep``/
    ``rtdlm.host``: their host still guards a RUNNING key, a resume moves it to the new tag, and they are
    still found as a drift baseline."""
    from rtdlm_experiments.tracking import scheduled

    shutil.copy(empty_mlflow_store, tmp_path / "mlflow.db")
    client = tracking.mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = tracking.ensure_experiment(client, "old-tags")
    old = {names.SCHEDULE_KEY_TAG: "day1", names.LEGACY_SCHEDULE_SWEEP_TAG: "nightly"}
    old_id = tracking.start_sweep(client, experiment_id, "day1", {**old, names.LEGACY_SCHEDULE_HOST_TAG: "b"})
    client.set_tag(old_id, names.HOST_TAG, "a")  # the host that created it; "b" resumed it last
    assert scheduled.find_key_run(client, experiment_id, "day1").host == "b"
    scheduled.claim_scheduled_run(client, old_id, "c")
    tags = client.get_run(old_id).data.tags
    assert tags[names.HOST_TAG] == "c" and names.LEGACY_SCHEDULE_HOST_TAG not in tags
    assert scheduled.find_key_run(client, experiment_id, "day1").host == "c"

    job = client.create_run(experiment_id, tags={"mlflow.parentRunId": old_id, names.CONFIG_HASH_TAG: "h1"})
    client.set_terminated(job.info.run_id)
    time.sleep(0.01)  # the new parent starts later
    new_id = scheduled.start_scheduled_sweep(client, experiment_id, "day2", "nightly", "c", [])
    assert client.get_run(new_id).data.tags[names.SWEEP_TAG] == "nightly"
    baseline, jobs = scheduled.find_baseline(client, new_id, "nightly", {"h1"})
    assert baseline.run_id == old_id and set(jobs) == {"h1"}
    assert scheduled.find_baseline(client, new_id, "other-sweep", {"h1"}) is None
