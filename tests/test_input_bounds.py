"""Every input bounded, every rejection one line (exit 2), before any model loads — or, for what only the
loaded model knows (its vocabulary, its context), before anything is generated."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from composed import prepare_tiny as prepare

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.job.prompt_sets import load_prompts


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_samples=1000000000", "num_samples=1000000000 is invalid: must be in [1, 10000]"),
        ("max_new_tokens=1000000000", "max_new_tokens=1000000000 is invalid: must be in [1, 131072]"),
        ("batch_size=100000", "batch_size=100000 is invalid: must be in [1, 4096]"),
        ("judge.batch_size=100000", "judge.batch_size=100000 is invalid: must be in [1, 4096]"),
        (
            "prompts.limit=1000000000",
            "prompts.limit=1000000000 is invalid: must be in [1, 100000], or null for all",
        ),
        ("eval.timeout_s=inf", "eval.timeout_s=inf is invalid: must be in [0.001, 3600]"),
        ("eval.timeout_s=nan", "eval.timeout_s=nan is invalid: must be in [0.001, 3600]"),
        ("eval.workers=1000", "eval.workers=1000 is invalid: must be in [1, 64]"),
    ],
)
def test_each_count_and_limit_is_bounded(override: str, message: str):
    with pytest.raises(ConfigError) as caught:
        prepare(override)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("decoder=prompt_lookup", "decoder.max_ngram=100000"),
            "decoder.max_ngram=100000 is invalid: must be in",
        ),
        (
            ("decoder=prompt_lookup", "decoder.num_draft_tokens=1000000"),
            "decoder.num_draft_tokens=1000000 is",
        ),
        (
            ("prompts.stop_strings=[" + ",".join(["x"] * 65) + "]",),
            r"len\(prompts.stop_strings\)=65 is invalid",
        ),
        (("prompts.stop_strings=[" + "y" * 1001 + "]",), "the longest of prompts.stop_strings' length=1001"),
    ],
)
def test_decoder_counts_and_stop_strings_are_bounded(overrides: tuple[str, ...], message: str):
    with pytest.raises(ConfigError, match=message):
        prepare(*overrides)


def test_rows_times_tokens_is_bounded():
    with pytest.raises(ConfigError, match=r"max_new_tokens=100000 is invalid: .* at most 50000000 per job"):
        prepare("num_samples=10000", "max_new_tokens=100000")


def test_a_non_utf8_prompt_file_is_named(tmp_path: Path):
    for name in ("prompts.txt", "prompts.jsonl"):
        path = tmp_path / name
        path.write_bytes(b'{"text": "caf\xe9"}\n')
        with pytest.raises(ConfigError, match=rf"prompts.path='{path}' is invalid: not UTF-8 text \(byte 13"):
            load_prompts({"name": "file", "path": str(path)})


@pytest.mark.parametrize("line", ['{"text": 5}', '{"text": "a", "category": 3}', "[]", '"text"'])
def test_a_jsonl_line_without_a_string_text_is_rejected(tmp_path: Path, line: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=r"line 1 of .* is invalid: need a JSON object with a 'text' field"):
        load_prompts({"name": "file", "path": str(path)})


def test_a_prompt_file_that_is_a_folder_or_unreadable_is_one_line(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        load_prompts({"name": "file", "path": str(tmp_path)})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed=abc", "error: seed='abc' is invalid: must be an integer"),
        ("max_new_tokens=abc", "error: max_new_tokens='abc' is invalid: must be an integer"),
        ("eval.timeout_s=soon", "error: eval.timeout_s='soon' is invalid: must be a number"),
        ("num_samples=1000000000", "error: num_samples=1000000000 is invalid: must be in [1, 10000]"),
    ],
)
def test_cli_rejects_bad_values_with_one_line_and_exit_2(
    run_cli: Callable, tiny_job: tuple[str, ...], override: str, expected: str
):
    result = run_cli(*tiny_job, "tracking.backend=none", override)
    assert (result.returncode, result.stderr.strip()) == (2, expected)
    assert "loaded tiny-random" not in result.stdout + result.stderr


def test_cli_names_an_output_folder_that_cannot_be_made(run_cli: Callable, tiny_job, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli(*tiny_job, "tracking.backend=none", RTDLM_OUTPUT_DIR=str(blocker / "outputs"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: RTDLM_OUTPUT_DIR='{blocker / 'outputs'}' is invalid: cannot create {blocker / 'outputs'}:"
        " Not a directory; set RTDLM_OUTPUT_DIR to a writable folder"
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ("sampling.logit_bias={999999: 1}",),
            r"error: sampling.logit_bias=\{999999: ...\} is invalid: token ids",
        ),
        (
            ("max_new_tokens=5000",),
            r"error: max_new_tokens=5000 is invalid: must be below the model's context",
        ),
        ((), r"error: prompts: prompt 1 \('word word .*'...\) is invalid: \d+ tokens \+ max_new_tokens=4 >"),
    ],
    ids=["logit-bias-outside-vocab", "max-new-tokens-over-context", "prompt-over-context"],
)
def test_what_needs_the_model_is_checked_before_generating(
    run_cli: Callable, tmp_path: Path, extra: tuple[str, ...], expected: str
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n" + ("" if extra else "word " * 20_000 + "\n"))  # prompt 1: over 4096 tokens
    job = ("model=tiny-random", "prompts=file", f"prompts.path={prompts}", "prompts.chat_template=false")
    args = (*job, "max_new_tokens=4", "tracking.backend=none", *extra)
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert re.match(expected, result.stderr.strip())
