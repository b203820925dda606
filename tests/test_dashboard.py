"""What a researcher reads, checked in-process: run names, metric namespaces, a job's run from start
(RUNNING) to end, the record's own tags and artifacts, experiment tags, the summary plot, the terminal's
progress bar and end-of-sweep text, and the preset viewer."""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from rtdlm_experiments import terminal, tracking
from rtdlm_experiments.analysis import drift, report
from rtdlm_experiments.config import presets
from rtdlm_experiments.results import metric_names
from rtdlm_experiments.results import record as results
from rtdlm_experiments.tracking import callbacks, names

# --- names --------------------------------------------------------------------------------------------


def test_parent_names_what_is_swept_and_the_model():
    assert names.sweep_run_name({"sampling": "creative,balanced"}, "qwen2.5-coder-0.5b") == (
        "sweep sampling=creative,balanced · qwen2.5-coder-0.5b"
    )
    assert (
        names.sweep_run_name({"model": "a,b"}, "a") == "sweep model=a,b"
    )  # a swept model is not "the" model


def test_children_name_only_their_swept_values_and_the_model_when_it_is_swept():
    overrides = ["model=qwen2.5-coder-1.5b", "decoder=speculative", "decoder.num_draft_tokens=4", "seed=3"]
    assert names.child_run_name(overrides, ["decoder.num_draft_tokens"]) == "num_draft_tokens=4"
    assert names.child_run_name(overrides, ["model", "decoder.num_draft_tokens"]) == (
        "qwen2.5-coder-1.5b · num_draft_tokens=4"
    )
    many = [f"decoder.num_draft_tokens={k}" for k in (2, 4, 6, 8)]
    assert len({names.child_run_name([override], ["decoder.num_draft_tokens"]) for override in many}) == 4


def test_single_runs_name_preset_decoder_model_without_noise():
    overrides = ["experiment_name=x", "tracking.uri=sqlite:///a.db", "prompts.limit=2", "model=tiny-random"]
    assert names.single_run_name("balanced", "autoregressive", "tiny-random", overrides) == (
        "balanced · autoregressive · tiny-random"
    )


# --- metric names -------------------------------------------------------------------------------------

A_RECORDED_JOB = {
    "tokens_per_second": 137.5, "ms_per_token": 7.2, "time_to_first_token_ms": 10.0,
    "sampler_us_per_step": 7.0, "target_forwards": 4.0, "draft_forwards": 0.0, "new_tokens": 8.0,
    "prefill_seconds": 0.003, "decode_seconds": 0.05, "total_seconds": 0.06, "nll_per_token": 1.4,
    "perplexity": 4.4, "mean_entropy": 0.9, "mean_kept": 4.7, "distinct_1": 1.0, "distinct_2": 1.0,
    "distinct_3_words": math.nan, "self_bleu_4": 0.0,
    "compression_ratio": 0.5, "seq_rep_4": 0.0, "rep_w16": 0.0, "loop_rate": 0.0, "zipf_coefficient": -0.0,
    "rounds": 4.0, "accepted_tokens": 0.0, "acceptance_rate": math.nan, "acceptance_rate_pos1": 0.5,
    "tokens_per_target_forward": 1.0, "predicted_speedup": 1.2, "speedup": 0.7, "verify_seconds": 0.02,
    "pass_at_1": 0.25, "pass_at_1_ci_low": 0.1, "pass_at_1_ci_high": 0.4,
}  # fmt: skip


def test_every_metric_of_a_job_lands_in_a_named_namespace():
    spaces = {name: metric_names.namespace_of(name) for name in A_RECORDED_JOB}
    assert "other" not in spaces.values(), [name for name, space in spaces.items() if space == "other"]
    assert spaces["speedup"] == "speed" and spaces["predicted_speedup"] == "spec"
    assert spaces["draft_forwards"] == spaces["verify_seconds"] == spaces["acceptance_rate_pos1"] == "spec"
    assert spaces["pass_at_1_ci_low"] == spaces["pass_at_1_ci_high"] == spaces["pass_at_1"] == "quality"


