"""The Hydra app: every config composes and validates, bad input fails fast in one line, jobs are
reproducible whatever the batching, and decoder configs instantiate their decoders."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from composed import compose_config
from omegaconf import OmegaConf

from rtdlm_experiments.config import validation
from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.config.paths import config_dir
from rtdlm_experiments.job import app
from rtdlm_experiments.job.prompt_sets import Prompt, build_task, bundled_sets, load_prompts
from rtdlm_experiments.results import record as results
from sampling import PRESETS
from sampling.decoding import AutoregressiveDecoder, GenerationOutput, merge_outputs

CONF = config_dir()


def group_options() -> list[tuple[str, str]]:
    return sorted(
        (group.name, option.stem)
        for group in CONF.iterdir()
        if group.is_dir()
        for option in group.glob("*.yaml")
    )


# --- composition --------------------------------------------------------------------------------------


def test_config_dir_is_the_top_level_conf():
    assert CONF == Path(__file__).resolve().parents[1] / "conf"
    assert {name for name, _ in group_options()} >= {
        "model",
        "sampling",
        "decoder",
        "prompts",
        "tracking",
        "sweep",
    }


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_config_option_composes_and_validates(group: str, option: str, prompt_file: Path):
    overrides = [f"{group}={option}"]
    if group == "model":  # loading and validating models is tests/test_models.py's job
        assert compose_config(*overrides).model.name
        return
    if group == "sweep":  # validated job by job below
        assert compose_config(*overrides, hydra_node=True).hydra.mode.name == "MULTIRUN"
        return
    if (group, option) == ("prompts", "file"):
        overrides.append(f"prompts.path={prompt_file}")
    if group == "prompts":  # code tasks' opt-in, tested in tests/test_quality_app.py
        overrides.append("eval.allow_code_execution=true")
    assert validation.prepare_job(compose_config("model=tiny-random", *overrides)).prompts


@pytest.mark.parametrize(
    "sweep", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml") if not p.stem.startswith("search_"))
)  # search presets (no grid to expand): tests/test_search.py validates their space
def test_every_job_of_every_sweep_preset_validates(sweep: str):
    """Expand each sweep's grid and validate every job, so a sweep never names a dead key or value."""
    cfg = compose_config(f"sweep={sweep}", hydra_node=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}
    assert params, f"sweep={sweep} sweeps nothing"
    jobs = [dict(zip(params, values, strict=True)) for values in itertools.product(*params.values())]
    for job in jobs:
        # Groups first: a field override like decoder.exit_layer applies to the chosen decoder.
        ordered = [f"{key}={value}" for key, value in sorted(job.items(), key=lambda item: "." in item[0])]
        cfg = compose_config(f"sweep={sweep}", *ordered)
        if build_task(cfg.prompts).needs_code_execution:  # a preset never opts in to running code
            assert not cfg.eval.allow_code_execution
            with pytest.raises(ConfigError, match=r"eval\.allow_code_execution"):
                validation.prepare_job(cfg)
            cfg = compose_config(f"sweep={sweep}", *ordered, "eval.allow_code_execution=true")
        spec = validation.prepare_job(cfg)
        for key, value in job.items():
            if key.startswith("sampling."):
                assert getattr(spec.sampling, key.removeprefix("sampling.")) == pytest.approx(float(value))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sampling_yaml_is_exactly_the_preset(preset: str):
    """The yaml names the preset and copies no number, so it cannot drift from sampling.PRESETS."""
    cfg = compose_config(f"sampling={preset}", "seed=7")
    assert validation.sampling_config(cfg.sampling, seed=7) == PRESETS[preset].replace(seed=7)
    assert OmegaConf.to_container(OmegaConf.load(CONF / "sampling" / f"{preset}.yaml")) == {"preset": preset}


