"""One experiment job: validated spec → model + decoder → generations → metrics.

Everything here is computation: validation is `rtdlm_experiments.config.validation`'s (its `JobSpec` is
what arrives here, checked once), the job's record format `rtdlm_experiments.results.record`'s, saving and
logging it the entry point's (`rtdlm_experiments.__main__`).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import instantiate

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.config.validation import DRAFT_MODEL_KEY, JobSpec, check_model_fit
from rtdlm_experiments.job.companions import load_companion
from rtdlm_experiments.job.evaluation import JobGenerations, evaluate_job
from rtdlm_experiments.job.judge import generation_nll
from rtdlm_experiments.job.prompt_sets import Prompt
from rtdlm_experiments.metrics import all_metrics
from rtdlm_experiments.models import load_model
from rtdlm_experiments.models.registry import MODELS
from rtdlm_experiments.search.racing import Race, select_rows
from sampling.decoding import AutoregressiveDecoder
from sampling.decoding.base import CausalLM, Decoder, GenerateOptions, GenerationOutput, Progress
from sampling.decoding.stopping import StopStrings, truncate_at_stop

_LABEL_KEYS = ("name",)
"""Decoder config keys that describe the job but are no constructor arguments."""

_WARMUP_TOKENS = 2


@dataclass(frozen=True)
class Row:
    """One generated sequence: sample ``sample_index`` of prompt ``prompt_index``."""

    prompt_index: int
    sample_index: int
    seed: int


@dataclass
class JobResult:
    """What a job computed; `rtdlm_experiments.results.record` turns it into the job's record."""

    output: GenerationOutput
    rows: list[Row]
    prompt_ids: list[list[int]]
    texts: list[str]
    metrics: dict[str, float]
    timings: dict[str, float]
    device: str
    dtype: str
    baseline: GenerationOutput | None = None
    artifacts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Rows of extra job files by file name (e.g. HumanEval's per-sample results)."""
    tags: dict[str, str] = field(default_factory=dict)
    weights_sha256: str | None = None
    """The sha-256 the model registry records for the weights (None for tiny or local models)."""


# --- building ---------------------------------------------------------------------------------------


def build_decoder(
    cfg: Mapping[str, Any], target: CausalLM, load_draft_model: Callable[..., CausalLM] = load_model
) -> Decoder:
    """The decoder a ``decoder`` config describes, for ``target``, built with ``hydra.utils.instantiate``.
    ``cfg`` is a checked one (`JobSpec.decoder`: `rtdlm_experiments.config.validation.prepare_job`).

    A ``_partial_`` config is completed with what depends on the target: a ``draft_model`` (a model
    config name) is loaded by ``load_draft_model`` where the target is and must share its tokenizer.
    An ``exit_layer`` must be below the target's layer count.
    """
    check_exit_layer(cfg, target)
    arguments = {key: value for key, value in cfg.items() if key not in (*_LABEL_KEYS, DRAFT_MODEL_KEY)}
    built = instantiate(arguments)
    if not isinstance(built, functools.partial):
        return built
    return built(**draft_model_argument(cfg, target, load_draft_model))


def check_exit_layer(cfg: Mapping[str, Any], target: CausalLM) -> None:
    """An early exit after layer ``exit_layer`` needs a later layer to verify with."""
    if "exit_layer" in cfg and cfg["exit_layer"] >= target.num_layers:
        raise ConfigError(
            f"decoder.exit_layer={cfg['exit_layer']} is invalid: "
            f"must be < the model's {target.num_layers} layers"
        )


def draft_model_argument(
    cfg: Mapping[str, Any], target: CausalLM, load_draft_model: Callable[..., CausalLM]
) -> dict[str, CausalLM]:
    """``{"draft_model": <loaded model>}`` when the config names one, else nothing to bind."""
    if DRAFT_MODEL_KEY not in cfg:
        return {}
    name = cfg[DRAFT_MODEL_KEY]
    return {DRAFT_MODEL_KEY: load_companion(name, target, load_draft_model)}


# --- running ----------------------------------------------------------------------------------------


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The sampler seed of one (prompt, sample): independent of batching, prompt count and num_samples."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # below 2**62, like the sampler's own random seeds


def plan_rows(num_prompts: int, num_samples: int, seed: int) -> list[Row]:
    """Every (prompt, sample) pair, prompt-major, with its seed."""
    return [
        Row(prompt, sample, row_seed(seed, prompt, sample))
        for prompt in range(num_prompts)
        for sample in range(num_samples)
    ]


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt; with ``chat_template`` and a tokenizer that has one, the prompt becomes a
    user turn followed by the assistant's generation prompt (what instruct models are trained on)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
            )
            for prompt in prompts
        ]
        return [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
    return [list(tokenizer.encode(prompt.text)) for prompt in prompts]


def decode_texts(
    tokenizer: Any, token_ids: Sequence[Sequence[int]], stop_strings: Sequence[str] = ()
) -> list[str]:
    """Text of each generated sequence, special tokens dropped, cut before its first stop string."""
    texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in token_ids]
    return [truncate_at_stop(text, stop_strings) for text in texts] if stop_strings else texts


