"""One experiment job: composed config → validated spec → model + decoder → generations → metrics.

Everything here is computation: the job's record format is `rtdlm_experiments.results`', saving and
logging it the entry point's (`rtdlm_experiments.__main__`). `prepare_job` checks every value before
anything heavy happens, so a bad override fails in a second with one line naming the field.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from rtdlm_experiments.companions import check_same_tokenizer as check_same_tokenizer  # re-exported
from rtdlm_experiments.companions import load_companion
from rtdlm_experiments.evaluation import (
    ExecutionSettings,
    JobGenerations,
    check_code_execution,
    evaluate_job,
    execution_settings,
)
from rtdlm_experiments.judge import generation_nll
from rtdlm_experiments.metrics import all_metrics
from rtdlm_experiments.models import ModelPreparationError, load_model, validate_model_config
from rtdlm_experiments.prompt_sets import Prompt, load_prompts, stop_strings
from rtdlm_experiments.schema import ConfigError
from sampling import SamplingConfig, get_preset
from sampling.decoding import AutoregressiveDecoder
from sampling.decoding.base import CausalLM, Decoder, GenerationOutput, Progress
from sampling.decoding.speculation_policy import POLICIES
from sampling.decoding.stopping import StopStrings, truncate_at_stop

TRACKING_BACKENDS = ("mlflow", "none")

_POSITIVE_DECODER_FIELDS = ("num_draft_tokens", "max_ngram", "exit_layer")
_LABEL_KEYS = ("name",)
"""Decoder config keys that describe the job but are no constructor arguments."""
_DRAFT_MODEL_KEY = "draft_model"
"""A decoder config field naming a model config: the app loads it next to the target and passes the
loaded model under this keyword."""

_WARMUP_TOKENS = 2


@dataclass(frozen=True)
class JobSpec:
    """A job's inputs, validated: what `run_job` needs and nothing it would have to check again."""

    sampling: SamplingConfig
    model: dict[str, Any]
    decoder: dict[str, Any]
    prompts: list[Prompt]
    chat_template: bool
    seed: int
    max_new_tokens: int
    num_samples: int
    batch_size: int
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    judge_model: str | None = None
    judge_batch_size: int = 4


@dataclass(frozen=True)
class Row:
    """One generated sequence: sample ``sample_index`` of prompt ``prompt_index``."""

    prompt_index: int
    sample_index: int
    seed: int


@dataclass
class JobResult:
    """What a job computed; `rtdlm_experiments.results` turns it into the job's record."""

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


# --- validation (no model is loaded here) ----------------------------------------------------------


def sampling_config(cfg: Mapping[str, Any], seed: int | None = None) -> SamplingConfig:
    """The preset named by ``cfg["preset"]`` with every non-null field of ``cfg`` overriding it.

    Hydra's lists and mappings (``order``, ``dry_sequence_breakers``, ``logit_bias``) become plain ones;
    an ``order`` that is neither a list nor a string (``sampling.order=5``) is read as an order's name,
    so it fails as an unknown one.

    >>> sampling_config({"preset": "precise", "order": ["top_k", "temperature"], "top_p": None}).order
    ('top_k', 'temperature')
    """
    overrides = {
        key: OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "preset" and value is not None
    }
    if "order" in overrides and not isinstance(overrides["order"], str | list | tuple):
        overrides["order"] = str(overrides["order"])
    try:
        return get_preset(cfg["preset"], **overrides, seed=seed)
    except ValueError as err:
        message = str(err)
        if message.startswith("unknown sampling preset"):
            message = f"sampling.preset={cfg['preset']!r} is invalid: {message}"
        raise ConfigError(message) from err


def validate_decoder_config(cfg: Mapping[str, Any]) -> None:
    """Checks of a ``decoder`` config that need no model (the schema already checked types): its
    ``_target_`` names a class, its counts are positive and its draft model config is valid."""
    for key in _POSITIVE_DECODER_FIELDS:
        if key in cfg and cfg[key] < 1:
            raise ConfigError(f"decoder.{key}={cfg[key]} is invalid: must be >= 1")
    if "policy" in cfg and cfg["policy"] not in POLICIES:
        allowed = ", ".join(POLICIES)
        raise ConfigError(f"decoder.policy={cfg['policy']!r} is invalid: must be one of {allowed}")
    try:
        get_class(cfg["_target_"])
    except Exception as err:
        raise ConfigError(f"decoder._target_={cfg['_target_']!r} is invalid: {_first_line(err)}") from err
    if _DRAFT_MODEL_KEY in cfg:
        _validate_model(cfg[_DRAFT_MODEL_KEY], field_name=f"decoder.{_DRAFT_MODEL_KEY}")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def prepare_job(cfg: DictConfig) -> JobSpec:
    """Validate a composed config into a `JobSpec`; raises `ConfigError` naming the first bad field."""
    for key in ("max_new_tokens", "num_samples", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} is invalid: must be >= 1")
    if cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed} is invalid: must be >= 0")
    if cfg.tracking.backend not in TRACKING_BACKENDS:
        raise ConfigError(
            f"tracking.backend={cfg.tracking.backend!r} is invalid: must be one of {TRACKING_BACKENDS}"
        )
    if cfg.tracking.parent_run_id and cfg.tracking.backend != "mlflow":
        raise ConfigError(
            f"tracking.parent_run_id={cfg.tracking.parent_run_id!r} is invalid: resuming needs MLflow"
        )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    _validate_model(model_cfg, field_name="model")
    decoder_cfg = OmegaConf.to_container(cfg.decoder, resolve=True)
    validate_decoder_config(decoder_cfg)
    prompts = load_prompts(cfg.prompts)
    execution = execution_settings(cfg.get("eval") or {})
    check_code_execution(prompts, execution)
    judge = cfg.get("judge") or {}
    if judge.get("model") is not None:
        _validate_model(judge["model"], field_name="judge.model")
    if judge.get("batch_size", 1) < 1:
        raise ConfigError(f"judge.batch_size={judge['batch_size']} is invalid: must be >= 1")
    return JobSpec(
        sampling=sampling_config(cfg.sampling, seed=cfg.seed),
        model=model_cfg,
        decoder=decoder_cfg,
        prompts=prompts,
        chat_template=cfg.prompts.chat_template,
        seed=cfg.seed,
        max_new_tokens=cfg.max_new_tokens,
        num_samples=cfg.num_samples,
        batch_size=cfg.batch_size,
        stop_strings=stop_strings(cfg.prompts),
        ignore_eos=bool(cfg.get("ignore_eos", False)),
        execution=execution,
        judge_model=judge.get("model"),
        judge_batch_size=judge.get("batch_size", 4),
    )


