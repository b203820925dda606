"""Every sampling field is a Hydra override on top of a preset: composed, converted to plain values,
validated before any model loads, run end to end, and shown in the flattened (MLflow params) config."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest
from composed import compose_tiny as compose_config

from rtdlm_experiments.config import validation
from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.config.schema import SamplingSchema
from rtdlm_experiments.job import app
from rtdlm_experiments.results import record as results
from sampling import PRESETS, SamplingConfig

OVERRIDES = {
    "typical_p": ("0.8", 0.8),
    "epsilon_cutoff": ("0.001", 0.001),
    "eta_cutoff": ("0.002", 0.002),
    "top_n_sigma": ("1.5", 1.5),
    "dynatemp_range": ("0.3", 0.3),
    "dynatemp_exponent": ("2.0", 2.0),
    "xtc_probability": ("0.5", 0.5),
    "xtc_threshold": ("0.2", 0.2),
    "dry_multiplier": ("0.8", 0.8),
    "dry_base": ("2.0", 2.0),
    "dry_allowed_length": ("3", 3),
    "dry_penalty_last_n": ("64", 64),
    "dry_sequence_breakers": ("[10,13]", (10, 13)),
    "no_repeat_ngram_size": ("3", 3),
    "logit_bias": ("{50256: -100, 7: -inf, 3: 2.5}", ((3, 2.5), (7, -math.inf), (50256, -100.0))),
    "mirostat": ("2", 2),
    "mirostat_tau": ("4.0", 4.0),
    "mirostat_eta": ("0.2", 0.2),
    "order": ("[penalties,top_k,temperature,min_p]", ("penalties", "top_k", "temperature", "min_p")),
}
"""Each new field: a Hydra override value, and the field's value in the `SamplingConfig` it gives."""

BAD = {
    "typical_p": ("1.5", "in (0, 1]"),
    "epsilon_cutoff": ("1.0", "in [0, 1)"),
    "eta_cutoff": ("-0.1", "in [0, 1)"),
    "top_n_sigma": ("-1", ">= 0"),
    "dynatemp_range": ("-0.5", ">= 0"),
    "dynatemp_exponent": ("0", "> 0"),
    "xtc_probability": ("1.5", "in [0, 1]"),
    "xtc_threshold": ("-0.1", "in [0, 1]"),
    "dry_multiplier": ("-1", ">= 0"),
    "dry_base": ("0.5", ">= 1"),
    "dry_allowed_length": ("0", ">= 1"),
    "dry_penalty_last_n": ("0", ">= 1"),
    "dry_sequence_breakers": ("[-3]", "token ids >= 0"),
    "no_repeat_ngram_size": ("-1", ">= 0"),
    "logit_bias": ("{5: inf}", "finite or -inf"),
    "mirostat": ("1", "0 (off) or 2"),
    "mirostat_tau": ("-1", ">= 0"),
    "mirostat_eta": ("-1", ">= 0"),
    "order": ("[top_k,wild]", "unknown stage(s) ['wild']"),
}
"""Each new field: a value of the right type but out of range, and what the one-line error says."""


def test_the_schema_and_the_tables_cover_every_sampling_field():
    sampler_fields = {f.name for f in fields(SamplingConfig)} - {"seed"}
    assert {f.name for f in fields(SamplingSchema)} - {"preset"} == sampler_fields
    new = sampler_fields - {"temperature", "top_k", "top_p", "min_p", "do_sample"}
    new -= {"repetition_penalty", "repetition_window", "frequency_penalty", "presence_penalty"}
    assert set(OVERRIDES) == set(BAD) == new


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_every_field_overrides_the_preset_from_hydra(name: str):
    text, expected = OVERRIDES[name]
    spec = validation.prepare_job(compose_config("sampling=precise", f"sampling.{name}={text}"))
    assert spec.sampling == PRESETS["precise"].replace(**{name: expected}, seed=0)
    value = getattr(spec.sampling, name)
    assert not isinstance(value, list | dict) and "omegaconf" not in type(value).__module__


