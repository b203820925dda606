"""Quality next to diversity, in the app: HumanEval pass@k behind its opt-in, CIs beside every mean,
answer scores, judge likelihood, stop strings cutting texts, and the paired comparison of two jobs."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from composed import compose_tiny as compose_config

from rtdlm_experiments.analysis import compare, report
from rtdlm_experiments.analysis.stats import bootstrap_statistic_ci
from rtdlm_experiments.config import validation
from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.job import app
from rtdlm_experiments.job.evaluation import HUMANEVAL_SAMPLES_FILE, ISOLATION_TAG
from rtdlm_experiments.metrics import distinct_n
from rtdlm_experiments.metrics.intervals import CI_HIGH, CI_LOW, distinct_n_interval
from rtdlm_experiments.results import record as results
from rtdlm_experiments.tasks.execution import STATUSES


def save(tmp_path: Path, name: str, spec: validation.JobSpec, result: app.JobResult) -> Path:
    job = results.JobMeta(name, [], 0, str(tmp_path / name), None, 0)
    record = results.job_record({"seed": spec.seed}, result, job, None)
    results.save_job(tmp_path / name, record, results.generation_records(spec, result), result.artifacts)
    return tmp_path / name


def intervals_of(metrics: dict[str, float]) -> dict[str, tuple[float, float, float]]:
    names = [key.removesuffix(CI_LOW) for key in metrics if key.endswith(CI_LOW)]
    return {name: (metrics[name + CI_LOW], metrics[name], metrics[name + CI_HIGH]) for name in names}


@pytest.fixture(scope="module")
def default_job() -> tuple[validation.JobSpec, app.JobResult]:
    """Tiny-random on the first 6 default prompts (two of them factual, with answers), 3 samples each."""
    spec = validation.prepare_job(compose_config("prompts.limit=6", "num_samples=3", "max_new_tokens=12"))
    return spec, app.run_job(spec)


def test_humaneval_job_needs_the_opt_in_before_any_model_loads(monkeypatch: pytest.MonkeyPatch):
    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(app, "load_model", no_loading)
    with pytest.raises(ConfigError, match=re.escape("eval.allow_code_execution=false is invalid")) as caught:
        validation.prepare_job(compose_config("prompts=humaneval", "prompts.limit=2"))
    assert "\n" not in str(caught.value) and "eval.allow_code_execution=true" in str(caught.value)


def test_humaneval_job_scores_pass_at_k_with_per_problem_rows(tmp_path: Path):
    spec = validation.prepare_job(
        compose_config("prompts=humaneval", "prompts.limit=2", "prompts.shuffle=false", "num_samples=2",
                       "max_new_tokens=6",
                       "eval.allow_code_execution=true", "eval.timeout_s=10")
    )  # fmt: skip
    result = app.run_job(spec)
    low, estimate, high = intervals_of(result.metrics)["pass_at_1"]
    assert 0.0 <= low <= estimate <= high <= 1.0
    assert "pass_at_5" not in result.metrics  # k > samples per problem
    rows = result.artifacts[HUMANEVAL_SAMPLES_FILE]
    assert [(row["task_id"], row["sample"]) for row in rows] == [
        ("HumanEval/0", 0), ("HumanEval/0", 1), ("HumanEval/1", 0), ("HumanEval/1", 1),
    ]  # fmt: skip
    assert {row["status"] for row in rows} <= set(STATUSES)
    assert estimate == sum(row["status"] == "passed" for row in rows) / 4
    assert result.tags[ISOLATION_TAG].startswith("rlimits+process-group")
    job_dir = save(tmp_path, "humaneval", spec, result)
    record, _ = results.load_job(job_dir)
    assert record["artifacts"] == [HUMANEVAL_SAMPLES_FILE] and record["tags"] == result.tags
    lines = (job_dir / HUMANEVAL_SAMPLES_FILE).read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == [row["status"] for row in rows]


def test_every_mean_metric_has_an_interval_around_it(default_job):
    _, result = default_job
    intervals = intervals_of(result.metrics)
    expected = {"nll_per_token", "perplexity", "mean_entropy", "seq_rep_4", "rep_w16", "loop_rate",
                "exact_match", "contains_answer", *(f"distinct_{n}" for n in range(1, 5))}  # fmt: skip
    assert expected <= set(intervals)
    for name, (low, estimate, high) in intervals.items():
        assert low <= estimate + 1e-12 and estimate <= high + 1e-12, name


def test_answers_give_exact_match_and_contains_answer(default_job):
    spec, result = default_job
    answered = [i for i, row in enumerate(result.rows) if spec.prompts[row.prompt_index].answer is not None]
    assert answered  # the default set's factual prompts carry answers
    from rtdlm_experiments.tasks.answers import contains_answer

    expected = sum(contains_answer(result.texts[i], spec.prompts[result.rows[i].prompt_index].answer)
                   for i in answered) / len(answered)  # fmt: skip
    assert result.metrics["contains_answer"] == pytest.approx(expected)


def test_judge_of_the_same_model_agrees_with_the_sampler_and_another_tokenizer_fails():
    spec = validation.prepare_job(
        compose_config("prompts.limit=3", "max_new_tokens=8", "judge.model=tiny-random")
    )
    result = app.run_job(spec)
    assert result.metrics["judge_nll_per_token"] == pytest.approx(result.metrics["nll_per_token"], rel=1e-4)
    assert result.metrics["judge_perplexity"] == pytest.approx(
        math.exp(result.metrics["judge_nll_per_token"])
    )
    other = validation.JobSpec(**{**spec.__dict__, "judge_model": {"name": "tiny-random", "vocab_size": 300}})
    with pytest.raises(ConfigError, match=r"judge\.model='tiny-random' is invalid: its tokenizer differs"):
        app.run_job(other)


def test_vectorised_distinct_interval_is_the_generic_bootstrap():
    sequences = [[1, 2, 3, 1], [1, 2], [4, 5, 4, 5], [2, 3, 9], [7], [1, 2, 3]]
    groups = [0, 0, 1, 2, 2, 3]
    by_group = [[seq for seq, g in zip(sequences, groups, strict=True) if g == k] for k in range(4)]
    for n in (1, 2):
        fast = distinct_n_interval(sequences, groups, n, resamples=300)
        slow = bootstrap_statistic_ci(by_group, functools.partial(pooled_distinct, n=n), resamples=300)
        assert fast == pytest.approx(slow)
        corrected = distinct_n_interval(sequences, groups, n, resamples=300, correct_bias=True)
        assert corrected.estimate == slow.estimate and corrected.low <= corrected.estimate <= corrected.high


def pooled_distinct(drawn: list[list[list[int]]], n: int) -> float:
    return distinct_n([seq for group in drawn for seq in group], n)


def test_stop_strings_cut_the_texts_and_reach_the_decoder(default_job):
    spec, _ = default_job
    from rtdlm_experiments.models import ByteTokenizer

    plain = app.generation_options(spec, ByteTokenizer(), [])
    assert (
        plain.stop_strings is None and plain.ignore_eos is False and plain.max_batch_size == spec.batch_size
    )
    stopping = validation.JobSpec(**{**spec.__dict__, "stop_strings": ("b",), "ignore_eos": True})
    options = app.generation_options(stopping, ByteTokenizer(), [])
    assert options.ignore_eos is True and options.stop_strings.strings == ("b",)
    assert options.stop_strings.detokenize([97, 98]) == "ab"
    assert app.decode_texts(ByteTokenizer(), [[97, 98, 99], [99]], ("b",)) == ["a", "c"]
    cfg = compose_config("prompts=humaneval", "prompts.chat_template=false", "eval.allow_code_execution=true")
    assert "\ndef " in validation.prepare_job(cfg).stop_strings
    assert validation.prepare_job(compose_config("prompts.stop_strings=[END]")).stop_strings == ("END",)


def test_compare_two_job_folders_prints_a_verdict_per_metric(default_job, tmp_path: Path, capsys):
    spec, result = default_job
    other_spec = validation.JobSpec(**{**spec.__dict__, "seed": 1, "sampling": spec.sampling.replace(seed=1)})
    folder_a = save(tmp_path, "a", spec, result)
    folder_b = save(tmp_path, "b", other_spec, app.run_job(other_spec))
    assert compare.main([str(folder_a), str(folder_b), "--resamples", "500"]) == 0
    lines = capsys.readouterr().out.splitlines()
    verdicts = {line.split(":")[0]: line for line in lines[2:]}
    assert {"contains_answer", "mean_logprob", "seq_rep_4", "loop", "distinct_2"} <= set(verdicts)
    # 6 prompts: below stats.MIN_PAIRED_PROMPTS, so no difference is called either way
    assert all(line.endswith(": too few prompts to tell (at least 10 needed)") for line in verdicts.values())
    assert report.main(["--compare", str(folder_a), str(folder_a), "--resamples", "200"]) == 0
    assert all("too few prompts to tell" in line for line in capsys.readouterr().out.splitlines()[2:])
