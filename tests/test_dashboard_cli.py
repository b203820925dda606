"""The terminal as a user meets it: ``--help``, a rejected config, a sweep with several failed jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_help_is_the_apps_own_with_groups_options_and_examples(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "powered by Hydra" not in text
    assert "_schema" not in text  # the ConfigStore's structured configs stay internal
    assert "sampling: balanced, creative, deterministic, precise" in text
    assert "decoder: autoregressive, prompt_lookup, self_speculative, speculative" in text
    assert "== Examples ==" in text and "-m sampling=creative,balanced" in text
    assert "python -m rtdlm_experiments.config.presets" in text


def test_a_rejected_config_leaves_no_run_folder_and_no_run(run_cli, tiny_job, tmp_path: Path):
    result = run_cli(*tiny_job, "sampling.top_p=1.5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: sampling.top_p=1.5 is invalid: must be in (0, 1] (1 = disabled)"
    )
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not any(runs.iterdir())
    if (tmp_path / "outputs" / "mlflow.db").exists():
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
        assert not [
            run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])
        ]


def test_a_single_run_prints_one_link_to_the_runs_table(run_cli, tiny_job, tmp_path: Path):
    result = run_cli(*tiny_job)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("?workflowType=machine_learning") == 1
    assert "== balanced · autoregressive · tiny-random |" in result.stdout
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert json.loads((run_dir / "results.json").read_text())["job"]["run_name"] == (
        "balanced · autoregressive · tiny-random"
    )


@pytest.mark.slow
def test_every_failed_job_of_a_sweep_is_named_with_its_error_at_the_end(run_cli, tiny_job):
    result = run_cli("-m", "sampling.top_p=1.5,0.9,2.0", "tracking=none", *tiny_job)
    assert result.returncode == 1
    end = result.stdout[result.stdout.index("== sweep: 3 jobs") :]
    assert "2 job(s) failed:" in end
    assert "#0 top_p=1.5: ConfigError: sampling.top_p=1.5 is invalid" in end
    assert "#2 top_p=2.0: ConfigError: sampling.top_p=2.0 is invalid" in end
    assert "top_p=0.9  COMPLETED" in end