def _validate_model(model_cfg: Mapping[str, Any] | str, field_name: str) -> None:
    try:
        validate_model_config(model_cfg)
    except (ValueError, TypeError, ModelPreparationError) as err:
        message = str(err).strip("'\"")
        raise ConfigError(message if field_name in message else f"{field_name}: {message}") from err


def resolved_config(cfg: DictConfig, spec: JobSpec) -> dict[str, Any]:
    """The composed config as plain data, with ``sampling`` holding every effective field (the preset's
    values filled in), so it describes the job without needing `sampling.PRESETS`."""
    config = OmegaConf.to_container(cfg, resolve=True)
    sampling = asdict(spec.sampling)
    sampling.pop("seed")  # the job's seed, already at the top level
    config["sampling"] = {"preset": cfg.sampling.preset, **sampling}
    return config


# --- building ---------------------------------------------------------------------------------------


def build_decoder(
    cfg: Mapping[str, Any], target: CausalLM, load_draft_model: Callable[..., CausalLM] = load_model
) -> Decoder:
    """The decoder a ``decoder`` config describes, for ``target``, built with ``hydra.utils.instantiate``.

    A ``_partial_`` config is completed with what depends on the target: a ``draft_model`` (a model
    config name) is loaded by ``load_draft_model`` where the target is and must share its tokenizer.
    An ``exit_layer`` must be below the target's layer count.
    """
    validate_decoder_config(cfg)
    check_exit_layer(cfg, target)
    arguments = {key: value for key, value in cfg.items() if key not in (*_LABEL_KEYS, _DRAFT_MODEL_KEY)}
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
    if _DRAFT_MODEL_KEY not in cfg:
        return {}
    name = cfg[_DRAFT_MODEL_KEY]
    return {_DRAFT_MODEL_KEY: load_companion(name, target, load_draft_model)}


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


def generation_options(spec: JobSpec, tokenizer: Any) -> dict[str, Any]:
    """The ``stop_strings`` / ``ignore_eos`` keywords of ``Decoder.generate`` for this job."""
    stop_strings = None
    if spec.stop_strings:
        detokenize = functools.partial(tokenizer.decode, skip_special_tokens=True)
        stop_strings = StopStrings(tuple(spec.stop_strings), lambda ids: detokenize(list(ids)))
    return {"stop_strings": stop_strings, "ignore_eos": spec.ignore_eos}


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
        row_seeds=[row.seed for row in rows],
        max_batch_size=spec.batch_size,
        progress=progress,
        **generation_options(spec, getattr(model, "tokenizer", None)),
    )


def run_job(spec: JobSpec, progress_factory: Callable[[int, str], Any] | None = None) -> JobResult:
    """Load the model(s), generate every (prompt, sample), decode the texts and compute the metrics.

    Non-autoregressive decoders are timed against the autoregressive decoder on the same rows, config
    and seeds, in this process, so the speedup compares like with like. Both are warmed up first.
    ``progress_factory(total_tokens, description)`` returns a bar with ``advance(new, released)`` and
    ``close()``; its total is rows × max_new_tokens.
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
    rows = plan_rows(len(spec.prompts), spec.num_samples, spec.seed)
    decoders = {"decoder": decoder}
    if not isinstance(decoder, AutoregressiveDecoder):
        decoders = {"baseline": AutoregressiveDecoder(), **decoders}
    outputs = _generate_timed(decoders, model, prompt_ids, rows, spec, timings, progress_factory)
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
        metrics=metrics | evaluation.metrics,
        timings=timings,
        device=str(model.device),
        dtype=str(getattr(model, "dtype", spec.model.get("dtype", ""))).removeprefix("torch."),
        baseline=baseline,
        artifacts=evaluation.artifacts,
        tags=evaluation.tags,
    )


def _evaluate(
    spec: JobSpec,
    rows: Sequence[Row],
    prompt_ids: Sequence[list[int]],
    output: GenerationOutput,
    texts: Sequence[str],
    judge: CausalLM | None,
    timings: dict[str, float],
) -> Any:
    """Judge likelihood, task scores and CIs (`rtdlm_experiments.evaluation`), timed into ``timings``."""
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
        generations, chat_template=spec.chat_template, execution=spec.execution, judge_nll=judge_nll
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
) -> dict[str, GenerationOutput]:
    """Warm up every decoder, then generate every row with each; adds their seconds to ``timings``."""
    tick = time.perf_counter()
    for warm in decoders.values():
        warm.generate(model, prompt_ids[:1], spec.sampling, _WARMUP_TOKENS, row_seeds=[rows[0].seed])
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