def test_sampling_fields_override_the_preset_from_the_command_line():
    cfg = compose_config(
        "sampling=creative", "sampling.min_p=0.1", "sampling.order=vllm", "sampling.temperature=0.9"
    )
    expected = PRESETS["creative"].replace(min_p=0.1, order="vllm", temperature=0.9, seed=0)
    assert validation.sampling_config(cfg.sampling, seed=0) == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("max_new_tokens=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("sampling.top_k=1.5", "Value '1.5' of type 'float' could not be converted to Integer"),
        ("sampling.top_q=0.5", "Could not override 'sampling.top_q'"),
        ("decoder.exit_layer=3", "Key 'exit_layer' not in 'AutoregressiveSchema'"),
        ("sampling=nucleus", "Could not find 'sampling/nucleus'"),
    ],
)
def test_schema_rejects_wrong_types_and_unknown_keys_at_compose_time(override: str, message: str):
    with pytest.raises(Exception) as caught:
        compose_config(override)
    assert message in f"{caught.value} {caught.value.__cause__}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.top_p=1.5", "sampling.top_p=1.5 is invalid"),
        ("sampling.temperature=-1", "sampling.temperature=-1.0 is invalid"),
        ("sampling.preset=wild", "sampling.preset='wild' is invalid"),
        ("max_new_tokens=0", "max_new_tokens=0 is invalid"),
        ("prompts.limit=0", "prompts.limit=0 is invalid"),
        ("tracking.backend=wandb", "tracking.backend='wandb' is invalid"),
        ("model.name=gpt-9", "model.name='gpt-9' is unknown"),
    ],
)
def test_prepare_job_names_the_bad_field(override: str, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validation.prepare_job(compose_config("model=tiny-random", override))


# --- bad input on the command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sampling.top_p=1.5", "error: sampling.top_p=1.5 is invalid: must be in (0, 1] (1 = disabled)"),
        (
            "sampling.temperature=-1",
            "error: sampling.temperature=-1.0 is invalid: must be finite and >= 0 (0 = greedy)",
        ),
    ],
)
def test_bad_value_fails_fast_with_one_line_naming_the_field(
    run_cli: Callable, tiny_job: tuple[str, ...], override: str, expected: str
):
    result = run_cli(*tiny_job, override)
    assert result.returncode == 2
    assert result.stderr.strip() == expected
    assert "loaded tiny-random" not in result.stdout + result.stderr  # failed before loading anything


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sampling=wild", "Could not find 'sampling/wild'"),
        ("sampling.top_k=[1]", "Error merging override sampling.top_k=[1]"),
    ],
)
def test_compose_error_is_hydras_short_message(
    run_cli: Callable, tiny_job: tuple[str, ...], override: str, expected: str
):
    result = run_cli(*tiny_job, override)
    assert result.returncode == 1
    assert expected in result.stderr.splitlines()[0]
    assert "Traceback" not in result.stderr
    assert "loaded tiny-random" not in result.stdout + result.stderr


# --- prompts ------------------------------------------------------------------------------------------


def test_bundled_prompt_set_covers_every_category():
    prompts = load_prompts({"name": "default", "limit": None})
    assert "default" in bundled_sets()
    assert len(prompts) == 16
    assert {prompt.category for prompt in prompts} == {"story", "code", "factual", "instruction"}
    assert [prompt.category for prompt in load_prompts({"name": "default", "limit": 4})] == [
        "story", "code", "factual", "instruction",
    ]  # fmt: skip