def test_null_keeps_the_preset_value_for_every_field():
    nulls = [f"sampling.{name}=null" for name in OVERRIDES]
    assert validation.prepare_job(compose_config("sampling=creative", *nulls)).sampling == PRESETS[
        "creative"
    ].replace(seed=0)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sampling.order=llamacpp", "llamacpp"),
        ("sampling.order=[top_k,temperature]", ("top_k", "temperature")),
        ("sampling.logit_bias=[[3,1.5]]", ((3, 1.5),)),
        ("++sampling.logit_bias={50256: -100}", ((50256, -100.0),)),
    ],
)
def test_order_and_logit_bias_accept_each_form(override: str, expected):
    sampling = validation.prepare_job(compose_config(override)).sampling
    assert (sampling.order if "order" in override else sampling.logit_bias) == expected


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_field_is_validated_in_one_line_naming_it(name: str):
    text, allowed = BAD[name]
    with pytest.raises(ConfigError) as caught:
        validation.prepare_job(compose_config(f"sampling.{name}={text}"))
    message = str(caught.value)
    assert message.startswith(f"sampling.{name}=") and "is invalid" in message and allowed in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sampling.order=5"], "sampling.order='5' is invalid: must be one of ['hf', 'llamacpp'"),
        (["sampling.order=[mirostat,top_k]"], "with 'mirostat' last"),
        (["sampling.order=[top_k,top_k]"], "repeated stage(s) ['top_k']"),
        (["sampling.order=hf", "sampling.mirostat=2"], "an order holding every enabled stage (['mirostat']"),
        (["sampling.logit_bias={a: 1}"], "sampling.logit_bias={'a': 1} is invalid"),
    ],
)
def test_malformed_orders_and_biases_name_the_field(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validation.prepare_job(compose_config(*overrides))


def test_schema_types_the_lists_at_compose_time():
    with pytest.raises(Exception) as caught:
        compose_config("sampling.dry_sequence_breakers=[a]")
    assert "could not be converted to Integer" in f"{caught.value} {caught.value.__cause__}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "sampling.typical_p=1.5",
            "error: sampling.typical_p=1.5 is invalid: must be in (0, 1] (1 = disabled)",
        ),
        (
            "sampling.order=[top_k,wild]",
            "error: sampling.order=('top_k', 'wild') is invalid: must be a list of",
        ),
    ],
)
def test_bad_value_on_the_command_line_exits_2_before_loading_the_model(
    run_cli: Callable, tiny_job: tuple[str, ...], override: str, expected: str
):
    result = run_cli(*tiny_job, override)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(expected) and len(result.stderr.strip().splitlines()) == 1
    assert "loaded tiny-random" not in result.stdout + result.stderr


STATEFUL_JOB = (
    "sampling=creative",
    "sampling.mirostat=2",
    "sampling.mirostat_tau=4.0",
    "sampling.dry_multiplier=0.8",
    "sampling.dry_sequence_breakers=[10]",
    "sampling.xtc_probability=0.5",
    "sampling.typical_p=0.9",
    "sampling.logit_bias={7: -inf}",
    "batch_size=2",
)
"""Mirostat + DRY + XTC + typical-p (+ a ban) on top of a preset."""
EXPECTED_PARAMS = {
    "sampling.preset": "creative",
    "sampling.mirostat": 2,
    "sampling.mirostat_tau": 4.0,
    "sampling.dry_multiplier": 0.8,
    "sampling.dry_sequence_breakers": [10],
    "sampling.xtc_probability": 0.5,
    "sampling.typical_p": 0.9,
    "sampling.logit_bias": [[7, -math.inf]],
    "sampling.order": "rtdlm",
    "sampling.top_k": PRESETS["creative"].top_k,
}
"""What the flattened resolved config (the MLflow params) shows for `STATEFUL_JOB`."""


def test_mirostat_dry_xtc_typical_job_runs_in_process(prompt_file: Path):
    cfg = compose_config(
        *STATEFUL_JOB,
        "prompts=file",
        f"prompts.path={prompt_file}",
        "prompts.chat_template=false",
        "max_new_tokens=6",
    )
    spec = validation.prepare_job(cfg)
    assert spec.sampling.stages == (
        *("penalties", "dry", "logit_bias", "temperature", "top_k", "top_p", "typical_p", "xtc", "mirostat"),
    )
    result = app.run_job(spec)
    assert len(result.output.token_ids) == 2 and all(1 <= len(ids) <= 6 for ids in result.output.token_ids)
    assert all(7 not in ids for ids in result.output.token_ids)  # banned by logit_bias
    params = results.flatten_config(validation.resolved_config(cfg, spec))
    assert {key: params[key] for key in EXPECTED_PARAMS} == EXPECTED_PARAMS


@pytest.mark.slow
def test_mirostat_dry_xtc_typical_job_runs_end_to_end(
    run_cli: Callable, tiny_job: tuple[str, ...], tmp_path: Path
):
    result = run_cli(*tiny_job, *STATEFUL_JOB, "tracking=none")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "COMPLETED" and record["num_prompts"] == 2
    params = results.flatten_config(record["config"])
    assert {key: params[key] for key in EXPECTED_PARAMS} == EXPECTED_PARAMS
    in_memory = validation.prepare_job(compose_config(*STATEFUL_JOB)).sampling
    assert record["config"]["sampling"] == {"preset": "creative", **_plain(in_memory)}
    generations = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2


def _plain(config: SamplingConfig) -> dict:
    """A config's fields as its JSON copy holds them (tuples as lists, no seed)."""
    flat = results.flatten_config({f.name: getattr(config, f.name) for f in fields(config)})
    flat.pop("seed")
    return flat