def test_only_defined_metrics_are_logged_and_no_draft_counters_for_autoregressive_jobs():
    autoregressive = metric_names.metrics_to_log(A_RECORDED_JOB, speculative=False)
    assert not [name for name in autoregressive if name.startswith("spec/")]
    assert "diversity/distinct_3_words" not in autoregressive  # NaN = undefined: left out, not 0
    assert autoregressive["diversity/distinct_2"] == 1.0 and autoregressive["speed/speedup"] == 0.7
    speculative = metric_names.metrics_to_log(A_RECORDED_JOB, speculative=True)
    assert speculative["spec/acceptance_rate_pos1"] == 0.5 and "spec/acceptance_rate" not in speculative
    assert all(math.isfinite(value) for value in speculative.values())


def test_plain_and_namespaced_names_are_accepted_alike():
    assert metric_names.plain_name("diversity/distinct_2") == "distinct_2"
    assert drift.parse_tolerances({"speed/speedup": "20%"}) == drift.parse_tolerances({"speedup": "20%"})
    table = pd.DataFrame({"run": ["a", "b"], "status": ["FINISHED"] * 2, "distinct_2": [0.2, 0.8]})
    runs = pd.DataFrame(
        {"run_id": ["1", "2"], "status": ["FINISHED"] * 2, "tags.mlflow.runName": ["a", "b"],
         "metrics.distinct_2": table["distinct_2"]}
    )  # fmt: skip
    for sort_by in ("distinct_2", "diversity/distinct_2"):
        assert list(report.summary_table(runs, sort_by)["run"]) == ["b", "a"]
    with pytest.raises(ValueError, match="cannot sort by"):
        report.summary_table(runs, "nonexistent")


# --- a job's run, start to end ------------------------------------------------------------------------


def saved_job(job_dir: Path, **extra) -> dict:
    """A job folder like the app saves, with a registry model (no weights needed: nothing loads)."""
    config = {
        "model": {"name": "qwen2.5-coder-0.5b", "dtype": "float32"},
        "sampling": {"preset": "balanced", "temperature": 0.7},
        "decoder": {"name": "autoregressive"},
        "prompts": {"name": "default", "limit": 2},
        "seed": 0,
        "experiment_name": "dash",
    }
    job = results.JobMeta("balanced · autoregressive · qwen2.5-coder-0.5b", ["prompts.limit=2"], 0,
                          str(job_dir), None, 1_700_000_000_000)  # fmt: skip
    record = {
        "status": "COMPLETED", "config": config, "config_hash": results.config_hash(config),
        "metrics": {"distinct_2": 0.5, "acceptance_rate": 0.0, "perplexity": math.nan},
        "job": job.__dict__,
        "environment": {"versions": {"torch": "2.x"}, "hostname": "box", "git_sha": "a" * 40,
                        "git_dirty": True, "device": "cpu", "dtype": "float32",
                        "weights_sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"},
        **extra,
    }  # fmt: skip
    generations = [
        {
            "prompt_index": 0,
            "sample_index": 0,
            "prompt": "Tell <me>",
            "output": "a & b",
            "mean_logprob": -1.0,
        },
        {"prompt_index": 1, "sample_index": 0, "prompt": "def f():", "output": "pass", "mean_logprob": -2.0},
    ]
    results.save_job(job_dir, record, generations)
    return record


