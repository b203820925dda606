"""Faults while many write to MLflow on PostgreSQL (see ``test_postgres.py`` for the setup): a scheduled
2-worker sweep whose worker is SIGKILLed mid-job, resumed by the same ``schedule`` command (idempotency
key, drift check against the earlier key, all in PostgreSQL); and PostgreSQL stopped during a job, whose
results stay on disk until ``sync`` uploads them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import postgres_cluster
import pytest
from mlflow.entities import ViewType
from postgres_mlflow import PostgresMlflow, assert_each_job_finished_once, postgres_mlflow

from rtdlm_experiments import schedule
from rtdlm_experiments.results.record import LOGGED_FILE, RESULTS_FILE
from rtdlm_experiments.tracking import names

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SLOW_TOKENS = 160
"""The last job's length (``ignore_eos``): long enough on tiny-random to be caught mid-job."""


def descendants(root_pid: int) -> set[int]:
    """The live processes below ``root_pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def process_writing_in(job_dir: Path, candidates: set[int]) -> int | None:
    """The process among ``candidates`` holding a file of ``job_dir`` open (the job's log: its worker)."""
    prefix = str(job_dir.resolve()) + "/"
    for pid in sorted(candidates):
        try:
            targets = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        if any(target.startswith(prefix) for target in targets):
            return pid
    return None


def sweep_parent(sweep_dir: Path) -> str | None:
    """The parent run id in ``sweep.json``, once it is written."""
    try:
        return json.loads((sweep_dir / "sweep.json").read_text())["mlflow"]["parent_run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


@pytest.fixture
def store(postgres_cluster, tmp_path: Path) -> Iterator[PostgresMlflow]:
    with postgres_mlflow(postgres_cluster, tmp_path / "server") as store:
        yield store


def test_a_worker_killed_mid_job_fails_one_job_and_the_same_schedule_command_finishes_only_it(
    store: PostgresMlflow, start_app, tiny_job, tmp_path: Path
):
    experiment = "pg-faults"
    output_dir = tmp_path / "outputs"
    overrides = [*tiny_job, "sampling=balanced", f"max_new_tokens=4,5,6,{SLOW_TOKENS}", "ignore_eos=true",
                 "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"tracking.uri={store.uri}",
                 f"experiment_name={experiment}", "--tolerance", "tokens_per_second=off"]  # fmt: skip

    def start(key: str) -> subprocess.Popen:
        args = ["presets", *overrides, "--key", key]
        return start_app(args, tmp_path / "cwd", output_dir, module="rtdlm_experiments.schedule")

    def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
        stdout, stderr = process.communicate(timeout=600)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def sweep_dirs() -> list[Path]:
        return sorted((output_dir / "multirun").glob("*"))

    baseline = finish(start("day1"))
    assert baseline.returncode == 0, baseline.stdout[-3000:] + baseline.stderr[-3000:]

    # day2: once the long job's run is open (it is generating), freeze its worker (SIGSTOP: it cannot finish
    # however fast the machine is), let the three short jobs be logged, then SIGKILL it.
    earlier = set(sweep_dirs())
    process, worker = start("day2"), None
    try:
        (sweep_dir,) = wait_for(lambda: set(sweep_dirs()) - earlier, 300, "day2's sweep folder")
        parent_id = wait_for(lambda: sweep_parent(sweep_dir), 300, "day2's parent run")
        running = (
            f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`hydra.job_num` = '3' "
            "and attributes.status = 'RUNNING'"
        )
        experiment_id = store.client.get_experiment_by_name(experiment).experiment_id
        wait_for(lambda: store.client.search_runs([experiment_id], running), 300, "job 3's run")
        worker = wait_for(
            lambda: process_writing_in(sweep_dir / "3", descendants(process.pid)), 300, "job 3's worker"
        )
        os.kill(worker, signal.SIGSTOP)
        assert not (sweep_dir / "3" / RESULTS_FILE).exists(), "job 3 finished before it could be stopped"
        wait_for(lambda: all((sweep_dir / str(n) / LOGGED_FILE).is_file() for n in range(3)), 300, "jobs 0-2")
    finally:
        if worker is not None:
            os.kill(worker, signal.SIGKILL)
        killed = finish(process)
    assert killed.returncode == schedule.EXIT_FAILED, killed.stdout[-3000:] + killed.stderr[-3000:]
    died = [line for line in killed.stdout.splitlines() if "died before saving its results" in line]
    assert died == [
        f"  #3 max_new_tokens={SLOW_TOKENS}: died before saving its results (killed? out of memory?)"
    ]
    assert "1 job(s) failed:" in killed.stdout

    resumed = finish(start("day2"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming run" in resumed.stderr + resumed.stdout
    rerun_dir = sweep_dirs()[-1]
    records = [json.loads((rerun_dir / str(n) / RESULTS_FILE).read_text()) for n in range(4)]
    assert [bool(record.get("reused_run_id")) for record in records] == [True, True, True, False]
    parent, _ = assert_each_job_finished_once(store, experiment, rerun_dir, jobs=4, parents=2)
    first_parent = json.loads((sweep_dir / "sweep.json").read_text())["mlflow"]["parent_run_id"]
    assert parent.info.run_id == first_parent  # resumed, not a second parent for the key
    assert parent.data.tags[names.DRIFT_TAG] == "ok"
    baseline_parent = store.client.search_runs(
        [parent.info.experiment_id], f"tags.`{names.SCHEDULE_KEY_TAG}` = 'day1'", run_view_type=ViewType.ALL
    )
    assert parent.data.tags[names.DRIFT_BASELINE_TAG] == baseline_parent[0].info.run_id

    again = finish(start("day2"))
    assert again.returncode == 0 and "already FINISHED" in again.stdout + again.stderr
    assert len(store.all_runs(experiment)) == 2 + 4 + 4 + 1  # parents, day1's, day2's, the killed attempt


def test_postgres_stopped_during_a_job_keeps_its_results_and_sync_uploads_them(
    launch_app, start_app, tiny_job, tmp_path: Path
):
    if postgres_cluster.server_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found: apt-get install postgresql")
    cluster = postgres_cluster.start_cluster()  # its own: this test stops it
    try:
        with postgres_mlflow(cluster, tmp_path / "server") as store:
            output_dir = tmp_path / "outputs"
            args = [
                *tiny_job,
                f"max_new_tokens={SLOW_TOKENS}",
                "ignore_eos=true",
                f"tracking.uri={store.uri}",
            ]
            process = start_app(args, tmp_path / "cwd", output_dir)
            try:
                experiment = wait_for(lambda: store.client.get_experiment_by_name("rtdlm-experiments"), 300,
                                      "the experiment")  # fmt: skip
                wait_for(lambda: store.client.search_runs([experiment.experiment_id]), 300, "the job's run")
                cluster.stop()  # while the job generates: its upload meets a server without a database
                stdout, stderr = process.communicate(timeout=600)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
            assert process.returncode == 0, stderr[-3000:]
            (results,) = output_dir.glob(f"runs/*/{RESULTS_FILE}")
            assert json.loads(results.read_text())["status"] == "COMPLETED"
            sync_command = f"python -m rtdlm_experiments.tracking sync {results.parent}"
            assert sync_command in stderr + stdout

            cluster.start()
            synced = launch_app(["sync", str(results.parent)], tmp_path / "cwd", output_dir,
                                module="rtdlm_experiments.tracking")  # fmt: skip
            assert synced.returncode == 0, synced.stderr[-3000:]
            assert "1 job(s) uploaded" in synced.stdout
            runs = store.client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
            finished = [run for run in runs if run.info.status == "FINISHED"]
            assert len(finished) == 1 and "diversity/distinct_2" in finished[0].data.metrics
            assert all(run.info.status != "RUNNING" for run in runs), [run.info.status for run in runs]
    finally:
        cluster.remove()