def test_prompt_files_txt_and_jsonl(tmp_path: Path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  second  \n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"text": "a", "category": "x"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    assert load_prompts({"name": "file", "path": str(txt)}) == [Prompt("first"), Prompt("second")]
    assert load_prompts({"name": "file", "path": str(jsonl), "limit": 1}) == [Prompt("a", "x")]
    with pytest.raises(ConfigError, match=r"prompts\.path=.* no such file"):
        load_prompts({"name": "file", "path": str(tmp_path / "missing.txt")})
    jsonl.write_text('{"prompt": "no text field"}\n')
    with pytest.raises(ConfigError, match=r"line 1 of .* need a JSON object with a 'text' field"):
        load_prompts({"name": "file", "path": str(jsonl)})


# --- running ------------------------------------------------------------------------------------------


def tiny_spec(**overrides: Any) -> validation.JobSpec:
    cfg = compose_config(
        "model=tiny-random", "max_new_tokens=6", "prompts.limit=3", "prompts.chat_template=false"
    )
    spec = validation.prepare_job(cfg)
    return validation.JobSpec(**{**spec.__dict__, **overrides})


def test_row_seeds_make_samples_independent_of_batching():
    from rtdlm_experiments.models import load_model

    spec = tiny_spec(num_samples=2)
    model = load_model(spec.model)
    prompt_ids = app.encode_prompts(model.tokenizer, spec.prompts, chat_template=False)
    rows = app.plan_rows(len(spec.prompts), spec.num_samples, spec.seed)
    decoder = AutoregressiveDecoder()
    one_by_one = app.generate_rows(
        decoder, model, prompt_ids, rows, validation.JobSpec(**{**spec.__dict__, "batch_size": 1})
    )
    batched = app.generate_rows(
        decoder, model, prompt_ids, rows, validation.JobSpec(**{**spec.__dict__, "batch_size": 4})
    )
    assert one_by_one.token_ids == batched.token_ids
    # Row order is prompt-major; the two samples of a prompt have different seeds and differ.
    assert [(row.prompt_index, row.sample_index) for row in rows[:3]] == [(0, 0), (0, 1), (1, 0)]
    assert one_by_one.token_ids[0] != one_by_one.token_ids[1]
    # A sample's seed depends only on (seed, prompt, sample).
    assert app.plan_rows(5, 4, spec.seed)[4 * 2 + 1].seed == app.row_seed(spec.seed, 2, 1) == rows[5].seed


def test_merge_outputs_concatenates_rows_and_adds_totals():
    def batch(token_ids: list[list[int]], seconds: float, calls: int, accepted: float, verified: float):
        return GenerationOutput(
            token_ids=token_ids,
            model_logprobs=[[-0.1] * len(ids) for ids in token_ids],
            finished_by_stop=[len(ids) < 3 for ids in token_ids],
            prefill_seconds=seconds,
            decode_seconds=2 * seconds,
            sampler_calls=calls,
            target_forwards=calls,
            draft_forwards=1,
            stats={"accepted_tokens": accepted, "verified_tokens": verified},
        )

    first = batch([[1, 2]], seconds=1.0, calls=2, accepted=4.0, verified=4.0)
    second = batch([[3, 4, 5, 6]], seconds=0.5, calls=4, accepted=2.0, verified=8.0)
    merged = merge_outputs([first, second])
    assert merged.token_ids == [[1, 2], [3, 4, 5, 6]]
    assert merged.finished_by_stop == [True, False]
    assert merged.model_logprobs == [[-0.1] * 2, [-0.1] * 4]
    assert (merged.prefill_seconds, merged.decode_seconds, merged.sampler_calls) == (1.5, 3.0, 6)
    assert (merged.target_forwards, merged.draft_forwards) == (6, 2)
    assert merged.stats == {"accepted_tokens": 6.0, "verified_tokens": 12.0}  # counts add up exactly
    assert merged.accounting()["acceptance_rate"] == 0.5


def test_config_hash_ignores_where_results_are_logged():
    config = {"model": {"name": "m"}, "seed": 1, "tracking": {"uri": "a"}, "experiment_name": "x"}
    same = {**config, "tracking": {"uri": "b"}, "experiment_name": "y"}
    assert results.config_hash(config) == results.config_hash(same)
    assert results.config_hash(config) != results.config_hash({**config, "seed": 2})


def test_config_hash_is_that_of_the_decoder_config_before_it_had_a_target():
    """Jobs logged before decoder yamls carried ``_target_`` keep their hash (resume, drift baselines)."""
    before = {"seed": 0, "decoder": {"name": "speculative", "draft_model": "m", "num_draft_tokens": 4}}
    after = {**before, "decoder": {**before["decoder"], "_target_": "sampling.decoding.SpeculativeDecoder"}}
    after["decoder"]["_partial_"] = True
    assert results.config_hash(after) == results.config_hash(before)


# --- decoder factory ----------------------------------------------------------------------------------


class FakeTokenizer:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def encode(self, text: str) -> list[int]:
        return self.ids


class FakeModel:
    """Just what `build_decoder` looks at: a tokenizer encoding every text as ``probe_ids``."""

    def __init__(self, probe_ids: list[int], num_layers: int = 4, vocab_size: int = 32) -> None:
        self.name, self.num_layers, self.vocab_size = "fake", num_layers, vocab_size
        self.eos_token_ids, self.device, self.dtype = (0,), "cpu", "torch.float32"
        self.tokenizer = FakeTokenizer(probe_ids)


def decoder_config(*overrides: str) -> dict[str, Any]:
    """The ``decoder`` node of the composed config, as the app gets it."""
    return OmegaConf.to_container(compose_config("model=tiny-random", *overrides).decoder, resolve=True)


def test_every_decoder_yaml_names_its_class_in_sampling_decoding():
    from sampling import decoding

    for path in sorted((CONF / "decoder").glob("*.yaml")):
        cfg = decoder_config(f"decoder={path.stem}")
        module, _, class_name = cfg["_target_"].rpartition(".")
        assert module == "sampling.decoding" and hasattr(decoding, class_name), path.name


def test_build_decoder_maps_each_config_to_its_decoder():
    from sampling import decoding

    target = FakeModel([1, 2, 3])
    loaded: list[tuple[str, dict]] = []

    def load(name: str, **placement: str) -> FakeModel:
        loaded.append((name, placement))
        return FakeModel([1, 2, 3])

    autoregressive = app.build_decoder(decoder_config("decoder=autoregressive"), target)
    assert isinstance(autoregressive, decoding.AutoregressiveDecoder)
    speculative = app.build_decoder(
        decoder_config(
            "decoder=speculative",
            "decoder.draft_model=tiny-random",
            "decoder.num_draft_tokens=3",
            "decoder.policy=heuristic",
        ),
        target,
        load,
    )
    assert isinstance(speculative, decoding.SpeculativeDecoder)
    assert (speculative.num_draft_tokens, speculative.policy) == (3, "heuristic")
    assert loaded == [("tiny-random", {"device": "cpu", "dtype": "float32"})]
    self_speculative = app.build_decoder(
        decoder_config("decoder=self_speculative", "decoder.exit_layer=2", "decoder.num_draft_tokens=5"),
        target,
    )
    assert isinstance(self_speculative, decoding.SelfSpeculativeDecoder)
    assert (self_speculative.exit_layer, self_speculative.num_draft_tokens) == (2, 5)
    lookup = app.build_decoder(
        decoder_config("decoder=prompt_lookup", "decoder.max_ngram=2", "decoder.num_draft_tokens=6"), target
    )
    assert isinstance(lookup, decoding.PromptLookupDecoder)
    assert (lookup.max_ngram, lookup.num_draft_tokens) == (2, 6)


def test_build_decoder_rejects_what_cannot_work():
    target = FakeModel([1, 2, 3], num_layers=4)
    speculative = decoder_config("decoder=speculative", "decoder.draft_model=tiny-random")
    with pytest.raises(ConfigError, match="draft_model='tiny-random' is invalid: its tokenizer differs"):
        app.build_decoder(speculative, target, lambda name, **_: FakeModel([1, 2, 4]))
    with pytest.raises(ConfigError, match="exit_layer=4 is invalid: must be < the model's 4 layers"):
        app.build_decoder(decoder_config("decoder=self_speculative", "decoder.exit_layer=4"), target)
    # a decoder's counts are checked once, by validation (prepare_job), not again when it is built
    zero_drafts = decoder_config("decoder=prompt_lookup", "decoder.num_draft_tokens=0")
    with pytest.raises(ConfigError, match="num_draft_tokens=0 is invalid: must be >= 1"):
        validation.validate_decoder_config(zero_drafts)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("decoder=speculative", "decoder.num_draft_tokens=0"),
            "decoder.num_draft_tokens=0 is invalid: must be >= 1",
        ),
        (
            ("decoder=self_speculative", "decoder.exit_layer=0"),
            "decoder.exit_layer=0 is invalid: must be >= 1",
        ),
        (("decoder=prompt_lookup", "decoder.max_ngram=0"), "decoder.max_ngram=0 is invalid: must be >= 1"),
        (
            ("decoder=speculative", "decoder.min_confidence=1.5"),
            "decoder.min_confidence=1.5 is invalid: must be in [0, 1)",
        ),
        (("decoder=speculative", "decoder.draft_model=gpt-9"), "decoder.draft_model"),
        (
            ("decoder._target_=sampling.decoding.NoSuchDecoder",),
            "decoder._target_='sampling.decoding.NoSuchDecoder' is invalid",
        ),
    ],
)
def test_prepare_job_rejects_a_bad_decoder_config_before_loading_a_model(overrides, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        validation.prepare_job(compose_config("model=tiny-random", *overrides))
    assert "\n" not in str(caught.value)


def test_speculative_job_is_timed_against_the_autoregressive_baseline():
    lookup = decoder_config("decoder=prompt_lookup", "decoder.max_ngram=2", "decoder.num_draft_tokens=3")
    spec = tiny_spec(decoder=lookup, batch_size=2)
    result = app.run_job(spec)
    assert result.baseline is not None
    assert result.metrics["speedup"] == pytest.approx(
        result.baseline.total_seconds / result.output.total_seconds
    )
    assert "acceptance_rate" in result.metrics
    # Same rows, same seeds: the baseline sampled from the same distribution but is its own output.
    assert len(result.baseline.token_ids) == len(result.output.token_ids) == 3
    assert {"load_seconds", "warmup_seconds", "baseline_wall_seconds", "decoder_wall_seconds"} <= set(
        result.timings
    )


def test_a_job_records_the_registry_hash_of_its_weights():
    """Tracking tags runs with it from ``results.json``, without asking the model registry itself."""
    from rtdlm_experiments.job import app as job_app
    from rtdlm_experiments.models.registry import MODELS

    assert job_app._weights_sha256({"name": "qwen2.5-coder-0.5b"}) == MODELS["qwen2.5-coder-0.5b"].sha256
    assert len(MODELS["qwen2.5-coder-0.5b"].sha256 or "") == 64
    assert job_app._weights_sha256({"name": "tiny-random"}) is None