def generation_options(
    spec: JobSpec, tokenizer: Any, rows: Sequence[Row], progress: Progress | None = None
) -> GenerateOptions:
    """The options of this job's ``Decoder.generate`` call over ``rows``: their seeds, the job's batch size,
    stop strings and ``ignore_eos``, and ``progress``."""
    stop_strings = StopStrings.with_tokenizer(spec.stop_strings, tokenizer) if spec.stop_strings else None
    return GenerateOptions(
        row_seeds=[row.seed for row in rows],
        stop_strings=stop_strings,
        ignore_eos=spec.ignore_eos,
        max_batch_size=spec.batch_size,
        progress=progress,
    )


def generate_rows(
    decoder: Decoder,
    model: CausalLM,
    prompt_ids: Sequence[list[int]],
    rows: Sequence[Row],
    spec: JobSpec,
    progress: Progress | None = None,
) -> GenerationOutput:
    """Generate every row in one call with at most ``spec.batch_size`` rows in flight (a decoder that
    refills gives a finished row's slot to the next row at once); ``progress(new_tokens,
    released_budget)`` after every step."""
    return decoder.generate(
        model,
        [prompt_ids[row.prompt_index] for row in rows],
        spec.sampling,
        spec.max_new_tokens,
        generation_options(spec, getattr(model, "tokenizer", None), rows, progress),
    )


def run_job(
    spec: JobSpec, progress_factory: Callable[[int, str], Any] | None = None, race: Race | None = None
) -> JobResult:
    """Load the model(s), generate every (prompt, sample), decode the texts and compute the metrics.

    Non-autoregressive decoders are timed against the autoregressive decoder on the same rows, config
    and seeds, in this process, so the speedup compares like with like. Both are warmed up first.
    ``progress_factory(total_tokens, description)`` returns a bar with ``advance(new, released)`` and
    ``close()``; its total is rows × max_new_tokens. A search trial's ``race`` generates the rows in
    chunks of prompts and stops early when the trial loses (`rtdlm_experiments.search.racing`); the
    metrics are then those of the rows it generated.
    """
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    model = load_model(spec.model)
    decoder = build_decoder(spec.decoder, model)
    judge = None
    if spec.judge_model is not None:
        judge = load_companion(spec.judge_model, model, field_name="judge.model")
    timings["load_seconds"] = time.perf_counter() - tick

    prompt_ids = encode_prompts(model.tokenizer, spec.prompts, spec.chat_template)
    check_model_fit(spec, prompt_ids, model.vocab_size, getattr(model, "max_context", None))
    rows = plan_rows(len(spec.prompts), spec.num_samples, spec.seed)
    decoders = {"decoder": decoder}
    if not isinstance(decoder, AutoregressiveDecoder):
        decoders = {"baseline": AutoregressiveDecoder(), **decoders}
    if race is None:
        outputs = _generate_timed(decoders, model, prompt_ids, rows, spec, timings, progress_factory)
    else:
        rows, outputs = race.run(
            rows,
            functools.partial(_generate_chunk, decoders, model, prompt_ids, spec, timings, progress_factory),
            functools.partial(_prompt_scores, spec, model, prompt_ids, race.metric),
        )
    output, baseline = outputs["decoder"], outputs.get("baseline")

    tick = time.perf_counter()
    texts = decode_texts(model.tokenizer, output.token_ids, spec.stop_strings)
    metrics = all_metrics(output, texts, baseline.total_seconds if baseline else None, seed=spec.seed)
    timings["metrics_seconds"] = time.perf_counter() - tick
    evaluation = _evaluate(spec, rows, prompt_ids, output, texts, judge, timings)
    return JobResult(
        output=output,
        rows=rows,
        prompt_ids=prompt_ids,
        texts=texts,
        metrics=metrics | evaluation.metrics | (race.metrics() if race else {}),
        timings=timings,
        device=str(model.device),
        dtype=str(getattr(model, "dtype", spec.model.get("dtype", ""))).removeprefix("torch."),
        baseline=baseline,
        artifacts=evaluation.artifacts | (race.artifacts() if race else {}),
        tags=evaluation.tags,
        weights_sha256=_weights_sha256(spec.model),
    )