def test_a_job_run_is_running_while_the_job_runs_then_filled_and_finished(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = saved_job(tmp_path / "job")
    pending = {key: record[key] for key in ("config", "config_hash", "job", "environment")}
    started = tracking.start_job_run(uri, "dash", pending, None)
    client = MlflowClient(uri)
    running = client.get_run(started.run_id)
    assert (running.info.status, running.info.run_name) == ("RUNNING", record["job"]["run_name"])
    assert running.data.params["sampling.temperature"] == "0.7"
    assert (
        running.data.tags["rtdlm.version.torch"] == "2.x" and running.data.tags["rtdlm.git_dirty"] == "true"
    )

    tracked = tracking.upload_job(tmp_path / "job", uri, "dash", None, started)
    assert tracked.run_id == started.run_id
    finished = client.get_run(started.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.metrics == {"diversity/distinct_2": 0.5}  # no NaN, no draft counter on AR
    assert finished.data.tags["rtdlm.model.sha256"] == (
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    )
    assert finished.data.tags["mlflow.source.git.commit"] == "a" * 40
    (dataset_input,) = finished.inputs.dataset_inputs
    assert (dataset_input.dataset.name, dataset_input.dataset.source_type) == ("default[:2]", "code")
    page = Path(client.download_artifacts(started.run_id, "generations.html", str(tmp_path / "dl")))
    assert "Tell &lt;me&gt;" in page.read_text() and "a &amp; b" in page.read_text()  # escaped, readable
    assert len(client.search_runs([finished.info.experiment_id])) == 1


def test_the_records_tags_and_artifacts_reach_the_run(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "scores.jsonl").write_text('{"task": "a", "passed": true}\n{"task": "b", "passed": false}\n')
    (job_dir / "notes.txt").write_text("hello\n")
    saved_job(job_dir, tags={"rtdlm.task": "humaneval"}, artifacts=["scores.jsonl", "notes.txt", "../escape"])
    tracked = tracking.upload_job(job_dir, uri, "dash")
    client = MlflowClient(uri)
    run = client.get_run(tracked.run_id)
    assert run.data.tags["rtdlm.task"] == "humaneval"
    paths = {entry.path for entry in client.list_artifacts(tracked.run_id)}
    assert {"scores.jsonl", "notes.txt", "scores_table.json"} <= paths
    table = json.loads(
        Path(client.download_artifacts(tracked.run_id, "scores_table.json", str(tmp_path))).read_text()
    )
    assert [row[table["columns"].index("task")] for row in table["data"]] == ["a", "b"]


def test_a_run_opened_before_the_store_failed_is_kept_and_filled_not_duplicated(tmp_path: Path, monkeypatch):
    """The store goes away between creating the job's run and logging its params: the run is still the
    job's, so the upload fills it instead of leaving it RUNNING beside a second run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = saved_job(tmp_path / "job")
    pending = {key: record[key] for key in ("config", "config_hash", "job", "environment")}
    real_log_batch = MlflowClient.log_batch
    with monkeypatch.context() as patched:
        patched.setattr(MlflowClient, "log_batch", lambda *a, **k: (_ for _ in ()).throw(OSError("db down")))
        started = tracking.start_job_run(uri, "dash", pending, None)
    assert started is not None and MlflowClient.log_batch is real_log_batch
    tracked = tracking.upload_job(tmp_path / "job", uri, "dash", None, started)
    client = MlflowClient(uri)
    runs = client.search_runs([tracked.experiment_id])
    assert [(run.info.run_id, run.info.status) for run in runs] == [(started.run_id, "FINISHED")]
    assert runs[0].data.params["sampling.temperature"] == "0.7"


def test_an_unreachable_store_at_job_start_returns_none_and_raises_nothing(tmp_path: Path):
    record = saved_job(tmp_path / "job")
    assert tracking.start_job_run("http://127.0.0.1:9", "dash", record, None) is None


def test_experiments_open_on_the_runs_table_and_keep_a_kind_the_user_chose(tmp_path: Path):
    client = tracking.mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = tracking.ensure_experiment(client, "fresh")
    tags = client.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development" and tags["mlflow.note.content"]
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "genai_development")
    assert tracking.ensure_experiment(client, "fresh") == experiment_id
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "genai_development"
    assert tracking.runs_table_url(client.tracking_uri, experiment_id).endswith(
        f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=rtdlm"
    )
    view = json.loads(client.get_experiment(experiment_id).tags["mlflow.sharedViewState.rtdlm"])
    assert "metrics.`diversity/distinct_2`" in view["selectedColumns"]  # the link opens with metric columns
    assert view["orderByKey"] == "metrics.`diversity/distinct_2`"


# --- the summary plot ---------------------------------------------------------------------------------


def test_every_run_has_its_own_entry_in_the_plot_key_even_with_a_long_common_prefix(tmp_path: Path):
    runs = [f"decoder.num_draft_tokens={k} · decoder.exit_layer={e} · self_speculative" for k in (2, 4, 6)
            for e in (1, 2)]  # fmt: skip
    table = pd.DataFrame({
        "run": runs, "preset": "balanced", "distinct_2": [0.5] * 2 + [0.6, 0.7, 0.8, 0.9],
        "seq_rep_4": 0.1, "speedup": [0.8, 1.0, 1.2, 1.4, 1.6, 1.8],
        "speedup_ci_low": [0.7, 0.9, 1.1, 1.3, 1.5, 1.7], "speedup_ci_high": [0.9, 1.1, 1.3, 1.5, 1.7, 2.3],
    })  # fmt: skip
    figure = report.summary_figure(table)
    key = [text.get_text() for text in figure.axes[-1].get_legend().get_texts()]
    assert key == [f"{number}  {run}" for number, run in enumerate(runs, start=1)]
    frontier, speedup = figure.axes[0], figure.axes[1]
    annotations = [child.get_text() for child in frontier.texts]
    assert annotations[0] == "1,2" and sorted(",".join(annotations).split(",")) == sorted("123456")
    assert frontier.get_xlim()[0] <= 0 and frontier.get_ylim()[0] <= 0  # non-negative metrics start at 0
    assert speedup.get_xlim()[0] <= 0 and speedup.get_xlim()[1] >= 2.3  # error bars fit
    assert len(speedup.patches) == 6
    assert report.plot_summary(table, tmp_path / "p.png").stat().st_size > 0


def test_quality_gets_its_own_panel_next_to_diversity_with_error_bars():
    table = pd.DataFrame({
        "run": ["a", "b"], "preset": "balanced", "distinct_2": [0.4, 0.8], "seq_rep_4": [0.2, 0.1],
        "pass_at_1": [0.5, 0.3], "pass_at_1_ci_low": [0.4, 0.2], "pass_at_1_ci_high": [0.6, 0.4],
    })  # fmt: skip
    figure = report.summary_figure(table)
    _, quality, _ = figure.axes
    assert quality.get_title() == "Quality vs diversity" and quality.get_ylabel().startswith("pass@1")
    assert len(quality.containers) == 2  # one error-bar container per run
    assert len(report.summary_figure(table.drop(columns=["pass_at_1"])).axes) == 2  # no quality, no panel


def test_axis_limits_respect_the_metric_range():
    assert report.axis_limits("seq_rep_4", [0.0, 0.0])[0] < 0 < 1 < report.axis_limits("seq_rep_4", [0.0])[1]
    assert report.axis_limits("zipf_coefficient", [-0.5, 1.0])[0] is None


# --- terminal -----------------------------------------------------------------------------------------


def test_progress_counts_the_token_budget_and_rates_generated_tokens_only():
    bar = terminal.TokenProgress(total_tokens=3 * 8, description="job", enabled=False)  # 3 rows, 8 tokens
    bar.advance(3, 7)  # first step: a token per row, and one row stopped there, releasing its other 7
    for _ in range(7):
        bar.advance(2, 0)  # the two other rows run to max_new_tokens
    assert (bar.accounted, bar.generated) == (24, 17)  # the whole budget; the rate counts 17 tokens
    bar.close()
    assert isinstance(terminal.progress_factory(4, "x"), terminal.TokenProgress)


def test_third_party_bars_are_silenced_only_off_a_terminal(monkeypatch: pytest.MonkeyPatch):
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(key, raising=False)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert terminal.quiet_third_party_progress(Tty()) is False
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    assert terminal.quiet_third_party_progress(io.StringIO()) is True
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_the_sweep_end_shows_the_table_with_intervals_every_failure_and_one_link(tmp_path: Path):
    def record(num: int, name: str, status: str, **extra) -> dict:
        return {"job": {"num": num, "run_name": name}, "status": status, **extra}

    records = [
        record(0, "creative", "COMPLETED", metrics={"distinct_2": 0.5, "distinct_2_ci_low": 0.4,
                                                    "distinct_2_ci_high": 0.6}),
        record(1, "top_p=1.5", "FAILED", error="ConfigError: sampling.top_p=1.5 is invalid\ntraceback..."),
        record(2, "top_p=2.0", "FAILED", error="ConfigError: sampling.top_p=2.0 is invalid"),
    ]  # fmt: skip
    mlflow = {"tracking_uri": "sqlite:////x/mlflow.db", "experiment_id": "7", "parent_run_id": "p1"}
    text = callbacks.sweep_end_text(records, tmp_path, {}, mlflow)
    assert "0.500 [0.400, 0.600]" in text
    assert "#1 top_p=1.5: ConfigError: sampling.top_p=1.5 is invalid" in text and "traceback" not in text
    assert "#2 top_p=2.0: ConfigError: sampling.top_p=2.0 is invalid" in text
    assert text.count("/#/experiments/7/runs?workflowType=machine_learning") == 1
    assert "/#/experiments/7/runs/p1" in text


# --- presets ------------------------------------------------------------------------------------------


def test_the_preset_viewer_shows_effective_values_and_overrides(capsys: pytest.CaptureFixture):
    assert presets.main(["creative", "top_p=0.8"]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"^  temperature +1\.2$", shown, re.M) and re.search(r"^  top_p +0\.8 \*$", shown, re.M)
    assert presets.main([]) == 0
    assert "creative" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        presets.main(["creative", "top_p=3"])
    assert exit_info.value.code == 2
