"""MLflow tracking end to end, read back with `MlflowClient`: a sweep is one parent run with a child per
job, a failed job fails the parent but not the sweep, an unreachable server loses nothing and ``sync``
uploads the saved results later, and a real ``mlflow server`` works over HTTP."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from rtdlm_experiments.analysis import report
from rtdlm_experiments.results import metric_names
from rtdlm_experiments.tracking import sync
from rtdlm_experiments.tracking.names import JOB_TAG
from rtdlm_experiments.tracking.server import free_port, serve_mlflow, server_args

# --- helpers ------------------------------------------------------------------------------------------


def store_uri(output_dir: Path) -> str:
    """The embedded store a job writes to when ``RTDLM_OUTPUT_DIR=output_dir``."""
    return f"sqlite:///{output_dir / 'mlflow.db'}"


def sweep_runs(client: MlflowClient, experiment: str = "rtdlm-experiments") -> tuple[Run, list[Run]]:
    """The single parent run of ``experiment`` and its children, children sorted by run name."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1, [run.info.run_name for run in parents]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], sorted(children, key=lambda run: run.info.run_name)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    paths = set()
    for entry in client.list_artifacts(run_id, path):
        paths |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return paths


@contextmanager
def mlflow_server(root: Path, start_timeout: float = 180) -> Iterator[str]:
    """A real ``mlflow server`` with a SQLite store in ``root`` on a free local port; yields its URI."""
    args = server_args(f"sqlite:///{root / 'server.db'}", root / "server-artifacts")
    with serve_mlflow(args, root / "server.log", start_timeout) as uri:
        yield uri


# --- a sweep, logged live -----------------------------------------------------------------------------


@dataclass
class Sweep:
    output_dir: Path
    sweep_dir: Path
    client: MlflowClient
    parent: Run
    children: list[Run]
    stdout: str