def _weights_sha256(model_cfg: Mapping[str, Any]) -> str | None:
    spec = MODELS.get(str(model_cfg.get("name")))
    return spec.sha256 if spec else None


def _evaluate(
    spec: JobSpec,
    rows: Sequence[Row],
    prompt_ids: Sequence[list[int]],
    output: GenerationOutput,
    texts: Sequence[str],
    judge: CausalLM | None,
    timings: dict[str, float],
) -> Any:
    """Judge likelihood, task scores and CIs (`rtdlm_experiments.job.evaluation`), timed into ``timings``."""
    judge_nll = None
    if judge is not None:
        tick = time.perf_counter()
        row_prompts = [prompt_ids[row.prompt_index] for row in rows]
        judge_nll = generation_nll(judge, row_prompts, output.token_ids, spec.judge_batch_size)
        timings["judge_seconds"] = time.perf_counter() - tick
    tick = time.perf_counter()
    generations = JobGenerations(
        spec.prompts, [row.prompt_index for row in rows], [row.sample_index for row in rows], texts,
        output.token_ids, output.model_logprobs, output.entropies, output.num_kept,
    )  # fmt: skip
    evaluation = evaluate_job(
        generations, chat_template=spec.chat_template, execution=spec.execution, task=spec.task,
        judge_nll=judge_nll,
    )
    timings["evaluation_seconds"] = time.perf_counter() - tick
    return evaluation


def _generate_timed(
    decoders: Mapping[str, Decoder],
    model: CausalLM,
    prompt_ids: Sequence[list[int]],
    rows: Sequence[Row],
    spec: JobSpec,
    timings: dict[str, float],
    progress_factory: Callable[[int, str], Any] | None,
    warm_up: bool = True,
) -> dict[str, GenerationOutput]:
    """Warm up every decoder, then generate every row with each; adds their seconds to ``timings``."""
    tick = time.perf_counter()
    for warm in decoders.values() if warm_up else ():
        warm.generate(
            model, prompt_ids[:1], spec.sampling, _WARMUP_TOKENS, GenerateOptions(row_seeds=[rows[0].seed])
        )
    timings["warmup_seconds"] = time.perf_counter() - tick

    outputs: dict[str, GenerationOutput] = {}
    for role, active in decoders.items():
        label = spec.decoder["name"] if role == "decoder" else "AR baseline"
        bar = progress_factory(len(rows) * spec.max_new_tokens, label) if progress_factory else None
        tick = time.perf_counter()
        outputs[role] = generate_rows(active, model, prompt_ids, rows, spec, bar.advance if bar else None)
        timings[f"{role}_wall_seconds"] = time.perf_counter() - tick
        if bar:
            bar.close()
    return outputs


# --- racing hook (rtdlm_experiments.search.racing) -------------------------------------------------------


def _generate_chunk(
    decoders: Mapping[str, Decoder],
    model: CausalLM,
    prompt_ids: Sequence[list[int]],
    spec: JobSpec,
    timings: dict[str, float],
    progress_factory: Callable[[int, str], Any] | None,
    rows: Sequence[Row],
) -> dict[str, GenerationOutput]:
    """`_generate_timed` for one chunk of rows (warmed up before the first only), its seconds added to
    ``timings``."""
    chunk_timings: dict[str, float] = {}
    first = "warmup_seconds" not in timings
    outputs = _generate_timed(decoders, model, prompt_ids, rows, spec, chunk_timings, progress_factory, first)
    for key, seconds in chunk_timings.items():
        timings[key] = timings.get(key, 0.0) + seconds
    return outputs


def _prompt_scores(
    spec: JobSpec,
    model: CausalLM,
    prompt_ids: Sequence[list[int]],
    metric: str,
    rows: Sequence[Row],
    output: GenerationOutput,
) -> dict[int, float]:
    """The job metric ``metric`` computed on each prompt's rows alone (what racing compares)."""
    from rtdlm_experiments.search.objectives import metric_value

    texts = decode_texts(model.tokenizer, output.token_ids, spec.stop_strings)
    scores: dict[int, float] = {}
    for prompt in dict.fromkeys(row.prompt_index for row in rows):
        positions = [i for i, row in enumerate(rows) if row.prompt_index == prompt]
        part = select_rows(output, positions)
        part_texts = [texts[i] for i in positions]
        part_rows = [rows[i] for i in positions]
        metrics = all_metrics(part, part_texts, seed=spec.seed)
        metrics |= _evaluate(spec, part_rows, prompt_ids, part, part_texts, None, {}).metrics
        scores[prompt] = metric_value(metrics, metric, "search.objectives")
    return scores