@pytest.fixture(scope="module")
def sweep(launch_app, tiny_job, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """``python -m rtdlm_experiments -m sampling=creative,balanced`` on tiny-random, run once."""
    root = tmp_path_factory.mktemp("sweep")
    result = launch_app(["-m", "sampling=creative,balanced", *tiny_job], root / "cwd", root / "outputs")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (sweep_dir,) = (root / "outputs" / "multirun").iterdir()
    client = MlflowClient(store_uri(root / "outputs"))
    parent, children = sweep_runs(client)
    return Sweep(root / "outputs", sweep_dir, client, parent, children, result.stdout)


def test_sweep_is_one_finished_parent_with_a_finished_child_per_job(sweep: Sweep):
    assert sweep.parent.info.status == "FINISHED"
    assert sweep.parent.info.run_name == "sweep sampling=creative,balanced · tiny-random"
    assert [child.info.run_name for child in sweep.children] == ["balanced", "creative"]
    assert [child.info.status for child in sweep.children] == ["FINISHED", "FINISHED"]


def test_child_runs_hold_the_resolved_config_metrics_and_provenance(sweep: Sweep):
    balanced, creative = sweep.children
    params = creative.data.params
    assert params["sampling.preset"] == "creative"
    assert params["sampling.temperature"] == "1.2"  # from sampling.PRESETS, not from a yaml
    assert params["sampling.top_k"] == "100"
    assert balanced.data.params["sampling.temperature"] == "0.7"
    assert (params["model.name"], params["decoder.name"], params["seed"], params["max_new_tokens"]) == (
        "tiny-random", "autoregressive", "0", "4",
    )  # fmt: skip
    assert {
        "diversity/distinct_2", "repetition/seq_rep_4", "diversity/self_bleu_4", "likelihood/perplexity",
        "speed/tokens_per_second",
    } <= set(creative.data.metrics)  # fmt: skip
    record = json.loads((sweep.sweep_dir / creative.data.tags["hydra.job_num"] / "results.json").read_text())
    assert creative.data.metrics["diversity/distinct_2"] == pytest.approx(record["metrics"]["distinct_2"])
    assert record["environment"]["weights_sha256"] is None  # the job records it; tiny-random has no weights
    tags = creative.data.tags
    assert tags["config_hash"] == record["config_hash"] != balanced.data.tags["config_hash"]
    assert "sampling=creative" in tags["hydra.overrides"].split()
    assert (tags["device"], tags["dtype"], tags[JOB_TAG]) == ("cpu", "float32", "true")
    assert len(tags["git_sha"]) == 40


def test_child_runs_hold_the_generations_table_and_config_artifacts(sweep: Sweep, tmp_path: Path):
    child = sweep.children[0]
    paths = artifact_paths(sweep.client, child.info.run_id)
    assert {"generations_table.json", "results.json", "generations.jsonl", "config.yaml"} <= paths
    assert {"hydra/config.yaml", "hydra/hydra.yaml", "hydra/overrides.yaml"} <= paths
    table_file = sweep.client.download_artifacts(child.info.run_id, "generations_table.json", str(tmp_path))
    table = json.loads(Path(table_file).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [row["prompt"] for row in rows] == ["Once upon a time", "def add(a, b):"]
    saved = (
        (sweep.sweep_dir / child.data.tags["hydra.job_num"] / "generations.jsonl").read_text().splitlines()
    )
    assert [row["output"] for row in rows] == [json.loads(line)["output"] for line in saved]


def test_parent_run_holds_the_summary_table_and_plot(sweep: Sweep, tmp_path: Path):
    assert {"summary.csv", "summary.md", "summary.png"} <= artifact_paths(
        sweep.client, sweep.parent.info.run_id
    )
    summary = pd.read_csv(
        sweep.client.download_artifacts(sweep.parent.info.run_id, "summary.csv", str(tmp_path))
    )
    assert sorted(summary["preset"]) == ["balanced", "creative"]
    assert {"distinct_2", "seq_rep_4"} <= set(summary.columns)


def test_parent_run_holds_the_common_params_and_the_environment(sweep: Sweep, tmp_path: Path):
    params, tags = sweep.parent.data.params, sweep.parent.data.tags
    assert (params["model.name"], params["max_new_tokens"], params["decoder.name"]) == (
        "tiny-random", "4", "autoregressive",
    )  # fmt: skip
    assert "sampling.preset" not in params and "sampling.temperature" not in params  # swept: they differ
    assert len(tags["git_sha"]) == 40 and tags["rtdlm.git_dirty"] in ("true", "false")
    assert tags["rtdlm.version.torch"] and tags["rtdlm.version.mlflow"] and tags["rtdlm.host"]
    assert tags["mlflow.source.name"].startswith("python -m rtdlm_experiments -m ")
    table_file = sweep.client.download_artifacts(
        sweep.parent.info.run_id, "summary_table.json", str(tmp_path)
    )
    assert sorted(json.loads(Path(table_file).read_text())["columns"])[:1]  # an MLflow table, with columns


def test_children_carry_environment_model_and_prompt_set(sweep: Sweep, tmp_path: Path):
    for child in sweep.children:
        tags = child.data.tags
        assert (
            tags["rtdlm.version.torch"]
            and tags["rtdlm.host"]
            and tags["rtdlm.git_dirty"] in ("true", "false")
        )
        assert (tags["rtdlm.model.name"], tags["rtdlm.model.dtype"]) == ("tiny-random", "float32")
        assert "rtdlm.model.sha256" not in tags  # a random model has no weights file to hash
        (dataset_input,) = child.inputs.dataset_inputs
        assert dataset_input.dataset.name == "prompts.txt"
        assert len(dataset_input.dataset.digest) == 16
    assert len({child.inputs.dataset_inputs[0].dataset.digest for child in sweep.children}) == 1
    page = sweep.client.download_artifacts(sweep.children[0].info.run_id, "generations.html", str(tmp_path))
    text = Path(page).read_text()
    assert "Once upon a time" in text and "def add(a, b):" in text and "mean_logprob" in text


def test_metrics_are_namespaced_and_only_defined_ones_are_logged(sweep: Sweep):
    for child in sweep.children:
        names = set(child.data.metrics)
        assert all(name.split("/")[0] in metric_names.NAMESPACES and "/" in name for name in names)
        assert not [name for name in names if name.startswith("spec/")]  # autoregressive: no draft counters
        assert all(math.isfinite(value) for value in child.data.metrics.values())
        assert {"diversity", "repetition", "likelihood", "speed"} <= {name.split("/")[0] for name in names}


def test_the_experiment_opens_on_its_runs_table(sweep: Sweep):
    experiment = sweep.client.get_experiment(sweep.parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "sweep" in experiment.tags["mlflow.note.content"]


def test_the_sweep_prints_its_table_and_link_once(sweep: Sweep):
    url = f"/#/experiments/{sweep.parent.info.experiment_id}/runs?workflowType=machine_learning"
    assert sweep.stdout.count(url) == 1
    assert sweep.stdout.count(f"/runs/{sweep.parent.info.run_id}") == 1  # the sweep run's page, once
    assert "mlflow ui --backend-store-uri" in sweep.stdout
    table = sweep.stdout[sweep.stdout.index("== sweep: 2 jobs") :].splitlines()
    assert table[1].split()[:3] == ["run", "status", "distinct_2"]
    assert sorted(line.split()[0] for line in table[2:4]) == ["balanced", "creative"]


def test_results_are_saved_under_the_output_root_not_the_cwd(sweep: Sweep):
    info = json.loads((sweep.sweep_dir / "sweep.json").read_text())
    assert info["mlflow"]["parent_run_id"] == sweep.parent.info.run_id
    for job in ("0", "1"):
        record = json.loads((sweep.sweep_dir / job / "results.json").read_text())
        assert record["status"] == "COMPLETED"
        assert len((sweep.sweep_dir / job / "generations.jsonl").read_text().splitlines()) == 2
    assert not (sweep.output_dir.parent / "cwd" / "outputs").exists()


def test_report_tabulates_and_plots_a_sweep(sweep: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture):
    args = ["--uri", sweep.client.tracking_uri, "--sweep", sweep.parent.info.run_id, "--out", str(tmp_path)]
    assert report.main([*args, "--sort-by", "distinct_2"]) == 0
    table = pd.read_csv(tmp_path / "report.csv")
    assert sorted(table["run"]) == ["balanced", "creative"]
    assert list(table["distinct_2"]) == sorted(table["distinct_2"], reverse=True)
    assert (tmp_path / "report.png").stat().st_size > 0
    assert "| run | status | model | preset | decoder |" in capsys.readouterr().out


# --- failures -----------------------------------------------------------------------------------------


def test_a_failing_job_fails_the_parent_but_the_other_jobs_complete(launch_app, tiny_job, tmp_path: Path):
    # The first job's top_p passes the schema (a float) but not SamplingConfig: it fails when it runs.
    result = launch_app(["-m", "sampling.top_p=1.5,0.9", *tiny_job], tmp_path / "cwd", tmp_path / "outputs")
    assert result.returncode == 1
    assert "sampling.top_p=1.5 is invalid" in result.stderr
    parent, (completed, failed) = sweep_runs(MlflowClient(store_uri(tmp_path / "outputs")))
    assert (completed.info.run_name, completed.info.status) == ("top_p=0.9", "FINISHED")
    assert (failed.info.run_name, failed.info.status) == ("top_p=1.5", "FAILED")
    assert "sampling.top_p=1.5 is invalid" in failed.data.tags["error"]
    assert parent.info.status == "FAILED"


def test_unreachable_server_keeps_results_on_disk_and_sync_uploads_them(
    launch_app, tiny_job, tmp_path: Path, capsys: pytest.CaptureFixture
):
    dead_uri = f"http://127.0.0.1:{free_port()}"
    result = launch_app([*tiny_job, f"tracking.uri={dead_uri}"], tmp_path / "cwd", tmp_path / "outputs")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert json.loads((run_dir / "results.json").read_text())["status"] == "COMPLETED"
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "WARNING" in line]
    assert len(warnings) == 1
    assert f"python -m rtdlm_experiments.tracking sync {run_dir}" in warnings[0]
    assert not [line for line in result.stderr.splitlines() if "Retrying" in line]  # HTTP retries are off

    target = f"sqlite:///{tmp_path / 'later' / 'mlflow.db'}"
    synced = launch_app(  # the command the warning names
        ["sync", str(tmp_path / "outputs"), "--uri", target],
        tmp_path / "cwd",
        tmp_path / "outputs",
        module="rtdlm_experiments.tracking",
    )
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert "1 job(s) uploaded" in synced.stdout
    assert sync.main(["sync", str(tmp_path / "outputs"), "--uri", target]) == 0  # nothing twice
    assert "nothing to upload" in capsys.readouterr().out
    client = MlflowClient(target)
    (run,) = client.search_runs([client.get_experiment_by_name("rtdlm-experiments").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == dead_uri
    assert "diversity/distinct_2" in run.data.metrics
    assert "generations_table.json" in artifact_paths(client, run.info.run_id)


def test_sync_recreates_a_sweeps_parent_and_children(launch_app, tiny_job, tmp_path: Path):
    result = launch_app(
        ["-m", "sampling=creative,balanced", "tracking=none", *tiny_job],
        tmp_path / "cwd",
        tmp_path / "outputs",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").iterdir()
    assert (sweep_dir / "summary.md").is_file()  # the summary does not need MLflow

    target = f"sqlite:///{tmp_path / 'later' / 'mlflow.db'}"
    client = MlflowClient(target)
    sync.sync(sweep_dir / "0", target)  # one job first: it gets a parent of its own sweep
    parent, children = sweep_runs(client)
    assert [child.data.tags["hydra.job_num"] for child in children] == ["0"]
    sync.sync(sweep_dir, target)  # then the rest joins the same parent, without duplicating job 0
    assert sweep_runs(client)[0].info.run_id == parent.info.run_id
    parent, children = sweep_runs(client)
    assert [child.info.run_name for child in children] == ["balanced", "creative"]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "sweep sampling=creative,balanced · tiny-random"


# --- a real server ------------------------------------------------------------------------------------


def test_logging_to_a_real_mlflow_server_over_http(launch_app, tiny_job, tmp_path: Path):
    with mlflow_server(tmp_path) as uri:
        result = launch_app([*tiny_job, f"tracking.uri={uri}"], tmp_path / "cwd", tmp_path / "outputs")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "WARNING" not in result.stdout + result.stderr
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("rtdlm-experiments").experiment_id])
        assert f"(run {run.info.run_id})" in result.stdout
        assert (
            f"{uri}/#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning"
            in result.stdout
        )
        assert run.info.status == "FINISHED"
        assert "diversity/distinct_2" in run.data.metrics
        assert {"generations_table.json", "results.json", "config.yaml"} <= artifact_paths(
            client, run.info.run_id
        )
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_an_experiment_created_meanwhile_by_another_process_is_used_not_an_error():
    """`ensure_experiment` losing the race to create the experiment: it takes the winner's; any other
    error of ``create_experiment`` still propagates."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_ALREADY_EXISTS

    from rtdlm_experiments.tracking import ensure_experiment

    class LosingClient:
        tracking_uri = "http://127.0.0.1:1"

        def __init__(self, error_code: int) -> None:
            self.error_code, self.created = error_code, False

        def get_experiment_by_name(self, name: str):
            return SimpleNamespace(experiment_id="7", tags={}) if self.created else None

        def create_experiment(self, name: str, artifact_location=None):
            self.created = True  # the other process's
            raise MlflowException("already exists", error_code=self.error_code)

        def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
            assert experiment_id == "7"

    assert ensure_experiment(LosingClient(RESOURCE_ALREADY_EXISTS), "x") == "7"
    with pytest.raises(MlflowException):
        ensure_experiment(LosingClient(INTERNAL_ERROR), "x")
